"""Build hook: HaRP's per-request modules compiled by mypyc when the backend says so.

Everything else about the package is in pyproject.toml.  The build backend
(tools/harp_build.py) settles ``HARP_COMPILE`` before this runs and sets
``HARP_SETUP_COMPILE=1`` when this build compiles (a C compiler and Python's headers are
there, or ``HARP_COMPILE=1`` asked for it).  The list of modules is harp/compiled.py's,
read without importing HaRP (docs/performance.md, "Compiled modules").
"""

from __future__ import annotations

import os
import runpy
import shutil

from setuptools import setup

#: Everything this build writes (generated C, objects, the staged package), started afresh
#: each time: objects left by an earlier build with another module list would be linked in.
#: Its own folder, because build/ also holds tools/build-image's output.
BUILD_BASE = os.path.join("build", "wheel")

ext_modules = []
if os.environ.get("HARP_SETUP_COMPILE") == "1":
    from mypyc.build import mypycify

    shutil.rmtree(BUILD_BASE, ignore_errors=True)
    modules = runpy.run_path(os.path.join("harp", "compiled.py"))["MODULES"]
    paths = [name.replace(".", "/") + ".py" for name in modules]
    ext_modules = mypycify(
        paths, opt_level="3", group_name="harp", target_dir=os.path.join(BUILD_BASE, "mypyc")
    )

setup(ext_modules=ext_modules, options={"build": {"build_base": BUILD_BASE}})
