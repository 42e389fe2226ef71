"""The discovery layer: the registry interface, its memory and Redis backends.

Built on the public API of the connection layer.
"""
