"""The delegating side, sans-IO: one delegation's lifecycle, attempts and backoff.

No trio here. Time enters as ``now`` (seconds on any monotonic clock) and
randomness through an injected :class:`random.Random`, so every transition is
a plain synchronous test. The trio shell (``_node``) feeds it what happened
on the wire and does what it answers.

Every transition lives in :data:`TRANSITIONS`: (state, event) -> next state.
An event that is not in the table for the current state is *illegal*: the
machine refuses it (an :class:`Illegal` answer) and nothing changes.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from .._exceptions import FederationError
from .._wire._messages import CallbackStatus, DelegationResponse, TaskCallback

__all__ = [
    "HAND_BACK_ERRORS",
    "TRANSITIONS",
    "Backoff",
    "DelegationAttempt",
    "DelegationFailed",
    "DelegationLifecycle",
    "DelegationStatus",
    "Dispatch",
    "GiveUp",
    "Illegal",
    "TaskAccepted",
    "TaskCompleted",
    "TaskFailed",
    "TaskFailedOver",
    "TaskProgress",
    "Wait",
]


class DelegationStatus(enum.StrEnum):
    """Where a delegation stands, as its delegator sees it."""

    PENDING = "pending"
    """Sent (or about to be) to a candidate; no answer yet."""
    ACCEPTED = "accepted"
    """The assignee accepted it."""
    REJECTED = "rejected"
    """The last attempt found no executor (a refusal, an unreachable or lost
    one, or no candidate at all); final once every attempt is spent, when the
    delegation raises :exc:`~trio_federation.DelegationFailed` (and counts in
    ``NodeStatistics.failed``)."""
    IN_PROGRESS = "in_progress"
    """The assignee reported progress."""
    COMPLETED = "completed"
    """Final: the assignee returned a result."""
    FAILED = "failed"
    """Final: the task failed where it ran (its executor reported ``failed``)."""
    CANCELLED = "cancelled"
    """Final: the delegator's scope was cancelled."""
    TIMEOUT = "timeout"
    """Final: the delegator's deadline passed."""


FINAL: Final = frozenset(
    {
        DelegationStatus.COMPLETED,
        DelegationStatus.FAILED,
        DelegationStatus.CANCELLED,
        DelegationStatus.TIMEOUT,
    }
)
"""States no event leaves (a rejected delegation is final only when given up)."""

HAND_BACK_ERRORS: Final = frozenset({"cancelled", "draining"})
"""``failed`` errors that hand a task back unless this delegator cancelled it."""

_S = DelegationStatus
TRANSITIONS: Final[Mapping[tuple[DelegationStatus, str], DelegationStatus]] = {
    # A candidate answers the delegation.
    (_S.PENDING, "accepted"): _S.ACCEPTED,
    (_S.PENDING, "refused"): _S.REJECTED,
    (_S.PENDING, "unreachable"): _S.REJECTED,
    # The next attempt (after a refusal, a hand-back or a lost executor).
    (_S.REJECTED, "dispatch"): _S.PENDING,
    (_S.PENDING, "dispatch"): _S.PENDING,
    (_S.REJECTED, "give_up"): _S.REJECTED,
    (_S.PENDING, "give_up"): _S.REJECTED,
    # The assignee reports. A v1 peer may skip the acceptance: progress or an
    # outcome while pending accepts implicitly.
    (_S.PENDING, "progress"): _S.IN_PROGRESS,
    (_S.ACCEPTED, "progress"): _S.IN_PROGRESS,
    (_S.IN_PROGRESS, "progress"): _S.IN_PROGRESS,
    (_S.PENDING, "completed"): _S.COMPLETED,
    (_S.ACCEPTED, "completed"): _S.COMPLETED,
    (_S.IN_PROGRESS, "completed"): _S.COMPLETED,
    (_S.PENDING, "failed"): _S.FAILED,
    (_S.ACCEPTED, "failed"): _S.FAILED,
    (_S.IN_PROGRESS, "failed"): _S.FAILED,
    # The executor gave the task back, or was lost: try elsewhere.
    (_S.PENDING, "failed_over"): _S.PENDING,
    (_S.ACCEPTED, "failed_over"): _S.PENDING,
    (_S.IN_PROGRESS, "failed_over"): _S.PENDING,
    # The caller's scope ends it.
    (_S.PENDING, "cancel"): _S.CANCELLED,
    (_S.ACCEPTED, "cancel"): _S.CANCELLED,
    (_S.IN_PROGRESS, "cancel"): _S.CANCELLED,
    (_S.REJECTED, "cancel"): _S.CANCELLED,
    (_S.PENDING, "timeout"): _S.TIMEOUT,
    (_S.ACCEPTED, "timeout"): _S.TIMEOUT,
    (_S.IN_PROGRESS, "timeout"): _S.TIMEOUT,
    (_S.REJECTED, "timeout"): _S.TIMEOUT,
}


