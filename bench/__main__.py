"""``python -m bench``: see :mod:`bench.bench_proxy`."""

from bench.bench_proxy import main

raise SystemExit(main())
