"""The daemon's two quirks, without Node: self-addressed frames, and its coordinator's dialect.

* A frame whose ``from`` is *our* id, from a bound peer, is that peer's (the
  daemon's ``OrchestratorConnection`` writes ``from: this.id``, the remote's id).
* The coordinator (``OrchestratorFederation``) speaks single-encoded frames,
  told apart from the v1 envelope by their ``type``.
The real daemon's code is exercised in tests/integration/test_interop_daemon.py.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_federation import (
    BroadcastPayload,
    CoordinatorFrame,
    CoordinatorFrameType,
    DelegationRequest,
    DelegationResponse,
    DelegationResult,
    FederationBroadcast,
    FederationMessage,
    MalformedMessage,
    MemoryRegistry,
    OrchestratorCapabilities,
    OrchestratorConnection,
    PolicyViolation,
    SharedContext,
    Task,
    TaskContext,
    decode_frame,
    decode_message,
    encode_coordinator_frame,
    encode_message,
    open_federation_node,
)
from trio_federation._delegation._coordinator import daemon_reason
from trio_federation._wire._capabilities import unmet_requirement
from trio_federation.testing import open_websocket_pair

from . import strategies
from .conftest import delegation, progress
from .strategies import FUZZ_SCALE

WHEN = datetime(2026, 11, 26, 12, 0, 0, 12000, tzinfo=UTC)
TASK = Task(id="t-1", description="do it", type="code", created_at=WHEN, updated_at=WHEN)
REQUEST = DelegationRequest(
    from_orchestrator_id="ts-src",
    to_orchestrator_id="py-node",
    task=TASK,
    required_capabilities=OrchestratorCapabilities(supported_task_types=("code",)),
    timeout=300.0,
)

FRAMES = [
    CoordinatorFrame(type="delegation:request", request=REQUEST),
    CoordinatorFrame(
        type="delegation:result",
        request_id="t-1",
        result=DelegationResult(success=True, session_id="t-1", timestamp=WHEN),
    ),
    CoordinatorFrame(
        type="delegation:result",
        request_id="t-1",
        result=DelegationResult(
            success=False,
            error="full",
            reason="overloaded",
            timestamp=WHEN,
            metadata={"refusal": "overloaded"},
        ),
    ),
    CoordinatorFrame(type="task:completed", session_id="t-1", data={"result": {"n": 3}}),
    CoordinatorFrame(type="task:failed", session_id="t-1", error="ValueError: no"),
    CoordinatorFrame(
        type="federation:broadcast",
        broadcast=FederationBroadcast(
            source_id="ts-src",
            message_type="load_alert",
            payload={"load": 0.5},
            priority="high",
            timestamp=WHEN,
        ),
    ),
    CoordinatorFrame(type="context:request"),
    CoordinatorFrame(type="context:response", context=SharedContext(scratchpad={"k": "v"})),
    CoordinatorFrame(type="heartbeat"),
    CoordinatorFrame(type="status_update", status="connected", data={"activeSessions": 1}),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: f.type.value)
def test_every_coordinator_frame_round_trips(frame: CoordinatorFrame) -> None:
    text = encode_coordinator_frame(frame)
    raw = orjson.loads(text)
    assert raw["type"] == frame.type.value
    assert "from" not in raw and "to" not in raw  # single-encoded, no envelope
    assert decode_frame(text) == frame


def test_coordinator_frames_are_written_as_the_daemon_writes_them() -> None:
    assert encode_coordinator_frame(FRAMES[2]) == (
        '{"type":"delegation:result","requestId":"t-1","result":{"success":false,'
        '"error":"full","reason":"overloaded","timestamp":"2026-11-26T12:00:00.012Z",'
        '"metadata":{"refusal":"overloaded"}}}'
    )
    assert encode_coordinator_frame(CoordinatorFrame(type="heartbeat")) == '{"type":"heartbeat"}'
    assert encode_coordinator_frame(FRAMES[0]).startswith(
        '{"type":"delegation:request","request":{"fromOrchestratorId":"ts-src",'
    )
    assert '"requiredCapabilities":{"supportedTaskTypes":["code"]}' in encode_coordinator_frame(
        FRAMES[0]
    )


def test_the_envelope_is_decoded_as_before() -> None:
    # An envelope heartbeat is still an envelope: it has 'from' and 'payload'.
    message = delegation("t-9")
    assert decode_frame(encode_message(message)) == message
    # decode_message itself is unchanged: the coordinator's frames are not v1.
    with pytest.raises(MalformedMessage, match="unknown message type 'delegation:request'"):
        decode_message(encode_coordinator_frame(FRAMES[0]))
    with pytest.raises(MalformedMessage, match="missing required key 'from'"):
        decode_message('{"type":"heartbeat"}')
    with pytest.raises(MalformedMessage, match="unknown message type 'gossip'"):
        decode_frame('{"type":"gossip"}')


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"type":"delegation:request"}', "missing required key 'request'"),
        ('{"type":"delegation:request","request":{"task":{}}}', "invalid 'delegation:request'"),
        ('{"type":"delegation:result","result":{"success":true}}', "'requestId'"),
        ('{"type":"delegation:result","requestId":"t","result":{}}', "'result.success'"),
        ('{"type":"task:completed","payload":{}}', "'payload.sessionId'"),
        ('{"type":"task:failed"}', "'payload' must be an object"),
        ('{"type":"status_update","payload":{"load":1}}', "'payload.status'"),
        ('{"type":"federation:broadcast","broadcast":{"sourceId":"a"}}', "messageType"),
        ('{"type":"context:response","context":[]}', "'context'"),
        ('{"type":"delegation:result","requestId":5,"result":{}}', "requestId must be a string"),
        ('{"type":"delegation:result","requestId":"t","result":[]}', "'result' must be an object"),
        (
            '{"type":"delegation:result","requestId":"t","result":{"success":true,"timestamp":1}}',
            "'result.timestamp'",
        ),
        ('{"type":"federation:broadcast","broadcast":"x"}', "'broadcast' must be an object"),
        (
            '{"type":"federation:broadcast","broadcast":'
            '{"sourceId":"a","messageType":"custom","priority":"urgent"}}',
            "invalid 'federation:broadcast' frame",
        ),
    ],
)
def test_malformed_coordinator_frames_say_what_is_wrong(frame: str, expected: str) -> None:
    with pytest.raises(MalformedMessage, match=expected.replace("[", r"\[")):
        decode_frame(frame)


def test_a_frame_missing_what_its_type_needs_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="requires request"):
        CoordinatorFrame(type=CoordinatorFrameType.DELEGATION_REQUEST)
    unencodable = CoordinatorFrame(type="status_update", status="connected", data={"x": object()})
    with pytest.raises(TypeError, match="cannot encode a 'status_update' frame"):
        encode_coordinator_frame(unencodable)


def test_the_object_form_is_checked_as_the_daemon_coordinator_does() -> None:
    advertised = ("code-generation", "testing")
    assert unmet_requirement(advertised, None) is None
    assert unmet_requirement(advertised, ["testing"]) is None
    assert unmet_requirement(advertised, ["research"]) == "missing capabilities: research"
    form = OrchestratorCapabilities
    assert unmet_requirement(advertised, form(supported_task_types=("code", "general"))) is None
    assert "unsupported task type 'poetry'" in str(
        unmet_requirement(advertised, form(supported_task_types=("poetry",)))
    )
    assert "needs capability 'research'" in str(
        unmet_requirement(advertised, form(supported_task_types=("research",)))
    )
    assert unmet_requirement(advertised, form(memory_tiers=("semantic", "episodic"))) is None
    assert "memory tier 'cosmic'" in str(
        unmet_requirement(advertised, form(memory_tiers=("cosmic",)))
    )
    assert unmet_requirement(advertised, form(specializations=("testing",))) is None
    assert unmet_requirement(advertised, form(max_sessions=4), max_sessions=4) is None
    assert unmet_requirement(advertised, form(max_sessions=5), max_sessions=4) is not None
    assert unmet_requirement(advertised, form(max_sessions=5)) is None  # unknown: not checked
    with pytest.raises(TypeError):
        unmet_requirement(advertised, "testing")


def test_our_refusals_in_the_daemons_words() -> None:
    assert daemon_reason("overloaded") == "overloaded"
    assert daemon_reason("capability_mismatch") == "capability_mismatch"
    assert daemon_reason("no_executor") == "capability_mismatch"
    assert daemon_reason("deadline_exceeded") == "timeout"
    assert daemon_reason("draining") == "rejected"
    assert daemon_reason("busy with something else") == "rejected"
    assert daemon_reason("unreachable") == "unreachable"


async def test_check_capability_takes_the_object_form() -> None:
    conn = OrchestratorConnection(id="ts", socket=None, capabilities=["code-generation"])
    assert conn.check_capability(OrchestratorCapabilities(supported_task_types=("code",)))
    assert not conn.check_capability(OrchestratorCapabilities(specializations=("testing",)))
    assert conn.check_capability(["code-generation"])
    with pytest.raises(TypeError):
        conn.check_capability("code-generation")


# -- the connection ---------------------------------------------------------------------


async def test_a_frame_from_our_own_id_is_the_peers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_federation.connection")
    with trio.fail_after(5):
        async with open_websocket_pair() as pair:
            b = OrchestratorConnection(id="ts-orch", socket=pair.server, local_id="py-node")
            async with b:
                with b.watch_errors() as errors:
                    # What the daemon's acceptDelegation writes: from = our id, to = our id.
                    acceptance = FederationMessage(
                        type="callback",
                        payload=DelegationResponse(task_id="t-1", accepted=True),
                        sender="py-node",
                        recipient="py-node",
                        correlation_id="t-1",
                    )
                    for _ in range(25):  # more than max_violations (20)
                        await pair.client.send_message(encode_message(acceptance))
                    await pair.client.send_message(
                        encode_message(progress("t-1", 5, sender="py-node", recipient="py-node"))
                    )
                    # A third orchestrator in 'from' is refused, exactly as before.
                    await pair.client.send_message(
                        encode_message(progress("t-1", 6, "mallory", "py-node"))
                    )
                    await pair.client.send_message(
                        encode_message(progress("t-1", 7, "ts-orch", "py-node"))
                    )
                    received = [await b.receive() for _ in range(27)]
                    refused = await errors.receive()
                assert all(m.sender == "ts-orch" for m in received)
                assert received[0].payload == DelegationResponse(task_id="t-1", accepted=True)
                assert [m.payload.progress for m in received[25:]] == [5, 7]  # type: ignore[union-attr]
                assert isinstance(refused, PolicyViolation)
                assert "'from' is 'mallory'" in str(refused)
                assert b.self_addressed == 26
                assert b.get_status().errors == 1
                assert b.is_healthy()
    said = [r for r in caplog.records if "as the TypeScript daemon does" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG


async def test_a_dialer_that_does_not_know_its_peer_does_not_take_our_id_for_its() -> None:
    with trio.fail_after(5):
        async with open_websocket_pair() as pair:
            a = OrchestratorConnection(id="", socket=pair.client, local_id="py-node")
            async with a:
                with a.watch_errors() as errors:
                    await pair.server.send_message(
                        encode_message(progress("t", 1, sender="py-node", recipient="py-node"))
                    )
                    await pair.server.send_message(
                        encode_message(progress("t", 2, "ts-orch", "py-node"))
                    )
                    assert (await a.receive()).payload.progress == 2  # type: ignore[union-attr]
                    assert "'from' is 'py-node'" in str(await errors.receive())
                assert a.id == "ts-orch"
                assert a.self_addressed == 0


async def test_coordinator_frames_go_to_their_subscription_only() -> None:
    with trio.fail_after(5):
        async with open_websocket_pair() as pair:
            b = OrchestratorConnection(id="ts-coord", socket=pair.server, local_id="py-node")
            async with b:
                # Nobody subscribed: dropped and counted, the connection goes on.
                await pair.client.send_message('{"type":"context:request"}')
                await pair.client.send_message(
                    encode_message(delegation("t-0", "ts-coord", "py-node"))
                )
                assert (await b.receive()).correlation_id == "t-0"
                assert b.coordinator_frames_dropped == 1
                with b.subscribe_coordinator() as frames:
                    await pair.client.send_message(encode_coordinator_frame(FRAMES[0]))
                    await pair.client.send_message('{"type":"heartbeat"}')
                    first = await frames.receive()
                    assert first.request == REQUEST
                    assert first.sender == "ts-coord"
                    assert (await frames.receive()).type is CoordinatorFrameType.HEARTBEAT
                    # Answered single-encoded, through send().
                    await b.send(FRAMES[1])
                    assert await pair.client.get_message() == encode_coordinator_frame(FRAMES[1])
                assert b.get_status().errors == 0
                assert b.coordinator_frames_dropped == 1


# -- the node ---------------------------------------------------------------------------


async def test_a_node_serves_the_coordinator_dialect() -> None:
    release = trio.Event()

    async def execute(ctx: TaskContext) -> object:
        if ctx.task.description == "block":
            await release.wait()
        await ctx.report_progress(10)  # no such frame in the dialect: dropped
        if ctx.task.description == "fail":
            raise ValueError("no")
        return {"id": ctx.task.id}

    def request(
        task_id: str, description: str = "x", required: OrchestratorCapabilities | None = None
    ) -> str:
        task = Task(id=task_id, description=description, type="code")
        req = DelegationRequest(
            from_orchestrator_id="ts-src",
            to_orchestrator_id="py-node",
            task=task,
            required_capabilities=required,
        )
        return encode_coordinator_frame(CoordinatorFrame(type="delegation:request", request=req))

    with trio.fail_after(5):
        async with open_federation_node(
            local_id="py-node",
            capabilities=["code-generation"],
            executor=execute,
            registry=MemoryRegistry(),
            max_concurrent_tasks=1,
        ) as node:
            node.shared_context = lambda: SharedContext(scratchpad={"k": 1})
            from trio_websocket import open_websocket_url

            with node.subscribe_broadcasts() as broadcasts:
                async with open_websocket_url(f"{node.endpoint}?id=ts-coord") as ws:
                    unread: list[CoordinatorFrame] = []

                    async def frame(kind: str) -> CoordinatorFrame:
                        """The first frame of ``kind`` not taken yet (others are kept)."""
                        while True:
                            for got in unread:
                                if got.type == kind:
                                    unread.remove(got)
                                    return got
                            received = decode_frame(await ws.get_message())
                            assert isinstance(received, CoordinatorFrame)
                            unread.append(received)

                    await ws.send_message(request("c-1"))
                    result = (await frame("delegation:result")).result
                    assert result is not None and (result.success, result.session_id) == (
                        True,
                        "c-1",
                    )
                    done = await frame("task:completed")
                    assert (done.session_id, done.data) == ("c-1", {"result": {"id": "c-1"}})
                    await ws.send_message(request("c-2", "block"))
                    assert (await frame("delegation:result")).result.success  # type: ignore[union-attr]
                    await ws.send_message(request("c-3"))
                    refused = await frame("delegation:result")
                    assert refused.request_id == "c-3"
                    assert refused.result is not None
                    assert (refused.result.success, refused.result.reason) == (False, "overloaded")
                    assert refused.result.error == "py-node refused the task: overloaded"
                    release.set()
                    assert (await frame("task:completed")).session_id == "c-2"
                    await ws.send_message(request("c-4", "fail"))
                    await frame("delegation:result")
                    failed = await frame("task:failed")
                    assert (failed.session_id, failed.error) == ("c-4", "ValueError: no")
                    spec = OrchestratorCapabilities(specializations=("ml-training",))
                    await ws.send_message(request("c-5", required=spec))
                    mismatch = (await frame("delegation:result")).result
                    assert mismatch is not None and mismatch.reason == "capability_mismatch"
                    await ws.send_message(encode_coordinator_frame(FRAMES[5]))
                    await ws.send_message('{"type":"context:request"}')
                    context = await frame("context:response")
                    assert context.context == SharedContext(scratchpad={"k": 1})
                    status = await frame("status_update")
                    assert status.status == "connected"
                    assert status.data is not None and status.data["maxSessions"] == 1
                    assert broadcasts.receive_nowait() == BroadcastPayload(
                        topic="load_alert", data={"load": 0.5}
                    )
            stats = node.statistics()
            assert dict(stats.tasks_refused) == {"overloaded": 1, "capability_mismatch": 1}
            assert (stats.tasks_completed, stats.tasks_failed) == (2, 1)


async def test_a_node_without_executor_and_a_failing_context_hook() -> None:
    def broken() -> SharedContext:
        raise RuntimeError("no context today")

    with trio.fail_after(5):
        async with open_federation_node(local_id="py-node", registry=MemoryRegistry()) as node:
            node.shared_context = broken
            from trio_websocket import open_websocket_url

            async with open_websocket_url(f"{node.endpoint}?id=ts-coord") as ws:
                # Frames the coordinator itself would read: ignored by a node.
                await ws.send_message('{"type":"status_update","payload":{"status":"connected"}}')
                bare = attrs.evolve(REQUEST, required_capabilities=None)
                request = CoordinatorFrame(type="delegation:request", request=bare)
                await ws.send_message(encode_coordinator_frame(request))
                await ws.send_message('{"type":"context:request"}')
                seen: list[CoordinatorFrame] = []
                while len([f for f in seen if f.type != "heartbeat"]) < 3:
                    frame = decode_frame(await ws.get_message())
                    assert isinstance(frame, CoordinatorFrame)
                    seen.append(frame)
            kinds = [f.type.value for f in seen]
            assert kinds.count("heartbeat") == 1 and kinds.count("status_update") == 1
            (result,) = [f.result for f in seen if f.type == "delegation:result"]
            assert result is not None and not result.success
            assert (result.reason, result.metadata) == (
                "capability_mismatch",
                {"refusal": "no_executor"},
            )
            (context,) = [f.context for f in seen if f.type == "context:response"]
            assert context == SharedContext()


# -- decode_frame is decode_message for everything but the coordinator's types ----------


@given(strategies.messages())
@settings(max_examples=100 * FUZZ_SCALE, suppress_health_check=[HealthCheck.too_slow])
def test_decode_frame_decodes_every_envelope_as_decode_message(message: FederationMessage) -> None:
    frame = encode_message(message)
    assert repr(decode_frame(frame)) == repr(decode_message(frame))


@given(st.text() | strategies.json_values.map(lambda v: orjson.dumps(v).decode()))
@settings(max_examples=200 * FUZZ_SCALE)
def test_decode_frame_refuses_garbage_as_decode_message(frame: str) -> None:
    def outcome(decode: Any) -> tuple[str, str]:
        try:
            return ("decoded", repr(decode(frame)))
        except MalformedMessage as exc:
            return ("error", str(exc))

    kind = frame_type(frame)
    if isinstance(kind, str) and kind in {t.value for t in CoordinatorFrameType}:
        return  # the coordinator's (and only such frames) differ: tested above
    assert outcome(decode_frame) == outcome(decode_message)


def frame_type(frame: str) -> object:
    try:
        parsed = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    return parsed.get("type") if isinstance(parsed, dict) else None
