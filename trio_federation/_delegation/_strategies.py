"""How a delegator orders its candidates: the strategy protocol and two strategies.

A strategy sees only candidates that already passed the filters (required
capabilities, healthy, not draining, not this node, not excluded): capability
requirements never merely lower a score. It returns them best first; the
delegator tries them in that order within a round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, Protocol, runtime_checkable

import attrs

from .._messages import Task

__all__ = ["STRATEGIES", "Candidate", "LeastLoaded", "RoundRobin", "Strategy", "make_strategy"]


@attrs.frozen(kw_only=True)
class Candidate:
    """A peer a task could go to, with what a strategy may weigh.

    Attributes:
        id: the peer's orchestrator id.
        capabilities: what it announced.
        current_sessions: tasks it runs, as its registry record last said
            (0 for a static peer).
        max_sessions: its ``max_concurrent_tasks`` (0: unknown).
        in_flight: tasks this node has delegated to it and not seen end.
        latency: the measured round-trip time of our connection, in
            seconds (None: not measured yet).
    """

    id: str
    capabilities: tuple[str, ...] = ()
    current_sessions: int = 0
    max_sessions: int = 0
    in_flight: int = 0
    latency: float | None = None

    @property
    def load(self) -> float:
        """Its load: registry sessions plus our in-flight, over its maximum if known."""
        busy = self.current_sessions + self.in_flight
        return busy / self.max_sessions if self.max_sessions > 0 else float(busy)


@runtime_checkable
class Strategy(Protocol):
    """Orders candidates for a task, best first.

    Implement :meth:`order` (synchronous, no I/O: it runs on every attempt
    round) and pass an instance as ``strategy=`` to
    :meth:`~trio_federation.FederationNode.delegate` or
    :func:`~trio_federation.open_federation_node`. The candidates are never
    empty, already filtered, and sorted by id; return any ordering of them
    (leaving one out means it is not tried in this round).
    """

    @property
    def name(self) -> str:
        """A short name for logs."""
        ...

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """The candidates to try for ``task``, best first."""
        ...


class RoundRobin:
    """Each task starts with the next candidate in turn (by id)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._turn = 0

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """Rotate the candidates by one more place each call."""
        start = self._turn % len(candidates)
        self._turn += 1
        return [*candidates[start:], *candidates[:start]]


class LeastLoaded:
    """The candidate with the lowest :attr:`Candidate.load` first (ties by id)."""

    name = "least-loaded"

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """Sort by load, then by tasks in flight from us, then by id."""
        return sorted(candidates, key=lambda c: (c.load, c.in_flight, c.id))


STRATEGIES: Final[dict[str, Callable[[], Strategy]]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
}
"""Strategies by the name ``strategy=`` accepts."""


def make_strategy(strategy: str | Strategy) -> Strategy:
    """A strategy from its name, or the given instance.

    Raises:
        ValueError: an unknown name.
        TypeError: neither a name nor a :class:`Strategy`.
    """
    if isinstance(strategy, str):
        try:
            return STRATEGIES[strategy]()
        except KeyError:
            names = ", ".join(sorted(STRATEGIES))
            raise ValueError(f"unknown strategy {strategy!r} (one of: {names})") from None
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a name or a Strategy, got {type(strategy).__name__}")
    return strategy
