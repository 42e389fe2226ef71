"""The connection layer: the sans-IO protocol and session state, and the trio shells.

``OrchestratorConnection``, the dialer and the listener, built on :mod:`.._wire`.
"""
