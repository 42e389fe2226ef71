"""The public surface: complete, documented, nothing private leaking."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest

import trio_federation
import trio_federation.testing
from trio_federation import (
    ConnectionLost,
    DelegationAttempt,
    DelegationFailed,
    FederationError,
    HandshakeError,
    HeartbeatTimeout,
    MalformedMessage,
    QueueFull,
    UnsentMessages,
)

SPEC_NAMES = {
    # SPEC section 2
    "Task",
    "DelegationRequest",
    "DelegationResponse",
    "TaskCallback",
    "BroadcastPayload",
    "HeartbeatPayload",
    "ConnectionHealth",
    "SharedContext",
    "FederationMessage",
    "Capability",
    "ConnectionStatus",
    "MessageType",
    # SPEC section 4
    "OrchestratorConnection",
    "open_orchestrator_connection",
    "serve_federation",
    "FederationError",
    "QueueFull",
    "MalformedMessage",
    "ConnectionLost",
    "HandshakeError",
    # SPEC section 6
    "open_federation_node",
    "FederationNode",
    "NodeStatistics",
    "TaskContext",
    "DelegationFailed",
    "DelegationStatus",
}


def test_spec_names_are_exported() -> None:
    assert set(trio_federation.__all__) >= SPEC_NAMES


def test_all_is_complete_and_only_public() -> None:
    public = {
        name
        for name, value in vars(trio_federation).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert public == set(trio_federation.__all__) - {"__version__"}
    for name in trio_federation.__all__:
        assert not name.startswith("_") or name == "__version__"
        assert hasattr(trio_federation, name)


def test_public_classes_live_in_the_package() -> None:
    for name in trio_federation.__all__:
        value = getattr(trio_federation, name)
        if inspect.isclass(value):
            assert value.__module__ == "trio_federation", name


@pytest.mark.parametrize("module", [trio_federation, trio_federation.testing])
def test_every_public_name_has_a_docstring(module: object) -> None:
    for name in module.__all__:  # type: ignore[attr-defined]
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), f"{name} has no docstring"
            for member_name, member in vars(value).items() if inspect.isclass(value) else ():
                if member_name.startswith("_"):
                    continue
                if inspect.isfunction(member) or isinstance(member, property):
                    assert inspect.getdoc(member), f"{name}.{member_name} has no docstring"


EXCEPTIONS = [
    QueueFull(1000),
    MalformedMessage("missing required key 'type'"),
    ConnectionLost(1006, "link died"),
    HandshakeError("refused", 409),
    HeartbeatTimeout("orch-b", 60.0),
    UnsentMessages("orch-b", 3),
    DelegationFailed("t-1", [DelegationAttempt(peer="orch-b", outcome="refused", reason="busy")]),
]


@pytest.mark.parametrize("error", EXCEPTIONS, ids=lambda e: type(e).__name__)
def test_exceptions_survive_copy_and_pickle(error: FederationError) -> None:
    for clone in (copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert type(clone) is type(error)
        assert clone.args == error.args
        assert str(clone) == str(error)
        assert vars(clone) == vars(error)


def test_exception_messages_name_what_failed() -> None:
    assert str(QueueFull(5)) == "message queue full (5 messages waiting)"
    assert str(ConnectionLost(1006)) == "connection closed with code 1006"
    assert str(ConnectionLost(4000, "bye")) == "connection closed with code 4000: bye"
    assert str(HandshakeError("refused", 409)) == "refused (HTTP 409)"
    assert str(HandshakeError("timed out")) == "timed out"
    assert "orch-b" in str(HeartbeatTimeout("orch-b", 60.0))
    assert "3 queued message(s)" in str(UnsentMessages("orch-b", 3))