@attrs.frozen(kw_only=True)
class DelegationAttempt:
    """One try of a delegation, as listed by :attr:`DelegationFailed.attempts`.

    Attributes:
        peer: the candidate tried (None: the round found no candidate).
        outcome: ``"refused"``, ``"unreachable"``, ``"no_candidate"``,
            ``"handed_back"``, ``"lost"``, ``"completed"``, ``"failed"``,
            ``"cancelled"``, ``"timeout"`` or ``"max_depth"``.
        reason: the refusal reason or error text, if any.
    """

    peer: str | None
    outcome: str
    reason: str | None = None


class DelegationFailed(FederationError):
    """A delegation ended without a result.

    Raised by :meth:`FederationNode.delegate <trio_federation.FederationNode.delegate>`
    and by ``await delegation.result()``: the task failed where it ran (the
    last attempt's ``reason`` is the executor's error), or every attempt was
    refused, unreachable or found no candidate.

    Attributes:
        task_id: the task.
        attempts: every try, oldest first.
    """

    def __init__(self, task_id: str, attempts: Sequence[DelegationAttempt]) -> None:
        super().__init__(task_id, tuple(attempts))
        self.task_id = task_id
        self.attempts: tuple[DelegationAttempt, ...] = tuple(attempts)

    def __str__(self) -> str:
        tries = "; ".join(
            f"{a.peer or '(no candidate)'}: {a.outcome}" + (f" ({a.reason})" if a.reason else "")
            for a in self.attempts
        )
        count = len(self.attempts)
        return f"delegating {self.task_id!r} failed after {count} attempt(s): {tries}"


# -- the events a delegation's reader sees -------------------------------------------


@attrs.frozen(kw_only=True)
class TaskAccepted:
    """The executor ``peer`` accepted the task."""

    peer: str


@attrs.frozen(kw_only=True)
class TaskProgress:
    """Progress reported by the executor (``percent`` usually 0-100)."""

    peer: str
    percent: float | None
    message: str | None = None


@attrs.frozen(kw_only=True)
class TaskFailedOver:
    """The executor ``peer`` gave the task back or was lost; it is tried elsewhere."""

    peer: str
    reason: str


@attrs.frozen(kw_only=True)
class TaskCompleted:
    """Final: the executor ``peer`` returned ``result``."""

    peer: str
    result: Any


@attrs.frozen(kw_only=True)
class TaskFailed:
    """Final: the delegation failed; ``error`` is the :exc:`DelegationFailed`."""

    error: DelegationFailed


DelegationUpdate = TaskAccepted | TaskProgress | TaskFailedOver | TaskCompleted | TaskFailed
"""What ``async for update in delegation`` yields."""


# -- what the machine tells the shell to do -------------------------------------------


@attrs.frozen
class Dispatch:
    """Send the delegation to ``peer`` now."""

    peer: str


@attrs.frozen
class Wait:
    """Nothing to try before ``until``: sleep, then ask again."""

    until: float


@attrs.frozen
class GiveUp:
    """Every attempt is spent: the delegation failed with ``error``."""

    error: DelegationFailed


@attrs.frozen
class Illegal:
    """A callback refused by the state machine (nothing changed)."""

    reason: str


Step = Dispatch | Wait | GiveUp


@attrs.frozen(kw_only=True)
class Backoff:
    """Exponential backoff with full jitter between rounds of attempts.

    Before round ``n`` (from 1, after the ``n``-th round in which every
    candidate refused or none existed) the delegator waits a random time
    between 0 and ``min(max_delay, initial_delay * multiplier**(n-1))``.

    Attributes:
        initial_delay: the ceiling of the first wait, in seconds.
        multiplier: its growth from one round to the next.
        max_delay: the highest ceiling, in seconds.
    """

    initial_delay: float = attrs.field(default=0.05, validator=attrs.validators.gt(0))
    multiplier: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    max_delay: float = attrs.field(default=2.0, validator=attrs.validators.gt(0))

    def ceiling(self, round_number: int) -> float:
        """The longest wait before round ``round_number`` (1 for the first retry)."""
        exponent = min(max(round_number - 1, 0), 64)
        return min(self.max_delay, self.initial_delay * self.multiplier**exponent)

    def delay(self, round_number: int, rng: random.Random) -> float:
        """A wait before round ``round_number``, drawn with full jitter."""
        return rng.uniform(0.0, self.ceiling(round_number))


