"""The executing side, sans-IO: admission, refusal reasons and the dedupe window.

No trio: time enters as ``now``. The node asks :meth:`Admission.check` what to
do with each delegation, then tells it when a task starts and finishes.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from .._wire._capabilities import unmet_requirement
from .._wire._messages import DelegationRequest, OrchestratorCapabilities, TaskCallback

__all__ = [
    "DEFAULT_DEDUPE_SIZE",
    "DEFAULT_DEDUPE_WINDOW",
    "Admission",
    "Admit",
    "RefusalReason",
    "Refuse",
    "Replay",
    "Running",
    "required_capabilities",
]

DEFAULT_DEDUPE_WINDOW: Final = 600.0
"""Seconds a finished task's id (per origin) is remembered, with its final callback."""
DEFAULT_DEDUPE_SIZE: Final = 4096
"""Finished tasks remembered at most (the oldest are forgotten first)."""


class RefusalReason(enum.StrEnum):
    """Why a node refuses a delegation (the ``reason`` of its DelegationResponse).

    An ``admit(request)`` hook may refuse with a reason of its own too.
    """

    CAPABILITY_MISMATCH = "capability_mismatch"
    """The request requires a capability this node does not have."""
    OVERLOADED = "overloaded"
    """``max_concurrent_tasks`` tasks are running already."""
    DRAINING = "draining"
    """The node is draining: it takes no new tasks."""
    DEADLINE_EXCEEDED = "deadline_exceeded"
    """The request's time budget is already spent."""


@attrs.frozen
class Admit:
    """Run it (after the ``admit`` hook, if any, agrees)."""


@attrs.frozen
class Refuse:
    """Refuse it with ``reason``."""

    reason: str


@attrs.frozen
class Running:
    """A repeat of a task running now: answer ``accepted``, run nothing."""


@attrs.frozen
class Replay:
    """A repeat of a finished task: answer ``accepted`` and send ``final`` again."""

    final: TaskCallback


Decision = Admit | Refuse | Running | Replay


def required_capabilities(request: DelegationRequest) -> tuple[str, ...]:
    """The capability names a request requires (list form, or ``specializations``)."""
    required = request.required_capabilities
    if required is None:
        return ()
    if isinstance(required, OrchestratorCapabilities):
        return tuple(required.specializations or ())
    return tuple(required)


@attrs.frozen
class _Entry:
    final: TaskCallback
    finished_at: float


class Admission:
    """Decides which delegations run, and remembers them for the dedupe window.

    A task is known by (origin, task id). While it runs, a repeat is
    ``Running``; once finished, for ``window`` seconds (and among the last
    ``size`` finished ones) a repeat is ``Replay``: the task runs at most once.

    Args:
        capabilities: this node's capabilities.
        max_concurrent: tasks that may run at once.
        window: seconds a finished task is remembered.
        size: finished tasks remembered at most.
    """

    def __init__(
        self,
        capabilities: Iterable[str],
        max_concurrent: int,
        *,
        window: float = DEFAULT_DEDUPE_WINDOW,
        size: int = DEFAULT_DEDUPE_SIZE,
    ) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise TypeError(f"max_concurrent_tasks must be an int, got {max_concurrent!r}")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent_tasks must be at least 1, got {max_concurrent}")
        if not window > 0:
            raise ValueError(f"the dedupe window must be positive, got {window!r}")
        if size < 1:
            raise ValueError(f"the dedupe size must be at least 1, got {size!r}")
        self.capabilities = frozenset(capabilities)
        self.max_concurrent = max_concurrent
        self.window = window
        self.size = size
        self.draining = False
        self.running = 0
        self.completed = 0
        self.failed = 0
        self._refused: collections.Counter[str] = collections.Counter()
        self._running: set[tuple[str, str]] = set()
        # Finished tasks in the order they finished: the oldest go first.
        self._finished: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()

    @property
    def refused(self) -> Mapping[str, int]:
        """Refusals so far, by reason."""
        return dict(self._refused)

    def check(self, origin: str, request: DelegationRequest, now: float) -> Decision:
        """What to do with ``request`` from ``origin`` (refusals are counted)."""
        self._expire(now)
        key = (origin, request.task.id)
        if key in self._running:
            return Running()
        entry = self._finished.get(key)
        if entry is not None:
            return Replay(entry.final)
        if request.timeout is not None and request.timeout <= 0:
            return self.refuse(RefusalReason.DEADLINE_EXCEEDED)
        if unmet_requirement(
            self.capabilities, request.required_capabilities, max_sessions=self.max_concurrent
        ):
            return self.refuse(RefusalReason.CAPABILITY_MISMATCH)
        if self.draining:
            return self.refuse(RefusalReason.DRAINING)
        if self.running >= self.max_concurrent:
            return self.refuse(RefusalReason.OVERLOADED)
        return Admit()

    def refuse(self, reason: str) -> Refuse:
        """Count a refusal with ``reason`` (also for the ``admit`` hook's)."""
        self._refused[str(reason)] += 1
        return Refuse(str(reason))

    def start(self, origin: str, task_id: str) -> None:
        """An admitted task starts running.

        Raises:
            RuntimeError: it is known already (check first).
        """
        key = (origin, task_id)
        if key in self._running or key in self._finished:
            raise RuntimeError(f"task {task_id!r} from {origin!r} is known already")
        self._running.add(key)
        self.running += 1

    def finish(self, origin: str, task_id: str, final: TaskCallback, now: float) -> None:
        """A task ended with ``final`` (``completed`` or ``failed``); remember it."""
        key = (origin, task_id)
        if key not in self._running:
            state = "finished already" if key in self._finished else "not running"
            raise RuntimeError(f"task {task_id!r} from {origin!r} is {state}")
        self._running.remove(key)
        self.running -= 1
        if final.status == "completed":
            self.completed += 1
        else:
            self.failed += 1
        self._finished[key] = _Entry(final, now)
        self._expire(now)

    def _expire(self, now: float) -> None:
        """Forget finished tasks past the window, and the oldest beyond ``size``."""
        finished = self._finished
        while finished:
            oldest = next(iter(finished.values()))
            if len(finished) <= self.size and now - oldest.finished_at < self.window:
                break
            finished.popitem(last=False)
