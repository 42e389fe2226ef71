"""The wire layer: messages, the v1 codec, WebSocket frames, the upgrade, authentication.

No connection state: bytes and text in, typed messages out (and back).
"""