class DelegationLifecycle:
    """One delegation's checked state machine, its attempts and its retries.

    Args:
        task_id: the task delegated.
        max_attempts: tries in all (a round without candidates counts as one).
        backoff: the waits between rounds.
        rng: the source of jitter.
    """

    def __init__(
        self,
        task_id: str,
        *,
        max_attempts: int = 5,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise TypeError(f"max_attempts must be an int, got {max_attempts!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.task_id = task_id
        self.max_attempts = max_attempts
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self.status = DelegationStatus.PENDING
        self.assignee: str | None = None
        self.attempts: list[DelegationAttempt] = []
        self.cancel_requested = False
        self.illegal = 0
        """Callbacks refused so far."""
        self._tried: set[str] = set()  # candidates tried in this round
        self._rounds = 0  # rounds finished without success
        self._not_before = 0.0
        self._result: Any = None
        self._error: DelegationFailed | None = None
        self._settled = False  # the executor answered our cancel

    # -- state ----------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the delegation has its final outcome."""
        return self.status in FINAL or self._error is not None

    @property
    def result(self) -> Any:
        """The result of a completed delegation.

        Raises:
            DelegationFailed: it failed, was given up, cancelled or timed out.
            RuntimeError: it is not over yet.
        """
        if self.status is DelegationStatus.COMPLETED:
            return self._result
        if self._error is not None:
            raise self._error
        raise RuntimeError(f"the delegation of {self.task_id!r} is still {self.status}")

    def _move(self, event: str) -> DelegationStatus:
        """Take the transition for ``event``; the caller checked it is legal."""
        self.status = TRANSITIONS[(self.status, event)]
        return self.status

    def _legal(self, event: str) -> bool:
        return (self.status, event) in TRANSITIONS

    def _fail(self, attempt: DelegationAttempt | None = None) -> DelegationFailed:
        if attempt is not None:
            self.attempts.append(attempt)
        self._error = DelegationFailed(self.task_id, self.attempts)
        return self._error

    # -- choosing the next candidate ------------------------------------------

    def next_step(self, candidates: Sequence[str], now: float) -> Step:
        """What to do next, given the candidates in the strategy's order.

        Candidates already tried in this round are skipped. A round with no
        candidate left ends: if it found none at all it counts as an attempt;
        then, attempts permitting, the next round starts after a backoff.

        Raises:
            RuntimeError: the delegation is over, or is with an executor.
        """
        if self.done or self.status not in (DelegationStatus.PENDING, DelegationStatus.REJECTED):
            raise RuntimeError(f"no next attempt for a delegation that is {self.status}")
        if self.assignee is not None and self.status is DelegationStatus.PENDING:
            raise RuntimeError(f"the delegation of {self.task_id!r} waits for {self.assignee!r}")
        if len(self.attempts) >= self.max_attempts:
            return self._give_up()
        if now < self._not_before:
            return Wait(self._not_before)
        for peer in candidates:
            if peer not in self._tried:
                self._tried.add(peer)
                self.assignee = peer
                self._move("dispatch")
                return Dispatch(peer)
        if not self._tried:
            self.attempts.append(DelegationAttempt(peer=None, outcome="no_candidate"))
        self._tried.clear()
        self._rounds += 1
        if len(self.attempts) >= self.max_attempts:
            return self._give_up()
        self._not_before = now + self._backoff.delay(self._rounds, self._rng)
        return Wait(self._not_before)

    def _give_up(self) -> GiveUp:
        self._move("give_up")
        return GiveUp(self._fail())

    def unreachable(self, peer: str, reason: str) -> None:
        """The dispatch to ``peer`` failed: it could not be reached."""
        self._check_assignee(peer, "unreachable")
        self.attempts.append(DelegationAttempt(peer=peer, outcome="unreachable", reason=reason))
        self.assignee = None
        self._move("unreachable")

    def _check_assignee(self, peer: str, event: str) -> None:
        if peer != self.assignee or not self._legal(event):
            raise RuntimeError(f"{event} from {peer!r} while {self.status} with {self.assignee!r}")

    # -- what arrives from the wire -------------------------------------------

    def receive_response(
        self, peer: str, response: DelegationResponse
    ) -> TaskAccepted | DelegationAttempt | Illegal | None:
        """An acceptance or refusal from ``peer``.

        Returns the :class:`TaskAccepted` event, the refused
        :class:`DelegationAttempt` (ask :meth:`next_step` next), an
        :class:`Illegal` refusal, or None for an echo this machine ignores
        (an acceptance after a cancel).
        """
        if response.task_id != self.task_id:
            return self._illegal(f"a response for {response.task_id!r}")
        if peer != self.assignee:
            return self._illegal(f"a response from {peer!r}, not the assignee {self.assignee!r}")
        if self.status in (DelegationStatus.CANCELLED, DelegationStatus.TIMEOUT):
            return None
        event = "accepted" if response.accepted else "refused"
        if not self._legal(event):
            return self._illegal(f"{event} while {self.status}")
        self._move(event)
        if response.accepted:
            return TaskAccepted(peer=peer)
        attempt = DelegationAttempt(peer=peer, outcome="refused", reason=response.reason)
        self.attempts.append(attempt)
        self.assignee = None
        return attempt

    def receive_callback(
        self, peer: str, callback: TaskCallback
    ) -> TaskProgress | TaskFailedOver | TaskCompleted | TaskFailed | Illegal | None:
        """A progress report or an outcome from ``peer``.

        Returns the event for the caller, an :class:`Illegal` refusal, or
        None for the executor's answer to our own cancel (expected, not shown).
        After a :class:`TaskFailedOver` ask :meth:`next_step`.
        """
        if callback.task_id != self.task_id:
            return self._illegal(f"a callback for {callback.task_id!r}")
        if peer != self.assignee:
            return self._illegal(f"a callback from {peer!r}, not the assignee {self.assignee!r}")
        status = callback.status
        if self.status in (DelegationStatus.CANCELLED, DelegationStatus.TIMEOUT):
            if status in (CallbackStatus.COMPLETED, CallbackStatus.FAILED) and not self._settled:
                self._settled = True  # the executor's last word after our cancel
                return None
            return self._illegal(f"{status} after the delegation was {self.status}")
        if status is CallbackStatus.PROGRESS:
            if not self._legal("progress"):
                return self._illegal(f"progress while {self.status}")
            self._move("progress")
            message = (callback.metadata or {}).get("message")
            return TaskProgress(
                peer=peer,
                percent=callback.progress,
                message=message if isinstance(message, str) else None,
            )
        if status is CallbackStatus.COMPLETED:
            if not self._legal("completed"):
                return self._illegal(f"completed while {self.status}")
            self._move("completed")
            self.attempts.append(DelegationAttempt(peer=peer, outcome="completed"))
            self._result = callback.result
            return TaskCompleted(peer=peer, result=callback.result)
        if status is CallbackStatus.FAILED:
            if not self._legal("failed"):
                return self._illegal(f"failed while {self.status}")
            error = callback.error or "failed"
            if error in HAND_BACK_ERRORS:
                return self.lost(peer, error, outcome="handed_back")
            self._move("failed")
            return TaskFailed(
                error=self._fail(DelegationAttempt(peer=peer, outcome="failed", reason=error))
            )
        return self._illegal(f"a {status} callback")

    def lost(self, peer: str, reason: str, *, outcome: str = "lost") -> TaskFailedOver | Illegal:
        """The assignee ``peer`` gave the task back or is gone; it goes elsewhere.

        The lost executor cannot come back with a stale outcome: it is no
        longer the assignee, so its callbacks are illegal from now on.
        """
        if peer != self.assignee or not self._legal("failed_over"):
            return self._illegal(f"{peer!r} lost while {self.status} with {self.assignee!r}")
        self._move("failed_over")
        self.attempts.append(DelegationAttempt(peer=peer, outcome=outcome, reason=reason))
        self._tried.add(peer)  # not again in this round; a later one may retry it
        self.assignee = None
        return TaskFailedOver(peer=peer, reason=reason)

    def _illegal(self, reason: str) -> Illegal:
        self.illegal += 1
        return Illegal(f"task {self.task_id!r}: {reason}")

    # -- the caller ends it -----------------------------------------------------

    def cancel(self, *, timeout: bool = False) -> str | None:
        """The caller's scope ended the delegation (its deadline if ``timeout``).

        Returns the executor to send a cancel to (None when no executor holds
        the task, or it is over already).
        """
        if self.done:
            return None
        holder = self.assignee if self.status is not DelegationStatus.REJECTED else None
        self._move("timeout" if timeout else "cancel")
        self.cancel_requested = True
        outcome = "timeout" if timeout else "cancelled"
        self._fail(DelegationAttempt(peer=holder, outcome=outcome))
        return holder
