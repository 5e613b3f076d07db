"""The modules the wheel compiles with mypyc, and whether this copy of HaRP runs them so.

Why compiled: a small proxied request costs HaRP a few hundred Python function calls —
parse, decide, forward, relay the answer — and no single one stands out (docs/performance.md).
mypyc turns these type-checked modules into C extensions with the same behaviour, which
removes most of the interpreter's cost per call without changing the code.  The list is
the per-request path of the ExApp frontends and the Docker passthrough; everything else
(start-up, the control plane, FRP, Docker and Kubernetes lifecycles) stays interpreted.

The client connection's channel (:mod:`harp.web.channel`) is HaRP's own class for that
reason: twisted.web's ``HTTPChannel`` could not be compiled through a subclass.

Not compiled: :mod:`harp.web.site`.  Its request and site subclass twisted.web's and share
attributes with them.  Compiled as native classes, the attributes mypy cannot see in the
Python base class get slots of their own, so twisted.web and HaRP would each read their
own copy; compiled as regular classes (``native_class=False``), every read of a
twisted.web attribute is checked against twisted.web's annotation, which the values do not
always follow.  Its pure part is compiled where it lives on its own
(:mod:`harp.web.relayed_head`).

``setup.py`` reads :data:`MODULES` without importing HaRP; the modules stay valid Python,
so a build without a C compiler (or with ``HARP_COMPILE=0``) runs the same code, slower.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from typing import Final

MODULES: Final = (
    "harp.bans",
    "harp.client_address",
    "harp.credentials",
    "harp.deadlines",
    "harp.docker.allowlist",
    "harp.docker.engines",
    "harp.docker.passthrough",
    "harp.docker.query",
    "harp.exapps",
    "harp.lru",
    "harp.metrics",
    "harp.poll",
    "harp.splice",
    "harp.state.memory",
    "harp.timers",
    "harp.web.body",
    "harp.web.channel",
    "harp.web.chunks",
    "harp.web.exchange",
    "harp.web.headers",
    "harp.web.https",
    "harp.web.limits",
    "harp.web.pipeline",
    "harp.web.proxy",
    "harp.web.relayed_head",
    "harp.web.request_line",
    "harp.web.response_body",
    "harp.web.response_head",
    "harp.web.responses",
    "harp.web.root",
    "harp.web.target",
    "harp.web.upstream",
    "harp.workers.mirror",
    "harp.writes",
)


def compiled_modules() -> list[str]:
    """Those of :data:`MODULES` that this interpreter loads as C extensions."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is not None and origin.endswith(suffixes):
            found.append(name)
    return found
