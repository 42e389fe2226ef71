"""How a delegator orders its candidates: the strategy protocol and five strategies.

A strategy sees only candidates that already passed the filters (required
capabilities, healthy, not draining, not this node, not excluded): capability
requirements never merely lower a score. It returns them best first; the
delegator tries them in that order within a round. Everything here is sans-IO:
no trio, no clock; randomness comes from an injected :class:`random.Random`.
"""

from __future__ import annotations

import bisect
import hashlib
import operator
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol, runtime_checkable

import attrs

from .._wire._messages import Task

__all__ = [
    "AFFINITY_KEY",
    "STRATEGIES",
    "TIER_LEVELS",
    "Candidate",
    "CapabilityScore",
    "ConsistentHash",
    "LeastLoaded",
    "PowerOfTwoChoices",
    "RoundRobin",
    "Strategy",
    "choose",
    "make_strategy",
]

AFFINITY_KEY: Final = "affinity"
"""The key of ``task.metadata`` whose value :class:`ConsistentHash` hashes (else the task id)."""
TIER_LEVELS: Final[dict[str, int]] = {
    "free": 0,
    "basic": 1,
    "standard": 2,
    "premium": 3,
    "enterprise": 4,
}
"""The numeric level of a named registry tier, for :class:`CapabilityScore`."""


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
        tier: its registry tier (``"standard"`` when unknown).
        success_rate: the share of this node's recent tasks on it that
            completed (None: no recent outcome).
    """

    id: str
    capabilities: tuple[str, ...] = ()
    current_sessions: int = 0
    max_sessions: int = 0
    in_flight: int = 0
    latency: float | None = None
    tier: str = "standard"
    success_rate: float | None = None

    @property
    def load(self) -> float:
        """Its load: registry sessions plus our in-flight, over its maximum if known."""
        busy = self.current_sessions + self.in_flight
        return busy / self.max_sessions if self.max_sessions > 0 else float(busy)


@runtime_checkable
class Strategy(Protocol):
    """Orders candidates for a task, best first: what ``strategy=`` takes.

    Implement :attr:`name` and :meth:`order` and pass an instance as
    ``strategy=`` to :meth:`~trio_federation.FederationNode.delegate`,
    :meth:`~trio_federation.FederationNode.open_delegation` or
    :func:`~trio_federation.open_federation_node`. A strategy is sans-IO:
    :meth:`order` is synchronous, does no I/O and reads no clock (it runs
    once per round of attempts, in the delegating task); keep any state
    (a turn, a ring) on the instance, and take randomness as an injected
    :class:`random.Random`. The candidates it gets are never empty, already
    filtered (required capabilities, health, draining, ``exclude``), and
    sorted by id; it returns any ordering of them (leaving one out means it
    is not tried in this round). ``prefer=`` is applied after it.
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
    """The candidate with the lowest :attr:`Candidate.load` first.

    Ties (equal load, equal tasks in flight from us) are broken in turn, as
    round-robin would: idle peers share the work instead of the first by id
    taking all of it.
    """

    name = "least-loaded"

    def __init__(self) -> None:
        self._turn = 0

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """Sort by load, then by tasks in flight from us; ties in turn."""
        start = self._turn % len(candidates)
        self._turn += 1
        rotated = [*candidates[start:], *candidates[:start]]
        return sorted(rotated, key=lambda c: (c.load, c.in_flight))


class PowerOfTwoChoices:
    """``random``: two candidates drawn at random, the less loaded first.

    The power of two choices: nearly as even as least-loaded, without every
    delegator herding onto the same idle peer. The rest follow in random
    order (the next tries of the round).

    Args:
        rng: the source of randomness (for reproducible tests).
    """

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """Shuffle; of the first two, the less loaded (then fewer in flight) goes first."""
        shuffled = list(candidates)
        self._rng.shuffle(shuffled)
        if len(shuffled) >= 2:
            first, second = shuffled[0], shuffled[1]
            if (second.load, second.in_flight) < (first.load, first.in_flight):
                shuffled[0], shuffled[1] = second, first
        return shuffled


def _tier_level(tier: str) -> int:
    try:
        return int(tier)
    except ValueError:
        return TIER_LEVELS.get(tier.lower(), 0)


_PRIORITY_BONUS: Final = {"critical": 10.0, "high": 7.0, "medium": 4.0, "low": 0.0}


