"""HaRP's test suites; importing this package settles which HaRP they test.

Under tox (``HARP_TEST_INSTALLED=1``) every test imports the HaRP that was installed: tox
installs the wheel users get, with its compiled per-request modules (harp/compiled.py), but
pytest puts this checkout first on ``sys.path`` (``tests`` is a package), so ``import harp``
would find the interpreted sources instead.  Importing the package once here, before any
test module, without the checkout on the path, fixes where every later ``harp.*`` import
comes from.  Elsewhere (an editable install) the checkout is what is tested.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _import_installed_harp() -> None:
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [entry for entry in saved if Path(entry or ".").resolve() != root]
    try:
        import harp
    finally:
        sys.path[:] = saved
    # (tox's environments live under the checkout too: compare the package folder itself.)
    if Path(harp.__file__ or "").resolve().parent == root / "harp":
        raise ImportError(f"HARP_TEST_INSTALLED=1 but harp is imported from {root}")


if os.environ.get("HARP_TEST_INSTALLED") == "1":
    _import_installed_harp()
