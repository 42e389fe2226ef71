"""The delegating side's trio shell: one :class:`Delegation` and its driver.

The decisions are the sans-IO lifecycle's (``_state``); this module sends what
it decides, feeds it what arrives (routed here by the node's pump), and turns
its events into the updates a caller iterates over.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING, Any, Final, Self

import attrs
import trio

from .._exceptions import FederationError
from .._wire._messages import (
    CallbackStatus,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    MessageType,
    Task,
    TaskCallback,
)
from ._state import (
    DelegationAttempt,
    DelegationLifecycle,
    DelegationStatus,
    DelegationUpdate,
    Dispatch,
    GiveUp,
    Illegal,
    TaskAccepted,
    TaskCompleted,
    TaskFailed,
    TaskFailedOver,
    TaskProgress,
    Wait,
)
from ._strategies import Strategy

if TYPE_CHECKING:
    from ._node import FederationNode

__all__ = ["CANCEL_EXTENSION", "HOPS_KEY", "UPDATE_BUFFER", "Delegation"]

logger = logging.getLogger("trio_federation.delegation")

HOPS_KEY: Final = "federationHops"
"""The key of ``task.metadata`` that carries a delegation's hop count."""
CANCEL_EXTENSION: Final = "cancel"
"""The extension (negotiated at the upgrade) that carries a delegator's cancel."""
UPDATE_BUFFER: Final = 64
"""Updates a delegation holds for its reader; beyond it the oldest progress is dropped."""


# -- the delegating side --------------------------------------------------------------


