"""Delegation: the federation node, its executing and delegating sides.

``_state`` (the delegator's lifecycle, attempts and backoff) and
``_executor`` (admission and the dedupe window) are sans-IO; ``_strategies``
orders candidates. The trio shell: ``_handle`` (one delegation and its
driver) and ``_node`` (the node: connections and their pumps, executions,
broadcasts, and ``open_federation_node``).
"""
