"""The sans-IO session layer: numbering, acknowledgements, the window, replay."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_federation import ReconnectPolicy
from trio_federation._connection._session import (
    BATCH_CHARS,
    BATCH_PREFIX,
    ReceiveWindow,
    ResumeOffer,
    SendWindow,
    SessionError,
    ack_frame,
    batch_frames,
    parse_resume,
    sequenced_frame,
    split_batch,
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


# -- batches ------------------------------------------------------------------------------

_TEXT_SIZES = st.one_of(
    st.integers(2, 3_000),
    st.integers(BATCH_CHARS - 40, BATCH_CHARS + 40),  # around the bound, alone or not
)


@st.composite
def _envelopes(draw: st.DrawFn) -> list[str]:
    sizes = draw(st.lists(_TEXT_SIZES, max_size=60))
    texts = []
    for index, size in enumerate(sizes):
        # Now and then a line break, which no envelope of ours holds.
        cut = "\n" if draw(st.integers(0, 20)) == 0 else ""
        texts.append("{" + f"{index}:" + cut + "x" * size + "}")
    return texts


def _unbatch(frames: list[str], session: bool) -> tuple[list[str], list[int]]:
    """Every envelope back, with its sequence number (0 without a session)."""
    texts: list[str] = []
    numbers: list[int] = []
    for frame in frames:
        if frame.startswith(BATCH_PREFIX):
            first, ack, batch = split_batch(frame, session=session)
            assert session or (first, ack) == (0, 0)
            assert len(frame) <= BATCH_CHARS + 60
            texts.extend(batch)
            numbers.extend(range(first, first + len(batch)) if session else [0] * len(batch))
        elif session:
            number, acked = split_frame(frame)
            assert number is not None and acked == 7
            texts.append("{" + frame.split(",", 2)[2])
            numbers.append(number)
        else:
            texts.append(frame)
            numbers.append(0)
    return texts, numbers


@given(_envelopes(), st.booleans())
def test_batches_keep_every_envelope_in_order_within_the_bound(
    texts: list[str], session: bool
) -> None:
    frames = batch_frames(texts, 41 if session else None, 7)
    back, numbers = _unbatch(frames, session)
    assert back == texts
    if session:
        assert numbers == list(range(41, 41 + len(texts)))
    for frame in frames:
        if frame.startswith(BATCH_PREFIX):
            assert len(frame.split("\n")) >= 3  # a header and at least two envelopes
    # As few frames as the bound allows: two neighbours in separate frames
    # could not have shared one.
    small = [t for t in texts if len(t) <= BATCH_CHARS and "\n" not in t]
    if small and len(small) == len(texts) and sum(len(t) + 1 for t in texts) <= BATCH_CHARS:
        assert len(frames) == 1


def test_a_lone_envelope_is_an_ordinary_frame() -> None:
    assert batch_frames(['{"a":1}'], 3, 2) == [sequenced_frame(3, 2, '{"a":1}')]
    assert batch_frames(['{"a":1}'], None, 0) == ['{"a":1}']
    assert batch_frames(['{"a":1}', '{"b":2}'], 3, 2) == [
        '{"batch":2,"seq":3,"ack":2}\n{"a":1}\n{"b":2}'
    ]
    assert batch_frames(['{"a":1}', '{"b":2}'], None, 0) == ['{"batch":2}\n{"a":1}\n{"b":2}']


@pytest.mark.parametrize(
    ("frame", "session", "why"),
    [
        ('{"batch":2}\n{}\n{}', True, "malformed batch header for a session's batch"),
        ('{"batch":2,"seq":1,"ack":0}\n{}\n{}', False, "for a sessionless batch"),
        ('{"batch":2,"seq":1}\n{}\n{}', True, "malformed batch header"),
        ('{"batch":"2"}\n{}\n{}', False, "malformed batch header"),
        ('{"batch":2} \n{}\n{}', False, "malformed batch header"),
        ('{"batch":0}\n', False, "this one announced 0"),
        ('{"batch":40000}\n{}', False, "2 to 30720 envelopes; this one announced 40000"),
        ('{"batch":2}\n{}', False, "announced 2 envelopes and holds 1"),
        ('{"batch":2}\n{}\n{}\n{}', False, "announced 2 envelopes and holds 3"),
        ('{"batch":2,"seq":0,"ack":0}\n{}\n{}', True, "numbered from 0"),
        ('{"batch":2,"seq":9007199254740992,"ack":0}\n{}\n{}', True, "out of range"),
    ],
)
def test_broken_batches_are_refused_naming_what_is_wrong(
    frame: str, session: bool, why: str
) -> None:
    with pytest.raises(SessionError, match=re.escape(why)):
        split_batch(frame, session=session)


def test_a_batch_resent_after_a_stale_resume_is_numbered_on_and_its_duplicates_drop() -> None:
    # The sender wrote 1-3 and 4-6 as two batches; the link was cut and the
    # peer, resuming, says it received 3 (the second batch was lost). The
    # resend goes out as one batch from 4 on, with 7-8 written since.
    send: SendWindow[str] = SendWindow(window=64)
    for n in range(1, 9):
        send.number(f"m{n}")
    send.resume(peer_received=3, window=64)
    resent = []
    while (again := send.next_resend()) is not None:
        resent.append(again)
    assert [seq for seq, _ in resent] == [4, 5, 6, 7, 8]
    [frame] = batch_frames([text for _, text in resent], resent[0][0], 0)
    first, _, envelopes = split_batch(frame, session=True)
    # A receiver that did get 4-6 after all (the ack was what was lost) drops
    # them one by one and takes the rest, as the connection's reader does.
    recv = ReceiveWindow(window=64)
    for seq in range(1, 7):
        assert recv.accept(seq)
    taken = [text for seq, text in enumerate(envelopes, first) if recv.accept(seq)]
    assert taken == ["m7", "m8"]
    assert recv.received == 8
