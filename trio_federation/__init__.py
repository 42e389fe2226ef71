"""trio-federation: orchestrators federating over WebSockets, on trio.

Every public name is re-exported here; the modules behind them are private.
"""

from ._codec import MAX_FRAME_SIZE, decode_message, encode_message, make_converter
from ._connection import OrchestratorConnection
from ._delegation._executor import RefusalReason
from ._delegation._handle import Delegation
from ._delegation._node import (
    FederationNode,
    NodeStatistics,
    PeerInfo,
    TaskContext,
    open_federation_node,
)
from ._delegation._state import (
    Backoff,
    DelegationAttempt,
    DelegationFailed,
    DelegationStatus,
    DelegationUpdate,
    TaskAccepted,
    TaskCompleted,
    TaskFailed,
    TaskFailedOver,
    TaskProgress,
)
from ._delegation._strategies import Candidate, LeastLoaded, RoundRobin, Strategy
from ._exceptions import (
    AuthenticationError,
    ConnectionLost,
    FederationError,
    HandshakeError,
    HeartbeatTimeout,
    MalformedMessage,
    PolicyViolation,
    QueueFull,
    SessionLost,
    UnsentMessages,
)
from ._messages import (
    AssignedResources,
    BroadcastPayload,
    CallbackStatus,
    Capability,
    ConnectionHealth,
    ConnectionStatus,
    DelegationRequest,
    DelegationResponse,
    FederationMessage,
    HeartbeatPayload,
    HeartbeatStatus,
    MemoryEntry,
    MessageType,
    OrchestratorCapabilities,
    Payload,
    SharedContext,
    Task,
    TaskCallback,
    TaskHistoryEntry,
    TaskPriority,
    TaskStatus,
    TaskType,
)
from ._redis_registry import RedisRegistry, open_redis_registry
from ._registry import (
    FederationRegistry,
    MemoryRegistry,
    OrchestratorMetrics,
    OrchestratorNotFound,
    OrchestratorQuery,
    OrchestratorRecord,
    OrchestratorStatus,
    Registration,
    RegistryEvent,
    RegistryEventType,
    RegistryFull,
    RegistryUnavailable,
    RegistryWatch,
    open_registration,
    open_registry,
)
from ._settings import Limits, Timeouts
from ._streams import EventStream, MessageStream
from ._transport import (
    FederationListener,
    ListenerStatistics,
    ReconnectPolicy,
    open_orchestrator_connection,
    serve_federation,
)
from ._version import __version__

__all__ = [
    "MAX_FRAME_SIZE",
    "AssignedResources",
    "AuthenticationError",
    "Backoff",
    "BroadcastPayload",
    "CallbackStatus",
    "Candidate",
    "Capability",
    "ConnectionHealth",
    "ConnectionLost",
    "ConnectionStatus",
    "Delegation",
    "DelegationAttempt",
    "DelegationFailed",
    "DelegationRequest",
    "DelegationResponse",
    "DelegationStatus",
    "DelegationUpdate",
    "EventStream",
    "FederationError",
    "FederationListener",
    "FederationMessage",
    "FederationNode",
    "FederationRegistry",
    "HandshakeError",
    "HeartbeatPayload",
    "HeartbeatStatus",
    "HeartbeatTimeout",
    "LeastLoaded",
    "Limits",
    "ListenerStatistics",
    "MalformedMessage",
    "MemoryEntry",
    "MemoryRegistry",
    "MessageStream",
    "MessageType",
    "NodeStatistics",
    "OrchestratorCapabilities",
    "OrchestratorConnection",
    "OrchestratorMetrics",
    "OrchestratorNotFound",
    "OrchestratorQuery",
    "OrchestratorRecord",
    "OrchestratorStatus",
    "Payload",
    "PeerInfo",
    "PolicyViolation",
    "QueueFull",
    "ReconnectPolicy",
    "RedisRegistry",
    "RefusalReason",
    "Registration",
    "RegistryEvent",
    "RegistryEventType",
    "RegistryFull",
    "RegistryUnavailable",
    "RegistryWatch",
    "RoundRobin",
    "SessionLost",
    "SharedContext",
    "Strategy",
    "Task",
    "TaskAccepted",
    "TaskCallback",
    "TaskCompleted",
    "TaskContext",
    "TaskFailed",
    "TaskFailedOver",
    "TaskHistoryEntry",
    "TaskPriority",
    "TaskProgress",
    "TaskStatus",
    "TaskType",
    "Timeouts",
    "UnsentMessages",
    "__version__",
    "decode_message",
    "encode_message",
    "make_converter",
    "open_federation_node",
    "open_orchestrator_connection",
    "open_redis_registry",
    "open_registration",
    "open_registry",
    "serve_federation",
]

# Public classes say they live here, not in private modules (docs, reprs, pickle
# still finds them through the private module path they were defined in).
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) and _obj.__module__.startswith("trio_federation._"):
        _obj.__module__ = __name__
del _name, _obj
