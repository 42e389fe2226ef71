"""Resumable sessions: sequence numbers, acknowledgements, the window, replay.

Pure state, no I/O. Between two trio-federation peers that negotiated it at the
upgrade (``X-Federation-Resume``), every message sent through ``send_message``
or ``send`` carries a per-direction sequence number, and every frame carries
the sender's cumulative acknowledgement: how many of the peer's messages its
application has *consumed*. Two consequences:

* **No loss across reconnects.** A sent message stays in the replay buffer
  until acknowledged. On reconnect each side says how many messages it has
  *received*; the other resends the rest, and the receiver drops what it
  already has. Every message is delivered exactly once and in order.
* **Flow control without stalling the reader.** A sender has at most
  ``window`` unacknowledged messages out, and the receiver buffers up to
  ``window`` messages, so its reader never waits for the application: pings
  keep being answered and a slow consumer never looks dead. A slow consumer
  slows the sender instead.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterator
from typing import Any, Final, Generic, TypeVar

import attrs
import orjson

from .._wire._handshake import BATCH_EXTENSION

__all__ = [
    "BATCH_CHARS",
    "BATCH_EXTENSION",
    "BATCH_MIN_FRAME",
    "BATCH_PREFIX",
    "RESUME_HEADER",
    "ReceiveWindow",
    "ResumeOffer",
    "SendWindow",
    "SessionError",
    "ack_frame",
    "batch_frames",
    "parse_refusal",
    "parse_resume",
    "refusal_frame",
    "sequenced_frame",
    "split_batch",
    "split_frame",
]

T = TypeVar("T")

RESUME_HEADER: Final = "X-Federation-Resume"
"""Upgrade header offering (request) or granting (response) a resumable session."""
_VERSION: Final = "v1"
_MAX_COUNTER: Final = 2**53  # exact in JavaScript too
_ACK = re.compile(r'\{"ctl":"ack","ack":(\d{1,16})\}')


class SessionError(Exception):
    """The peer broke the session protocol (a gap in its sequence, an impossible ack)."""


@attrs.frozen
class ResumeOffer:
    """One side's session parameters at the upgrade.

    Attributes:
        session: the session id, chosen by the dialer, kept across reconnects.
        received: how many of the other side's messages this side has received.
        window: how many unacknowledged messages this side accepts.
        resumed: (responses only) whether the listener knew the session.
        returns: (requests only) whether the dialer will come back after a
            lost link. A dialer without a reconnect policy says it will not
            (``reconnects=0``): the listener then keeps nothing after a cut,
            and its handler sees the loss at once. The session still numbers,
            acknowledges and flow-controls the one link.
    """

    session: str
    received: int
    window: int
    resumed: bool = False
    returns: bool = True

    def header(self, *, response: bool = False) -> str:
        """The header value."""
        text = f"{_VERSION};session={self.session};received={self.received};window={self.window}"
        if response:
            return f"{text};resumed={int(self.resumed)}"
        return text if self.returns else f"{text};reconnects=0"


def parse_resume(value: str | None) -> ResumeOffer | None:
    """Parse a ``X-Federation-Resume`` value; None if absent or not a version we speak.

    Raises:
        ValueError: the header is ours but malformed.
    """
    if value is None:
        return None
    version, _, rest = value.strip().partition(";")
    if version != _VERSION:
        return None
    fields = dict(part.partition("=")[::2] for part in rest.split(";") if part)
    try:
        session = fields["session"]
        received, window = int(fields["received"]), int(fields["window"])
        resumed = fields.get("resumed", "0") == "1"
        returns = fields.get("reconnects", "1") != "0"
    except (KeyError, ValueError):
        raise ValueError(f"malformed {RESUME_HEADER} header: {value[:100]!r}") from None
    if not (0 < len(session) <= 64 and session.isalnum()):
        raise ValueError(f"bad session id in {RESUME_HEADER}: {session[:70]!r}")
    if not (0 <= received <= _MAX_COUNTER and 0 < window <= 1_000_000):
        raise ValueError(f"out-of-range numbers in {RESUME_HEADER}: {value[:100]!r}")
    return ResumeOffer(session, received, window, resumed, returns)


def sequenced_frame(seq: int, ack: int, text: str) -> str:
    """``text`` (a v1 frame, a JSON object) with ``seq`` and ``ack`` in front."""
    return f'{{"seq":{seq},"ack":{ack},{text[1:]}'


BATCH_PREFIX: Final = '{"batch":'
"""How a batch frame starts (only between peers that agreed on ``batch``)."""
BATCH_CHARS: Final = 60 * 1024
"""Characters of envelopes one batch frame holds at most (a longer one goes alone)."""
BATCH_MIN_FRAME: Final = 64 * 1024
"""The ``max_message_size`` a side needs to offer (or grant) batches: a batch
frame, header and separators included, stays below it."""
MAX_BATCH: Final = BATCH_CHARS // 2
"""Most envelopes one batch frame may announce (each takes at least two characters)."""
_BATCH_HEADER = re.compile(r'\{"batch":(\d{1,6})(?:,"seq":(\d{1,16}),"ack":(\d{1,16}))?\}')


def batch_frames(texts: list[str], first: int | None, ack: int) -> list[str]:
    """``texts`` (v1 frames) as few frames as possible, in order.

    Consecutive texts go in one batch frame of at most :data:`BATCH_CHARS`
    characters: a header line (``{"batch":K,"seq":N,"ack":M}`` in a session,
    where the K envelopes are numbered ``N`` to ``N+K-1``, or ``{"batch":K}``
    without one) and the K envelopes, each on its own line. A text that is too
    long for a batch, or holds a line break (our encoder writes none), goes in
    a frame of its own, as without batches (:func:`sequenced_frame` when
    ``first`` is a number).

    Args:
        texts: the envelopes, in order.
        first: the sequence number of ``texts[0]`` (the rest follow it), or
            None outside a session.
        ack: the acknowledgement the session frames carry (ignored without).
    """
    frames: list[str] = []
    start = 0  # the index in texts of the group's first text
    size = 0  # the group's characters, separators included

    def close(end: int) -> None:
        """Write texts[start:end] as one frame (nothing if empty)."""
        if end - start == 1:
            text = texts[start]
            frames.append(text if first is None else sequenced_frame(first + start, ack, text))
        elif end > start:
            if first is None:
                head = f'{{"batch":{end - start}}}'
            else:
                head = f'{{"batch":{end - start},"seq":{first + start},"ack":{ack}}}'
            frames.append("\n".join([head, *texts[start:end]]))

    for index, text in enumerate(texts):
        alone = len(text) > BATCH_CHARS or "\n" in text
        if alone or size + len(text) > BATCH_CHARS:
            close(index)
            start, size = index, 0
        if alone:
            close(index + 1)
            start = index + 1
            continue
        size += len(text) + 1
    close(len(texts))
    return frames


def split_batch(data: str, *, session: bool) -> tuple[int, int, list[str]]:
    """The ``(first, ack, envelopes)`` of a batch frame (``0, 0`` without a session).

    Raises:
        SessionError: the frame is not a well-formed batch of the kind expected
            (its header, or its count of envelopes).
    """
    head, _, body = data.partition("\n")
    match = _BATCH_HEADER.fullmatch(head)
    if match is None or (match[2] is not None) != session:
        kind = "a session's" if session else "a sessionless"
        raise SessionError(f"malformed batch header for {kind} batch: {head[:100]!r}")
    count = int(match[1])
    if not 2 <= count <= MAX_BATCH:
        raise SessionError(
            f"a batch must hold 2 to {MAX_BATCH} envelopes; this one announced {count}"
        )
    envelopes = body.split("\n")
    if len(envelopes) != count:
        raise SessionError(f"a batch announced {count} envelopes and holds {len(envelopes)}")
    if not session:
        return 0, 0, envelopes
    first = int(match[2])
    if first < 1 or first + count - 1 > _MAX_COUNTER:
        raise SessionError(f"a batch numbered from {first} is out of range")
    return first, int(match[3]), envelopes


def ack_frame(ack: int) -> str:
    """A control frame carrying only an acknowledgement."""
    return f'{{"ctl":"ack","ack":{ack}}}'


_REFUSED_PREFIX: Final = '{"ctl":"refused",'
MAX_REFUSAL_REASON: Final = 200
"""Characters of a refusal's reason sent to the peer (the rest is cut)."""


