"""Soak runs of trio-federation's reliability claims: ``python -m soak``.

Each part runs real sockets on 127.0.0.1 in one trio run and returns figures,
each beside its bound; the command prints them as one table and exits 1 if a
bound was missed (``nox -s soak``).

(a) :mod:`soak.cuts`: 10,000 messages each way across at least 20 random link
    cuts through a :class:`~trio_federation.testing.FaultyProxy`;
(b) :mod:`soak.stall`: a stalled consumer over 100,000 messages: memory flat,
    nobody declared degraded or dead;
(c) :mod:`soak.restart`: a listener down within its resume window (nothing
    lost) and past it, or restarted (an explicit gap, never silence);
(d) :mod:`soak.refusals`: every refusal of the trust layer against a listener
    serving 10 honest peers that send throughout;
(e) :mod:`soak.fuzz`: the fuzz suites at a larger scale, 0 crashes.
"""
