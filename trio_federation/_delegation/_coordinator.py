"""The node's side of the daemon coordinator's dialect (SPEC 6.6).

The TypeScript daemon's ``OrchestratorFederation`` delegates with
single-encoded frames (``delegation:request`` → ``delegation:result``, then
``task:completed`` / ``task:failed``), broadcasts with ``federation:broadcast``
and asks for context with ``context:request``. The connection layer decodes
them into :class:`~trio_federation.CoordinatorFrame` objects; this module
decides what a node answers. Admission, dedupe and execution are the node's
own (exactly as for a v1 ``delegation``): only the words differ, so the node
hands its callbacks for a coordinator's task here to be translated.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Final

import trio

from .._connection._streams import MessageStream
from .._exceptions import ConnectionLost, FederationError
from .._wire._messages import (
    BroadcastPayload,
    CallbackStatus,
    CoordinatorFrame,
    CoordinatorFrameType,
    DelegationResponse,
    DelegationResult,
    FederationMessage,
    MessageType,
    SharedContext,
    TaskCallback,
)

if TYPE_CHECKING:
    from .._connection._connection import OrchestratorConnection
    from ._node import FederationNode

__all__ = ["DAEMON_REASONS", "CoordinatorDialect", "daemon_reason"]

logger = logging.getLogger("trio_federation.delegation")

DAEMON_REASONS: Final = frozenset(
    {"capability_mismatch", "overloaded", "unreachable", "rejected", "timeout"}
)
"""The ``reason`` vocabulary of the daemon's ``DelegationResult``."""
_REASONS: Final = {
    "capability_mismatch": "capability_mismatch",
    "no_executor": "capability_mismatch",
    "overloaded": "overloaded",
    "deadline_exceeded": "timeout",
    "draining": "rejected",
    "admit_failed": "rejected",
}


def daemon_reason(reason: str) -> str:
    """Our refusal reason in the daemon's vocabulary (an ``admit`` hook's own: ``rejected``)."""
    mapped = _REASONS.get(reason)
    if mapped is not None:
        return mapped
    return reason if reason in DAEMON_REASONS else "rejected"


