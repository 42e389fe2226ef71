"""The sans-IO session layer: numbering, acknowledgements, the window, replay."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_federation import ReconnectPolicy
from trio_federation._connection._session import (
    ReceiveWindow,
    ResumeOffer,
    SendWindow,
    SessionError,
    ack_frame,
    parse_resume,
    sequenced_frame,
    split_frame,
)


def test_offers_round_trip_through_the_header() -> None:
    offer = ResumeOffer("abc123", 7, 64)
    assert parse_resume(offer.header()) == offer
    granted = ResumeOffer("abc123", 3, 32, resumed=True)
    assert parse_resume(granted.header(response=True)) == granted
    assert parse_resume(None) is None
    assert parse_resume("v9;session=x") is None  # a version we do not speak: v1 then
    one_way = ResumeOffer("abc123", 0, 64, returns=False)
    assert one_way.header().endswith(";reconnects=0")
    assert parse_resume(one_way.header()) == one_way
    assert parse_resume(offer.header()).returns  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        "v1;session=abc;received=x;window=4",
        "v1;received=1;window=4",
        "v1;session=a-b;received=1;window=4",
        "v1;session=" + "a" * 65 + ";received=1;window=4",
        "v1;session=abc;received=-1;window=4",
        "v1;session=abc;received=1;window=0",
    ],
)
def test_malformed_offers_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="X-Federation-Resume"):
        parse_resume(value)


def test_frames_carry_numbers_in_front() -> None:
    frame = sequenced_frame(5, 3, '{"type":"delegation","payload":"{}"}')
    assert frame == '{"seq":5,"ack":3,"type":"delegation","payload":"{}"}'
    assert split_frame(frame) == (5, 3)
    assert split_frame(ack_frame(9)) == (None, 9)
    assert split_frame('{"type":"heartbeat"}') == (None, None)
    assert split_frame('{"seq":"5","ack":3,') == (None, None)
    assert split_frame('{"ctl":"ack","ack":9,"x":1}') == (None, None)
    assert split_frame('{"seq":' + "9" * 40 + ',"ack":1,') == (None, None)


def test_the_send_window_numbers_keeps_and_forgets() -> None:
    window: SendWindow[str] = SendWindow(2)
    assert window.open
    assert [window.number("a"), window.number("b")] == [1, 2]
    assert not window.open  # two out: wait for an ack
    assert list(window.items()) == ["a", "b"]
    assert window.acknowledge(1)
    assert not window.acknowledge(1)  # not news
    assert window.open and list(window.items()) == ["b"]
    with pytest.raises(SessionError, match="beyond the last message sent"):
        window.acknowledge(3)


def test_resume_sends_again_only_what_the_peer_did_not_receive() -> None:
    window: SendWindow[str] = SendWindow(8)
    for item in "abcd":
        window.number(item)
    window.acknowledge(1)  # consumed: a
    window.resume(peer_received=2, window=4)  # received: a, b
    assert window.window == 4
    assert window.next_resend() == (3, "c")
    assert window.next_resend() == (4, "d")
    assert window.next_resend() is None
    assert list(window.items()) == ["b", "c", "d"]  # still unacknowledged
    with pytest.raises(SessionError, match="received 9"):
        window.resume(peer_received=9, window=4)
    assert window.restart() == ["b", "c", "d"]
    assert (window.last_seq, window.acked, len(window)) == (0, 0, 0)


def test_the_receive_window_drops_duplicates_and_refuses_gaps() -> None:
    window = ReceiveWindow(3)
    assert window.accept(1)
    assert not window.accept(1)  # sent again after a reconnect
    with pytest.raises(SessionError, match="gap"):
        window.accept(3)
    assert window.accept(2) and window.accept(3)
    with pytest.raises(SessionError, match="beyond the window"):
        window.accept(4)


def test_acknowledgement_is_the_consumed_prefix() -> None:
    window = ReceiveWindow(8)
    for seq in range(1, 6):
        window.accept(seq)
    for seq in (2, 3):  # a subscription read these first
        window.consume(seq)
    assert window.consumed == 0
    window.consume(1)
    assert window.consumed == 3
    window.consume(1)  # again: nothing changes
    assert window.consumed == 3
    for seq in (4, 5):
        window.consume(seq)
    assert window.consumed == 5


def test_acks_are_due_at_a_quarter_of_the_window() -> None:
    window = ReceiveWindow(8)
    for seq in (1, 2):
        window.accept(seq)
    window.consume(1)
    assert not window.ack_due
    window.consume(2)
    assert window.ack_due
    assert window.announce() == 2
    assert not window.ack_due
    window.restart()
    assert (window.received, window.consumed, window.announced) == (0, 0, 0)


def test_backoff_grows_to_its_bound_with_bounded_jitter() -> None:
    policy = ReconnectPolicy(initial_delay=0.5, multiplier=2, max_delay=4, jitter=0.1)
    rng = random.Random(1)
    for attempt, base in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (10, 4.0), (10_000, 4.0)]:
        delays = [policy.delay(attempt, rng=rng) for _ in range(50)]
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays), (attempt, delays)
    assert ReconnectPolicy(jitter=0).delay(0) == 0.1


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"initial_delay": -1}, "'initial_delay' must be >= 0"),
        ({"multiplier": 0.5}, "'multiplier' must be >= 1"),
        ({"max_attempts": 0}, "'max_attempts' must be >= 1"),
        ({"jitter": 2}, "'jitter' must be <= 1"),
    ],
)
def test_bad_policies_are_refused(settings: dict[str, float], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ReconnectPolicy(**settings)  # type: ignore[arg-type]


# ASCII digits only: \d would also take "\uff15" (a fullwidth 5), as the first
# version of split_frame did.
_REFERENCE = re.compile(r'\{"seq":([0-9]{1,16}),"ack":([0-9]{1,16}),')


@given(
    st.text(alphabet='0123456789"a,\uff15', max_size=18),
    st.text(alphabet='0123456789"a,\uff15', max_size=18),
    st.text(max_size=5),
)
def test_the_hand_written_frame_split_matches_a_regex(seq: str, ack: str, rest: str) -> None:
    frame = f'{{"seq":{seq},"ack":{ack},{rest}'
    match = _REFERENCE.match(frame)
    expected = (int(match[1]), int(match[2])) if match else (None, None)
    assert split_frame(frame) == expected
