"""HaRP's PEP 517 build backend: setuptools, plus mypyc for the per-request modules.

Why a backend of our own: compiling needs mypy (mypyc) and, for the types mypyc compiles
against, HaRP's own dependencies in the build environment — requirements that exist only
when compiling.  setuptools cannot declare requirements that depend on the build, so this
thin layer decides, tells setup.py (``HARP_SETUP_COMPILE``) and asks for what the
compile needs.  Editable installs and sdists are never compiled: a compiled
module next to its source would shadow every later edit of it.

``HARP_COMPILE``: ``1`` compile (the build fails if it cannot), ``0`` do not, unset: compile
when a C compiler and Python's headers are present (docs/performance.md).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (the hooks this backend does not change)
    build_sdist,
    get_requires_for_build_sdist,
)

#: The compiler's own pins: the same source compiles to the same C.
COMPILER = ("mypy==2.4.1", "mypy-zope==1.0.17")


def _can_compile() -> bool:
    """A C compiler and Python's headers, as setuptools' build_ext will look for them."""
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return bool(cc) and shutil.which(cc[0]) is not None and include.exists()


#: What setup.py reads: ``1`` compile now.  Not ``HARP_COMPILE`` itself: build front-ends
#: (tox) call every hook in one process, so the user's choice must stay as it was given.
SETUP_FLAG = "HARP_SETUP_COMPILE"


def _compile() -> bool:
    """Settle whether this build compiles, and tell setup.py."""
    wanted = os.environ.get("HARP_COMPILE", "")
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"HARP_COMPILE must be 0 or 1, not {wanted!r}")
    compile_ = wanted == "1" or (wanted == "" and _can_compile())
    if wanted == "" and not compile_:
        print(
            "harp: no C compiler or Python headers: building without the compiled "
            "per-request modules (slower; see docs/performance.md)",
            file=sys.stderr,
        )
    os.environ[SETUP_FLAG] = "1" if compile_ else "0"
    return compile_


def _dependencies() -> list[str]:
    """HaRP's runtime dependencies (pyproject.toml): mypyc compiles against their types."""
    with open("pyproject.toml", "rb") as file:
        project: dict[str, Any] = tomllib.load(file)["project"]
    return list(project["dependencies"])


def _pure() -> None:
    """For the hooks that run setup.py only to learn something (requirements, metadata):
    nothing to compile there, and the compiler may not be installed yet."""
    os.environ[SETUP_FLAG] = "0"


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    compile_ = _compile()
    _pure()
    requires: list[str] = _setuptools.get_requires_for_build_wheel(config_settings)
    if compile_:
        requires += [*COMPILER, *_dependencies()]
    return requires


def build_wheel(
    wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None
) -> str:
    _compile()
    name: str = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    return name


def _pure_hook(name: str) -> Callable[..., Any]:
    """setuptools' hook ``name``, run without compiling (:func:`_pure`)."""
    hook: Callable[..., Any] = getattr(_setuptools, name)

    def run(*args: Any, **kwargs: Any) -> Any:
        _pure()
        return hook(*args, **kwargs)

    run.__name__ = name
    return run


# Metadata never depends on compiling; editable installs are never compiled (a compiled
# module next to its source would shadow every later edit of it).
prepare_metadata_for_build_wheel = _pure_hook("prepare_metadata_for_build_wheel")
get_requires_for_build_editable = _pure_hook("get_requires_for_build_editable")
prepare_metadata_for_build_editable = _pure_hook("prepare_metadata_for_build_editable")
build_editable = _pure_hook("build_editable")
