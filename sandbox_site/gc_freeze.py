"""Keep a long-running process's start-up objects out of Python's full garbage collections.

A web process holds about 165,000 objects after start-up (Django, DRF, Channels, Twisted, the
URL patterns, the models' metadata), hostd about 146,000, all alive for good. Python's full (generation 2)
collection walks every one of them: about 100-170 ms on this machine, every 10-12 s under
load, during which no request in the process moves (the slowest requests of
``benchmarks/api.py --rate 50`` all fell in those moments; docs/benchmarks.md), and in hostd
no VM's agent or console traffic.
``gc.freeze()`` once start-up is done moves them to a generation the collector never walks;
full collections then cover what requests created since (4-12 ms). What is frozen is never
freed, which is what start-up objects are anyway; cycles that were garbage at that moment are
collected first."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect, then freeze everything alive (call it once start-up is done). Returns how many
    objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
