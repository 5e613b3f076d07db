"""Is this HaRP the compiled build, or the slower interpreted one?

The wheel compiles the per-request modules with mypyc when it is built with a C compiler
(harp/compiled.py, docs/performance.md); without one it still works, with about 15 to 25 % more
CPU per small request.  Nothing else tells an operator which of the two is running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from harp.check.result import Result, passed, warned

NAME: Final = "build"
_FIX: Final = (
    "install HaRP from a wheel built with a C compiler and Python's headers "
    "(HARP_COMPILE=1 makes the build fail instead; docs/performance.md)"
)


def build(compiled: Sequence[str], modules: Sequence[str]) -> Result:
    """PASS when every per-request module is compiled, WARN otherwise (names the others)."""
    if len(compiled) == len(modules):
        return passed(NAME, f"per-request modules compiled ({len(modules)})")
    missing = sorted(set(modules) - set(compiled))
    shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    return warned(
        NAME,
        f"per-request modules interpreted ({len(compiled)} of {len(modules)} compiled; "
        f"not {shown}): slower",
        _FIX,
    )
