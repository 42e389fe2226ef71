"""Benchmarks of trio-federation against raw trio-websocket: ``python -m bench``.

Three measurements, each of the library next to the same work done with plain
trio-websocket (or plain orjson), with the sender and the receiver in two
processes on 127.0.0.1:

(a) one-way throughput of delegation messages (library ``conn.send`` /
    ``async for msg in conn`` against pre-encoded frames sent with
    ``send_message`` / ``get_message``);
(b) sequential delegation -> acceptance round trips (library
    ``accept_delegation`` against an echo of the same frame), p50 and p99;
(c) codec cost per message (``encode_message`` + ``decode_message`` against
    ``orjson.dumps`` + ``orjson.loads`` of the equivalent dict), in process.

(a) and (b) run the library with resumable sessions (the default) and without
(``resumable=False``: the plain v1 protocol), and print the ratio of the two.
(d) is the library alone: the time from a cut link to the first message
delivered after the reconnect, and whether every message arrived exactly once
and in order (:mod:`bench.recovery`, in process, through a ``FaultyProxy``).

Modules: :mod:`bench._workload` (the messages), :mod:`bench.worker` (the peer
processes), :mod:`bench._peers` (starting and watching them), :mod:`bench._report`
(figures and the table), :mod:`bench.recovery` (d) and :mod:`bench.__main__`
(the command line).

``python -m bench.codec`` times the codec's fast paths against the reference
path they are pinned to, per kind of message (:mod:`bench.codec`).
"""
