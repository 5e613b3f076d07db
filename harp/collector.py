"""Python's cyclic garbage collector, set for a long-running proxy.

Why: ``perf`` on a loaded process (one process, public route) put ≈ 2.5 % of the CPU in
the collector although no request leaves cyclic garbage (tests/unit/test_request_lifetime.py):
with Python's default threshold of 700 net allocations, the young generation is
collected ≈ 55 times a second at 12k requests per second, each time walking the
objects of every request still in flight, and every hundredth collection walks all
≈ 65 000 objects of the process, most of them modules, classes and configuration
that live as long as it does.

So, once the reactor runs (start-up done): one full collection, then ``gc.freeze()``
moves what survived out of the collector's sight for good, and the young generation
is collected every :data:`YOUNG_THRESHOLD` net allocations instead of 700.  Cyclic
garbage still gets collected, just in larger batches; memory stays bounded by the
threshold (docs/performance.md, "The garbage collector").
"""

from __future__ import annotations

import gc
from typing import Any, Final

#: Net allocations of container objects between two collections of the young
#: generation (Python's default: 700).
YOUNG_THRESHOLD: Final = 10_000


def settle() -> None:
    """Collect once, freeze the survivors, and raise the young generation's threshold."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def install(reactor: Any) -> None:
    """:func:`settle` once the reactor runs, when start-up's objects exist."""
    reactor.callWhenRunning(settle)