class CoordinatorDialect:
    """Serves the coordinator dialect for one node: one per node, all its connections."""

    def __init__(self, node: FederationNode) -> None:
        self._node = node
        # The tasks a coordinator delegated, by (peer, task id): answered on
        # the connection their request came on, in the coordinator's words.
        self._tasks: dict[tuple[str, str], OrchestratorConnection] = {}
        self.counts: collections.Counter[str] = collections.Counter()

    def owns(self, peer: str, task_id: str) -> bool:
        """Whether the callbacks of ``task_id`` for ``peer`` go out in this dialect."""
        return (peer, task_id) in self._tasks

    def connection_of(self, peer: str, task_id: str) -> OrchestratorConnection | None:
        """The connection a coordinator's task is answered on (None: not a coordinator's)."""
        return self._tasks.get((peer, task_id))

    async def pump(
        self, connection: OrchestratorConnection, frames: MessageStream[CoordinatorFrame]
    ) -> None:
        """Answer the coordinator frames of ``connection`` until it ends.

        From the first one on, the peer is a coordinator: the node also sends
        it ``heartbeat`` and ``status_update`` frames every half heartbeat
        timeout.
        """
        async with trio.open_nursery() as nursery:
            announcing = False
            try:
                async for frame in frames:
                    if not announcing:
                        announcing = True
                        nursery.start_soon(self._announce, connection)
                    await self._on_frame(connection, frame)
            except ConnectionLost:
                pass  # the node's pump logs it
            nursery.cancel_scope.cancel()

    async def _on_frame(self, connection: OrchestratorConnection, frame: CoordinatorFrame) -> None:
        node = self._node
        peer = connection.id or frame.sender
        kind = frame.type
        self.counts[kind.value] += 1
        if kind is CoordinatorFrameType.DELEGATION_REQUEST:
            assert frame.request is not None
            self._tasks[(peer, frame.request.task.id)] = connection
            node._on_delegation(connection, peer, frame.request)
        elif kind is CoordinatorFrameType.BROADCAST:
            broadcast = frame.broadcast
            assert broadcast is not None
            payload = BroadcastPayload(topic=broadcast.message_type, data=dict(broadcast.payload))
            message = FederationMessage(
                type=MessageType.BROADCAST,
                payload=payload,
                sender=broadcast.source_id,
                recipient=node.local_id,
                timestamp=broadcast.timestamp,
            )
            node._on_broadcast(message, payload)
        elif kind is CoordinatorFrameType.CONTEXT_REQUEST:
            context: SharedContext | None = None
            if node.shared_context is not None:
                try:
                    context = node.shared_context()
                except Exception:
                    logger.exception("the shared_context hook raised; answering {}")
            await self._send(
                connection,
                CoordinatorFrame(
                    type=CoordinatorFrameType.CONTEXT_RESPONSE,
                    context=context if context is not None else SharedContext(),
                ),
                wait=False,  # an answer from the reader: never wait (see the node's _send_to)
            )
        else:
            # A node delegates to a daemon through the envelope dialect, so
            # results, task ends, heartbeats and statuses are not for us.
            logger.debug("ignored a %r frame from %r", kind.value, peer)

    def _translate(
        self, peer: str, payload: TaskCallback | DelegationResponse
    ) -> CoordinatorFrame | None:
        """The frame that says ``payload`` in the coordinator's words (None: progress)."""
        task_id = payload.task_id
        if isinstance(payload, DelegationResponse):
            if payload.accepted:
                result = DelegationResult(success=True, session_id=task_id)
            else:
                reason = payload.reason or "rejected"
                result = DelegationResult(
                    success=False,
                    reason=daemon_reason(reason),
                    error=f"{self._node.local_id} refused the task: {reason}",
                    metadata={"refusal": reason},
                )
            return CoordinatorFrame(
                type=CoordinatorFrameType.DELEGATION_RESULT, request_id=task_id, result=result
            )
        if payload.status is CallbackStatus.COMPLETED:
            return CoordinatorFrame(
                type=CoordinatorFrameType.TASK_COMPLETED,
                session_id=task_id,
                data=None if payload.result is None else {"result": payload.result},
            )
        if payload.status is CallbackStatus.FAILED:
            return CoordinatorFrame(
                type=CoordinatorFrameType.TASK_FAILED,
                session_id=task_id,
                error=payload.error or "failed",
            )
        return None  # progress: no such frame in the coordinator's dialect

    def _ends(self, peer: str, payload: TaskCallback | DelegationResponse) -> None:
        """Forget a task once its refusal or outcome is sent."""
        if isinstance(payload, DelegationResponse) and payload.accepted:
            return
        self._tasks.pop((peer, payload.task_id), None)

    async def send_callback(self, peer: str, payload: TaskCallback | DelegationResponse) -> bool:
        """Send the node's answer or callback for a coordinator's task, translated.

        An acceptance or refusal becomes ``delegation:result``; a final
        callback ``task:completed`` or ``task:failed``; progress has no frame
        in this dialect and is dropped. Waits for room in the queue.

        Raises:
            TypeError: the payload cannot be encoded (the task is still known).
        """
        connection = self._tasks[(peer, payload.task_id)]
        frame = self._translate(peer, payload)
        if frame is None:
            await trio.lowlevel.checkpoint()
            return True
        try:
            return await self._send(connection, frame)
        finally:
            self._ends(peer, payload)  # sent, failed or cancelled: it is over here

    def queue_callback(self, peer: str, payload: TaskCallback | DelegationResponse) -> bool | None:
        """:meth:`send_callback` without waiting: None (nothing queued) if the queue is full.

        Raises:
            TypeError: the payload cannot be encoded (the task is still known).
        """
        connection = self._tasks[(peer, payload.task_id)]
        frame = self._translate(peer, payload)
        if frame is None:
            return True
        try:
            connection.send_nowait(frame)
        except trio.WouldBlock:
            # The caller closes this connection (its peer does not read): the
            # task is over here either way.
            self._ends(peer, payload)
            return None
        except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            logger.warning(
                "could not send a %r frame to %r: %s", frame.type.value, connection.id, exc
            )
            self._ends(peer, payload)
            return False
        self._ends(peer, payload)
        return True

    def _status(self) -> CoordinatorFrame:
        node = self._node
        admission = node._admission
        busy = node._closing or admission.draining
        return CoordinatorFrame(
            type=CoordinatorFrameType.STATUS_UPDATE,
            # A full node stays "connected": the coordinator refuses a peer in
            # any other status itself, as "unreachable"; the node refuses
            # with "overloaded" when it is full.
            status="maintenance" if busy else "connected",
            data={"activeSessions": admission.running, "maxSessions": admission.max_concurrent},
        )

    async def _announce(self, connection: OrchestratorConnection) -> None:
        interval = self._node._timeouts.heartbeat / 2
        while True:
            await self._send(connection, CoordinatorFrame(type=CoordinatorFrameType.HEARTBEAT))
            await self._send(connection, self._status())
            await trio.sleep(interval)

    async def _send(
        self, connection: OrchestratorConnection, frame: CoordinatorFrame, *, wait: bool = True
    ) -> bool:
        try:
            if wait:
                await connection.send(frame)
            else:
                connection.send_nowait(frame)
        except trio.WouldBlock:
            self._node._not_reading(connection)
            return False
        except (FederationError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            logger.warning(
                "could not send a %r frame to %r: %s", frame.type.value, connection.id, exc
            )
            return False
        return True