class Delegation:
    """One task being delegated: what ``open_delegation`` yields.

    ``async for update in delegation`` yields the typed updates
    (:class:`~trio_federation.TaskAccepted`,
    :class:`~trio_federation.TaskProgress`,
    :class:`~trio_federation.TaskFailedOver`, then one final
    :class:`~trio_federation.TaskCompleted` or
    :class:`~trio_federation.TaskFailed`) and ends after the final one.
    Progress events come in order; when the reader falls more than
    ``UPDATE_BUFFER`` updates behind, the oldest progress events are dropped
    (never the others).
    """

    def __init__(
        self,
        node: FederationNode,
        task: Task,
        *,
        required: tuple[str, ...],
        strategy: Strategy,
        prefer: tuple[str, ...],
        exclude: frozenset[str],
        max_attempts: int,
        hops: int,
        followed: bool = True,
    ) -> None:
        self._node = node
        # False for delegate(): nobody iterates, so no update is kept.
        self._followed = followed
        self._task = task
        self._required = required
        self._strategy = strategy
        self._prefer = prefer
        self._exclude = exclude
        self._hops = hops
        self._lifecycle = DelegationLifecycle(
            task.id, max_attempts=max_attempts, backoff=node._backoff, rng=node._rng
        )
        self._updates: collections.deque[DelegationUpdate] = collections.deque()
        self._final_seen = False
        self._lot = trio.lowlevel.ParkingLot()
        # Set only when the driver has something to do: dispatch the next
        # attempt (no assignee), or stop (the final outcome).
        self._wake = trio.Event()
        self._done = trio.Event()
        self._settled = trio.Event()
        self._started = trio.current_time()
        self._deadline = trio.current_effective_deadline()
        # The peer counted in the node's in-flight figure for this delegation.
        self._counted: str | None = None
        # Peers found unreachable while the candidates were listed (by id:
        # why); dispatching to one records the attempt without dialing again.
        self._unreachable: dict[str, str] = {}

    @property
    def task_id(self) -> str:
        """The task's id."""
        return self._task.id

    @property
    def assignee(self) -> str | None:
        """The executor that holds the task now (None between attempts)."""
        return self._lifecycle.assignee

    @property
    def status(self) -> DelegationStatus:
        """Where the delegation stands."""
        return self._lifecycle.status

    @property
    def attempts(self) -> tuple[DelegationAttempt, ...]:
        """Every try so far, oldest first."""
        return tuple(self._lifecycle.attempts)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> DelegationUpdate:
        while not self._updates:
            if self._final_seen or self._done.is_set():  # (cancelled: no final update)
                raise StopAsyncIteration
            await self._lot.park()
        update = self._updates.popleft()
        if isinstance(update, TaskCompleted | TaskFailed):
            self._final_seen = True
        return update

    async def result(self) -> Any:
        """Wait for the final outcome and return the task's result.

        Raises:
            DelegationFailed: the task failed where it ran, or every attempt
                was spent; ``attempts`` lists them.
        """
        await self._done.wait()
        return self._lifecycle.result

    # -- fed by the node ------------------------------------------------------

    def _push(self, update: DelegationUpdate) -> None:
        if not self._followed:
            return
        if len(self._updates) >= UPDATE_BUFFER:
            for index, queued in enumerate(self._updates):
                if isinstance(queued, TaskProgress):
                    del self._updates[index]
                    break
        self._updates.append(update)
        self._lot.unpark_all()

    def _finish(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._node._latencies.append(trio.current_time() - self._started)
        self._lot.unpark_all()
        self._wake.set()

    def _count(self) -> None:
        """Keep the node's in-flight figure: the assignee of a delegation not over."""
        lifecycle = self._lifecycle
        self._count_on(None if lifecycle.done else lifecycle.assignee)

    def _release(self) -> None:
        """The delegation leaves the node: it counts nowhere any more."""
        self._count_on(None)

    def _count_on(self, peer: str | None) -> None:
        counted = self._counted
        if peer == counted:
            return
        counts = self._node._in_flight_counts
        if counted is not None:
            left = counts[counted] - 1
            if left:
                counts[counted] = left
            else:
                del counts[counted]
        if peer is not None:
            counts[peer] = counts.get(peer, 0) + 1
        self._counted = peer

    def _wake_driver(self) -> None:
        """Wake the driver if it has something to do (no assignee, or over)."""
        lifecycle = self._lifecycle
        if lifecycle.assignee is None or lifecycle.done:
            self._wake.set()

    def _on_response(self, peer: str, response: DelegationResponse) -> None:
        stats = self._node._stats
        answer = self._lifecycle.receive_response(peer, response)
        if isinstance(answer, Illegal):
            self._node._illegal(answer.reason)
        elif isinstance(answer, TaskAccepted):
            stats["accepted"] += 1
            self._push(answer)
        elif answer is not None:
            stats["rejected"] += 1
            logger.info("%s refused %r: %s", peer, self.task_id, response.reason)
        elif not response.accepted:
            self._settled.set()  # cancelled meanwhile: a refusal is the executor's last word
        self._count()
        self._wake_driver()

    def _on_callback(self, peer: str, callback: TaskCallback) -> None:
        answer = self._lifecycle.receive_callback(peer, callback)
        self._apply(answer)

    def _on_lost(self, peer: str, reason: str) -> None:
        if peer == self._lifecycle.assignee and not self._lifecycle.done:
            self._apply(self._lifecycle.lost(peer, reason))

    def _apply(self, answer: object) -> None:
        stats = self._node._stats
        if answer is None:
            self._settled.set()
        elif isinstance(answer, Illegal):
            self._node._illegal(answer.reason)
        elif isinstance(answer, TaskFailedOver):
            stats["failed_over"] += 1
            if self._lifecycle.attempts[-1].outcome == "lost":  # a hand-back is no fault
                self._node._record_outcome(answer.peer, False)
            self._push(answer)
        elif isinstance(answer, TaskCompleted):
            stats["completed"] += 1
            self._node._record_outcome(answer.peer, True)
            self._push(answer)
            self._finish()
        elif isinstance(answer, TaskFailed):
            stats["failed"] += 1
            last = self._lifecycle.attempts[-1]
            if last.peer is not None:  # pragma: no branch (an executor's failure)
                self._node._record_outcome(last.peer, False)
            self._push(answer)
            self._finish()
        elif isinstance(answer, TaskProgress):
            self._push(answer)
        self._count()
        self._wake_driver()

    async def _drive(self) -> None:
        """Dispatch attempts until the delegation is over.

        Runs in the caller's own task for :meth:`FederationNode.delegate`,
        in the background for ``open_delegation``. It sleeps while an
        assignee holds the task: only a refusal, a lost executor or the final
        outcome wakes it.
        """
        lifecycle = self._lifecycle
        node = self._node
        fresh = False  # read the registry afresh: a round after a backoff
        while not lifecycle.done:
            if lifecycle.assignee is not None:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            candidates = await node._candidates(self, fresh=fresh)
            fresh = False  # once per round
            step = lifecycle.next_step(candidates, trio.current_time())
            if isinstance(step, Dispatch):
                if len(lifecycle.attempts) > 0:
                    node._stats["retries"] += 1
                self._count()
                await self._dispatch(step.peer)
            elif isinstance(step, Wait):
                fresh = True
                self._wake = trio.Event()
                with trio.move_on_at(step.until):
                    await self._wake.wait()  # an early wake-up just asks again
            else:
                assert isinstance(step, GiveUp)
                node._stats["failed"] += 1
                self._push(TaskFailed(error=step.error))
                self._finish()
                await trio.lowlevel.checkpoint()

    async def _dispatch(self, peer: str) -> None:
        node = self._node
        deadline = self._deadline
        budget = None if math.isinf(deadline) else max(0.0, deadline - trio.current_time())
        metadata = dict(self._task.metadata or {})
        metadata[HOPS_KEY] = self._hops
        request = DelegationRequest(
            from_orchestrator_id=node.local_id,
            to_orchestrator_id=peer,
            task=attrs.evolve(self._task, metadata=metadata),
            priority=self._task.priority,
            required_capabilities=self._required or None,
            timeout=budget,
        )
        node._stats["delegations_sent"] += 1
        node._remember_assignee(self.task_id, peer)
        unreachable = self._unreachable.get(peer)
        if unreachable is not None:
            # Found unreachable a moment ago, listing the candidates: not dialed twice.
            logger.info("could not reach %s for %r: %s", peer, self.task_id, unreachable)
            self._lifecycle.unreachable(peer, unreachable)
            self._count()
            node._record_outcome(peer, False)
            return
        try:
            connection = node._live_connection(peer)
            if connection is None:
                connection = await node._connection_for(peer)
                if self._lifecycle.assignee != peer or self._lifecycle.done:
                    return  # lost (or over) while being dialed: it gets nothing
            message = FederationMessage(
                type=MessageType.DELEGATION,
                payload=request,
                sender=node.local_id,
                recipient=connection.id or peer,
                correlation_id=self.task_id,
            )
            try:
                # Queued without a checkpoint: the driver's wait that follows
                # lets the writer run.
                connection.send_nowait(message)
            except trio.WouldBlock:
                await connection.send(message)  # the queue is full: wait for room
        except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            if (
                self._lifecycle.assignee == peer
                and self._lifecycle.status is DelegationStatus.PENDING
            ):
                logger.info("could not reach %s for %r: %s", peer, self.task_id, exc)
                self._lifecycle.unreachable(peer, str(exc) or type(exc).__name__)
                self._count()
                node._record_outcome(peer, False)

    async def _abandon(self, *, timed_out: bool) -> None:
        """The caller left before the end: cancel remotely, wait a bounded grace.

        Runs shielded by the caller. Against a peer without the cancel
        extension (a v1 peer) nothing is sent and nothing awaited: its late
        callbacks are dropped as being for no delegation of ours.
        """
        holder = self._lifecycle.cancel(timeout=timed_out)
        self._node._stats["cancelled"] += 1
        self._count()
        self._finish()
        if holder is None:
            return
        connection = self._node._live_connection(holder)
        if connection is None or CANCEL_EXTENSION not in connection.extensions:
            logger.info(
                "%r cancelled; %s cannot be told (no cancel extension)", self.task_id, holder
            )
            return
        with trio.move_on_after(self._node._cancel_grace):
            try:
                await connection.send(
                    FederationMessage(
                        type=MessageType.CALLBACK,
                        payload=TaskCallback(task_id=self.task_id, status=CallbackStatus.CANCEL),
                        sender=self._node.local_id,
                        recipient=connection.id,
                        correlation_id=self.task_id,
                    )
                )
            except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError):
                return
            await self._settled.wait()
