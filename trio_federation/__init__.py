"""trio-federation: orchestrators federating over WebSockets, on trio.

Every public name is re-exported here; the modules behind them are private.
"""

from ._codec import MAX_FRAME_SIZE, decode_message, encode_message, make_converter
from ._connection import OrchestratorConnection
from ._exceptions import (
    AuthenticationError,
    ConnectionLost,
    FederationError,
    HandshakeError,
    HeartbeatTimeout,
    MalformedMessage,
    MessageRefused,
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
    "BroadcastPayload",
    "CallbackStatus",
    "Capability",
    "ConnectionHealth",
    "ConnectionLost",
    "ConnectionStatus",
    "DelegationRequest",
    "DelegationResponse",
    "EventStream",
    "FederationError",
    "FederationListener",
    "FederationMessage",
    "FederationRegistry",
    "HandshakeError",
    "HeartbeatPayload",
    "HeartbeatStatus",
    "HeartbeatTimeout",
    "ListenerStatistics",
    "MalformedMessage",
    "MemoryEntry",
    "MemoryRegistry",
    "MessageRefused",
    "MessageStream",
    "MessageType",
    "OrchestratorCapabilities",
    "OrchestratorConnection",
    "OrchestratorMetrics",
    "OrchestratorNotFound",
    "OrchestratorQuery",
    "OrchestratorRecord",
    "OrchestratorStatus",
    "Payload",
    "PolicyViolation",
    "QueueFull",
    "ReconnectPolicy",
    "RedisRegistry",
    "Registration",
    "RegistryEvent",
    "RegistryEventType",
    "RegistryFull",
    "RegistryUnavailable",
    "RegistryWatch",
    "SessionLost",
    "SharedContext",
    "Task",
    "TaskCallback",
    "TaskHistoryEntry",
    "TaskPriority",
    "TaskStatus",
    "TaskType",
    "UnsentMessages",
    "__version__",
    "decode_message",
    "encode_message",
    "make_converter",
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
