"""Whether advertised capabilities satisfy a requirement, in either of the daemon's forms.

Pure: no I/O. The list form (capability names) is met when every name is
advertised. The object form (the daemon's ``OrchestratorCapabilities``) is
checked the way the daemon coordinator's ``checkCapabilities`` checks it,
against what a trio-federation orchestrator advertises:

* ``maxSessions``: at most the executor's ``max_concurrent_tasks`` (not
  checked when that is unknown, as for the remote end of a connection);
* ``supportedTaskTypes``: each type needs its capability (``code`` needs
  ``code-generation``; ``research``, ``analysis`` and ``custom`` the capability
  of the same name; ``general`` nothing; any other name is unsupported);
* ``memoryTiers``: ``scratchpad``, ``episodic`` and ``semantic`` are all
  supported (a node takes every tier of a SharedContext); any other is not;
* ``specializations``: capability names, each must be advertised;
* ``tokenBudget`` and ``resourceLimits``: not checked (the coordinator does
  not check them either).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Final

from ._messages import OrchestratorCapabilities

__all__ = ["MEMORY_TIERS", "TASK_TYPE_CAPABILITIES", "unmet_requirement"]

TASK_TYPE_CAPABILITIES: Final[dict[str, str | None]] = {
    "code": "code-generation",
    "research": "research",
    "analysis": "analysis",
    "custom": "custom",
    "general": None,
}
"""The capability a task type needs (None: none)."""
MEMORY_TIERS: Final = frozenset({"scratchpad", "episodic", "semantic"})
"""The memory tiers every trio-federation orchestrator supports."""


def unmet_requirement(
    advertised: Collection[str],
    required: Iterable[str] | OrchestratorCapabilities | None,
    *,
    max_sessions: int | None = None,
) -> str | None:
    """What in ``required`` the ``advertised`` capabilities do not meet, or None.

    Args:
        advertised: the capability names the orchestrator advertises.
        required: capability names, the daemon's object form, or None (nothing).
        max_sessions: the orchestrator's session limit (None: unknown, not checked).

    Raises:
        TypeError: ``required`` is a single string instead of a list of names.
    """
    if required is None:
        return None
    if isinstance(required, str):
        raise TypeError(f"required must be a list of names, not the string {required!r}")
    if not isinstance(required, OrchestratorCapabilities):
        missing = [name for name in required if name not in advertised]
        return None if not missing else f"missing capabilities: {', '.join(missing)}"
    if (
        required.max_sessions is not None
        and max_sessions is not None
        and max_sessions < required.max_sessions
    ):
        return f"maxSessions {required.max_sessions} > {max_sessions}"
    for task_type in required.supported_task_types or ():
        if task_type not in TASK_TYPE_CAPABILITIES:
            return f"unsupported task type {task_type!r}"
        needed = TASK_TYPE_CAPABILITIES[task_type]
        if needed is not None and needed not in advertised:
            return f"task type {task_type!r} needs capability {needed!r}"
    for tier in required.memory_tiers or ():
        if tier not in MEMORY_TIERS:
            return f"unsupported memory tier {tier!r}"
    missing = [name for name in required.specializations or () if name not in advertised]
    return None if not missing else f"missing specializations: {', '.join(missing)}"
