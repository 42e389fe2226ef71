"""Delegation: the federation node, its executing and delegating sides.

``_state`` (the delegator's lifecycle, attempts and backoff) and
``_executor`` (admission and the dedupe window) are sans-IO; ``_strategies``
orders candidates; ``_node`` is the trio shell.
"""