class CapabilityScore:
    """The daemon's scorer (``TaskDelegator.scoreOrchestrator``), plus latency and success.

    Highest score first (ties: lower load, then in turn, as
    :class:`LeastLoaded`). The score of a
    candidate for a task, as the TypeScript daemon computes it:

    - *capability match*, at most 50: 20 if its capabilities name the task's
      ``type``, and 2 per capability it has, at most 10; then plus 2 per
      *tier* level (:data:`TIER_LEVELS`, or a numeric tier). The daemon also
      adds 20 times the share of the required capabilities a candidate has:
      here every candidate has them all (candidates are filtered first), so
      that term is the same for all and left out;
    - *load*, at most 30: ``30 * (1 - load)`` with :attr:`Candidate.load` as
      a fraction of its maximum (``30 / (1 + busy)`` when the maximum is
      unknown);
    - *availability*, 10 (every candidate is available), and the task's
      *priority* bonus (critical 10, high 7, medium 4, low 0) — the same for
      every candidate, kept so the figures stay comparable;

    and what the daemon leaves out, measured by this node:

    - *latency*, at most 10: ``10 * 0.01 / (0.01 + latency)`` (10 ms scores 5;
      unmeasured scores 5);
    - *recent success*, at most 10: ``10 * success_rate`` (none yet scores 5).
    """

    name = "capability-score"

    def score(self, task: Task, candidate: Candidate) -> float:
        """The candidate's score for ``task`` (higher is better)."""
        capabilities = set(candidate.capabilities)
        match = 20.0 if str(task.type) in capabilities else 0.0
        match += min(2.0 * len(capabilities), 10.0)
        match = min(match, 50.0) + 2.0 * _tier_level(candidate.tier)
        if candidate.max_sessions > 0:
            load_score = max(0.0, 30.0 * (1.0 - candidate.load))
        else:
            load_score = 30.0 / (1.0 + candidate.load)
        availability = 10.0
        priority = _PRIORITY_BONUS.get(str(task.priority), 0.0)
        latency = 5.0 if candidate.latency is None else 0.1 / (0.01 + max(candidate.latency, 0.0))
        rate = candidate.success_rate
        success = 5.0 if rate is None else 10.0 * min(max(rate, 0.0), 1.0)
        return match + load_score + availability + priority + latency + success

    def __init__(self) -> None:
        self._turn = 0

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """Highest :meth:`score` first; ties by lower load, then in turn."""
        start = self._turn % len(candidates)
        self._turn += 1
        rotated = [*candidates[start:], *candidates[:start]]
        return sorted(rotated, key=lambda c: (-self.score(task, c), c.load))


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class ConsistentHash:
    """``consistent-hash``: a hash ring with virtual nodes, for affinity.

    The key is ``task.metadata["affinity"]`` when given, else the task id.
    Each candidate holds ``virtual_nodes`` points on a 64-bit ring (BLAKE2b
    of ``"{id}#{i}"``); a key goes to the owner of the first point at or
    after its hash, and the next distinct owners along the ring follow (the
    next tries). The same key goes to the same peer while the candidates
    stay the same; when a peer joins or leaves, only the keys it takes or
    held move — about 1/N of them.

    Args:
        virtual_nodes: points per candidate (more: a more even spread).
    """

    name = "consistent-hash"

    MAX_CACHED_PEERS: Final = 4096
    """Peers whose ring points are kept between calls."""

    def __init__(self, virtual_nodes: int = 150) -> None:
        if isinstance(virtual_nodes, bool) or not isinstance(virtual_nodes, int):
            raise TypeError(f"virtual_nodes must be an int, got {virtual_nodes!r}")
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be at least 1, got {virtual_nodes}")
        self.virtual_nodes = virtual_nodes
        self._points: dict[str, list[int]] = {}
        self._ring_ids: frozenset[str] = frozenset()
        self._ring: list[tuple[int, str]] = []
        self._positions: list[int] = []

    @staticmethod
    def key(task: Task) -> str:
        """The key a task is placed by: its affinity, else its id."""
        affinity = (task.metadata or {}).get(AFFINITY_KEY)
        return task.id if affinity is None else str(affinity)

    def _points_of(self, peer: str) -> list[int]:
        points = self._points.get(peer)
        if points is None:
            if len(self._points) >= self.MAX_CACHED_PEERS:
                self._points.clear()
            points = [_hash(f"{peer}#{i}") for i in range(self.virtual_nodes)]
            self._points[peer] = points
        return points

    def _build(self, ids: frozenset[str]) -> None:
        if ids == self._ring_ids and self._ring:
            return
        self._ring = sorted((point, peer) for peer in ids for point in self._points_of(peer))
        self._positions = [point for point, _ in self._ring]
        self._ring_ids = ids

    def order(self, task: Task, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """The key's owner on the ring first, then the next distinct owners."""
        by_id = {c.id: c for c in candidates}
        self._build(frozenset(by_id))
        start = bisect.bisect_left(self._positions, _hash(self.key(task)))
        ring = self._ring
        ordered: dict[str, Candidate] = {}
        for index in range(len(ring)):
            peer = ring[(start + index) % len(ring)][1]
            if peer not in ordered:
                ordered[peer] = by_id[peer]
                if len(ordered) == len(by_id):
                    break
        return list(ordered.values())


STRATEGIES: Final[dict[str, Callable[[], Strategy]]] = {
    RoundRobin.name: RoundRobin,
    LeastLoaded.name: LeastLoaded,
    CapabilityScore.name: CapabilityScore,
    PowerOfTwoChoices.name: PowerOfTwoChoices,
    ConsistentHash.name: ConsistentHash,
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


_candidate_id: Final = operator.attrgetter("id")


def choose(
    task: Task,
    candidates: Iterable[Candidate],
    strategy: Strategy,
    *,
    required: Iterable[str] = (),
    prefer: Sequence[str] = (),
    exclude: Iterable[str] = (),
    sticky: str | None = None,
) -> list[str]:
    """The ids to try for ``task``, in order: the delegator's whole choice, sans-IO.

    Candidates without every ``required`` capability, and those in
    ``exclude``, are filtered out first (never merely scored down); ``strategy``
    orders the rest (sorted by id when it gets them); then those in ``prefer``
    that are present move to the front in the given order, and before them
    ``sticky`` (the executor a repeat of this task id went to), if present.
    The caller filters health and draining before (they are not on a
    :class:`Candidate`).
    """
    needed = set(required)
    excluded = set(exclude)
    if needed or excluded:
        eligible = [
            c for c in candidates if c.id not in excluded and needed.issubset(c.capabilities)
        ]
    else:
        eligible = list(candidates)
    if not eligible:
        return []
    eligible.sort(key=_candidate_id)
    ordered = [c.id for c in strategy.order(task, eligible)]
    front = [p for p in prefer if p in ordered]
    if sticky is not None and sticky in ordered:
        front.insert(0, sticky)
    if front:
        ordered = [*front, *ordered]
    return list(dict.fromkeys(ordered))
