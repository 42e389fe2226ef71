"""Settings objects: one Timeouts and one Limits for the dialer, the listener and the node."""

from __future__ import annotations

import functools

import attrs
import pytest
import trio

from trio_federation import (
    MAX_FRAME_SIZE,
    Limits,
    OrchestratorConnection,
    Timeouts,
    open_orchestrator_connection,
    serve_federation,
)
from trio_federation._connection._settings import resolve_settings


@pytest.mark.parametrize("entry", ["open_orchestrator_connection", "serve_federation"])
def test_keyword_defaults_are_the_settings_defaults(entry: str) -> None:
    # One value each: a keyword whose default drifted from its settings field
    # would be taken for "given" and override the settings object.
    import inspect

    import trio_federation
    from trio_federation._connection._settings import _KEYWORDS

    parameters = inspect.signature(getattr(trio_federation, entry)).parameters
    defaults = {Timeouts: Timeouts(), Limits: Limits()}
    checked = 0
    for keyword, (kind, field) in _KEYWORDS.items():
        if keyword in parameters:
            assert parameters[keyword].default == getattr(defaults[kind], field), keyword
            checked += 1
    assert checked >= 10
    assert Limits().max_message_size == MAX_FRAME_SIZE


def test_settings_are_frozen_keyword_only_and_checked() -> None:
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Timeouts().heartbeat = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Timeouts(5.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="heartbeat"):
        Timeouts(heartbeat=0)
    with pytest.raises(TypeError, match="idle"):
        Timeouts(idle="1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dead"):
        Timeouts(dead=-1.0)
    assert Timeouts(resume=0).resume == 0  # sessions off
    with pytest.raises(ValueError, match="max_queue_size"):
        Limits(max_queue_size=0)
    with pytest.raises(TypeError, match="rate_burst"):
        Limits(rate_burst=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate_limit"):
        Limits(rate_limit=0)
    assert Limits(rate_limit=None).rate_limit is None


def test_both_spellings_resolve_to_the_same_settings() -> None:
    by_keywords = resolve_settings(
        None, None, heartbeat_timeout=5.0, max_queue_size=7, dead_timeout=None, rate_limit=None
    )
    by_objects = resolve_settings(
        Timeouts(heartbeat=5.0), Limits(max_queue_size=7, rate_limit=None)
    )
    assert by_keywords == by_objects
    # a keyword left at its default does not fight a settings object
    assert resolve_settings(Timeouts(heartbeat=5.0), None, heartbeat_timeout=60.0)[0].heartbeat == 5
    with pytest.raises(TypeError, match="give one of them"):
        resolve_settings(Timeouts(heartbeat=5.0), None, heartbeat_timeout=6.0)
    with pytest.raises(TypeError, match="unknown setting"):
        resolve_settings(None, None, colour=1)
    with pytest.raises(TypeError, match="Timeouts"):
        resolve_settings(Limits(), None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Limits"):
        resolve_settings(None, Timeouts())  # type: ignore[arg-type]


async def test_both_spellings_give_the_same_connection_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dialer and the listener build the same connections from either spelling."""
    configs: list[dict[str, object]] = []
    original = OrchestratorConnection.__init__

    def spy(self: OrchestratorConnection, **kwargs: object) -> None:
        configs.append({k: v for k, v in kwargs.items() if k not in ("id", "active_connections")})
        original(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(OrchestratorConnection, "__init__", spy)

    async def handler(conn: OrchestratorConnection) -> None:
        await trio.lowlevel.checkpoint()

    keywords = {"heartbeat_timeout": 7.0, "max_queue_size": 9, "rate_limit": None}
    objects = {
        "timeouts": Timeouts(heartbeat=7.0),
        "limits": Limits(max_queue_size=9, rate_limit=None),
    }
    for spelling in (keywords, objects):
        async with trio.open_nursery() as nursery:
            listener = await nursery.start(
                functools.partial(serve_federation, local_id="orch-b", capabilities=[], **spelling),
                handler,
                "127.0.0.1",
                0,
            )
            url = f"ws://127.0.0.1:{listener.port}/federation"
            async with open_orchestrator_connection(
                url, local_id="orch-a", capabilities=[], **spelling
            ) as conn:
                assert "cancel" in conn.extensions
                async for _ in conn:
                    pass  # the handler returns: the listener closes
            nursery.cancel_scope.cancel()
    assert len(configs) == 4
    dialer_kw, listener_kw, dialer_obj, listener_obj = configs
    assert dialer_kw == dialer_obj and listener_kw == listener_obj
    assert dialer_kw["heartbeat_timeout"] == 7.0 and listener_kw["max_queue_size"] == 9