def refusal_frame(seq: int, reason: str) -> str:
    """A control frame saying that message ``seq`` was refused, and why."""
    return orjson.dumps(
        {"ctl": "refused", "seq": seq, "reason": reason[:MAX_REFUSAL_REASON]}
    ).decode()


def parse_refusal(data: str) -> tuple[int, str] | None:
    """The ``(seq, reason)`` of a refusal frame; None if ``data`` is not one.

    Raises:
        SessionError: it says it is a refusal but is malformed.
    """
    if not data.startswith(_REFUSED_PREFIX):
        return None
    try:
        frame = orjson.loads(data)
        seq, reason = frame["seq"], frame["reason"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise SessionError(f"malformed refusal frame: {data[:100]!r}") from None
    if type(seq) is not int or not (0 < seq <= _MAX_COUNTER) or not isinstance(reason, str):
        raise SessionError(f"malformed refusal frame: {data[:100]!r}")
    return seq, reason[:MAX_REFUSAL_REASON]


def split_frame(data: str) -> tuple[int | None, int | None]:
    """The ``(seq, ack)`` of a frame: ``(None, ack)`` for an ack frame, ``(None, None)`` else."""
    if data.startswith('{"seq":'):
        # By hand, the hot path: {"seq":N,"ack":M, with N and M 1 to 16 digits.
        comma = data.find(',"ack":', 7, 30)  # 7 + 16 digits + the 7 of ,"ack":
        end = data.find(",", comma + 7, comma + 24) if comma > 0 else -1
        seq, ack = data[7:comma], data[comma + 7 : end]
        if end > 0 and seq.isdigit() and ack.isdigit() and seq.isascii() and ack.isascii():
            return int(seq), int(ack)
        return None, None
    elif data.startswith('{"ctl":'):
        match = _ACK.fullmatch(data)
        if match is not None:
            return None, int(match[1])
    return None, None


_EMPTY: deque[Any] = deque(maxlen=0)
"""The buffer of every window that holds nothing, never appended to.

A deque is 760 bytes even when empty, and an idle session has three: each
is made when the first item comes and dropped once empty again.
"""


@attrs.define
class SendWindow(Generic[T]):
    """Our outgoing direction: numbering, the window and the replay buffer.

    Items are numbered when first written and kept until the peer
    acknowledges them; at most ``window`` are out at once.
    """

    window: int
    last_seq: int = 0
    acked: int = 0
    _unacked: deque[tuple[int, T]] = attrs.field(default=_EMPTY)
    _resend: deque[tuple[int, T]] = attrs.field(default=_EMPTY)

    def __len__(self) -> int:
        return len(self._unacked)

    def items(self) -> Iterator[T]:
        """The unacknowledged items, oldest first."""
        return (item for _, item in self._unacked)

    @property
    def open(self) -> bool:
        """Whether a new item may be numbered and written now."""
        return len(self._unacked) < self.window

    def number(self, item: T) -> int:
        """Number ``item`` and keep it until acknowledged."""
        self.last_seq += 1
        if self._unacked is _EMPTY:
            self._unacked = deque()
        self._unacked.append((self.last_seq, item))
        return self.last_seq

    def get(self, seq: int) -> T | None:
        """The unacknowledged item numbered ``seq``, if it is still kept."""
        if not self._unacked or not (self._unacked[0][0] <= seq <= self.last_seq):
            return None
        return self._unacked[seq - self._unacked[0][0]][1]

    def acknowledge(self, ack: int) -> bool:
        """The peer consumed every item up to ``ack``; True if the window moved.

        Raises:
            SessionError: ``ack`` is beyond what was sent.
        """
        if ack > self.last_seq:
            raise SessionError(
                f"acknowledgement {ack} beyond the last message sent ({self.last_seq})"
            )
        if ack <= self.acked:
            return False
        self.acked = ack
        while self._unacked and self._unacked[0][0] <= ack:
            self._unacked.popleft()
        if not self._unacked:
            self._unacked = _EMPTY
        return True

    def resume(self, peer_received: int, window: int) -> None:
        """A new transport: resend what the peer has not received, in order.

        Raises:
            SessionError: the peer claims more than was sent.
        """
        if peer_received > self.last_seq:
            raise SessionError(
                f"the peer says it received {peer_received} messages; {self.last_seq} were sent"
            )
        self.window = window
        self._resend = (
            deque(entry for entry in self._unacked if entry[0] > peer_received)
            if self._unacked and self.last_seq > peer_received
            else _EMPTY
        )

    @property
    def resending(self) -> bool:
        """Whether items wait to be written again after a reconnect."""
        return bool(self._resend)

    def next_resend(self) -> tuple[int, T] | None:
        """The next item to write again after a reconnect, if any."""
        if not self._resend:
            return None
        entry = self._resend.popleft()
        if not self._resend:
            self._resend = _EMPTY
        return entry

    def restart(self) -> list[T]:
        """The peer lost the session: start numbering afresh; return what was unacknowledged."""
        lost = [item for _, item in self._unacked]
        self._unacked = self._resend = _EMPTY
        self.last_seq = self.acked = 0
        return lost


@attrs.define
class ReceiveWindow:
    """Our incoming direction: duplicates, order and cumulative acknowledgement."""

    window: int
    received: int = 0
    consumed: int = 0
    announced: int = 0
    _pending: deque[int] = attrs.field(default=_EMPTY)
    _done: set[int] = attrs.field(factory=set)

    def accept(self, seq: int) -> bool:
        """A message numbered ``seq`` arrived; False for a duplicate to drop.

        Raises:
            SessionError: a gap in the sequence, or more than ``window`` unconsumed.
        """
        if seq <= self.received:
            return False
        if seq != self.received + 1:
            raise SessionError(
                f"message {seq} arrived after {self.received}: the sequence has a gap"
            )
        if len(self._pending) >= self.window:
            raise SessionError(f"the peer sent beyond the window of {self.window} messages")
        self.received = seq
        if self._pending is _EMPTY:
            self._pending = deque()
        self._pending.append(seq)
        return True

    def consume(self, seq: int) -> None:
        """The message ``seq`` left our buffers (delivered, or dropped on purpose)."""
        if seq <= self.consumed:
            return
        pending = self._pending
        if not self._done and pending and pending[0] == seq:
            pending.popleft()  # the usual case: consumed in the order received
            self.consumed = seq
        else:
            self._done.add(seq)
            while pending and pending[0] in self._done:
                self._done.discard(pending.popleft())
                self.consumed += 1
        if not pending:
            self._pending = _EMPTY

    @property
    def ack_due(self) -> bool:
        """Whether an acknowledgement should go out now, even without data to carry it.

        At a quarter of the window, so that a sender that filled it resumes
        well before the receiver runs dry.
        """
        return self.consumed - self.announced >= max(1, self.window // 4)

    def announce(self) -> int:
        """The acknowledgement to send now (and remember it was sent)."""
        self.announced = self.consumed
        return self.consumed

    def restart(self) -> None:
        """The peer lost the session: numbering starts afresh."""
        self.received = self.consumed = self.announced = 0
        self._pending = _EMPTY
        self._done.clear()
