"""Build hook: HaRP's per-request modules compiled by mypyc when the backend says so.

Everything else about the package is in pyproject.toml.  The build backend
(tools/harp_build.py) settles ``HARP_COMPILE`` before this runs and sets
``HARP_SETUP_COMPILE=1`` when this build compiles (a C compiler and Python's headers are
there, or ``HARP_COMPILE=1`` asked for it).  The list of modules is
harp/compiled.py's, read without importing HaRP (docs/performance.md, "Compiled modules").
"""

from __future__ import annotations

import os
import runpy

from setuptools import setup

ext_modules = []
if os.environ.get("HARP_SETUP_COMPILE") == "1":
    from mypyc.build import mypycify

    modules = runpy.run_path(os.path.join("harp", "compiled.py"))["MODULES"]
    paths = [name.replace(".", "/") + ".py" for name in modules]
    ext_modules = mypycify(paths, opt_level="3", group_name="harp")

setup(ext_modules=ext_modules)
