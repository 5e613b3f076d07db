"""The compiled build (harp/compiled.py, setup.py, tools/harp_build.py) and its check."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

from harp.check.build import build
from harp.check.result import Status
from harp.compiled import MODULES, compiled_modules

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(
    os.environ.get("HARP_TEST_INSTALLED") != "1",
    reason="an editable checkout is interpreted; tox tests the built wheel",
)
def test_the_wheel_under_test_runs_every_per_request_module_compiled() -> None:
    # tox builds the wheel with HARP_COMPILE=1: a module missing here would be tested
    # interpreted while users run it compiled (or the other way round).
    assert compiled_modules() == list(MODULES)


def test_every_listed_module_is_a_source_file() -> None:
    for name in MODULES:
        assert (REPO / (name.replace(".", "/") + ".py")).is_file(), name


def test_check_passes_compiled_and_warns_interpreted() -> None:
    assert build(MODULES, MODULES).status is Status.PASS
    partial = build(MODULES[1:], MODULES)
    assert partial.status is Status.WARN and MODULES[0] in partial.detail
    none = build([], MODULES)
    assert none.status is Status.WARN and f"0 of {len(MODULES)}" in none.detail
    assert "HARP_COMPILE" in (none.fix or "")


def _backend() -> ModuleType:
    spec = importlib.util.spec_from_file_location("harp_build", REPO / "tools" / "harp_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("wanted", "can", "compiles"),
    [("1", False, True), ("0", True, False), ("", True, True), ("", False, False)],
)
def test_backend_settles_harp_compile(
    monkeypatch: pytest.MonkeyPatch, wanted: str, can: bool, compiles: bool
) -> None:
    backend = _backend()
    monkeypatch.setenv("HARP_COMPILE", wanted)
    monkeypatch.delenv("HARP_SETUP_COMPILE", raising=False)
    monkeypatch.setattr(backend, "_can_compile", lambda: can)
    assert backend._compile() is compiles
    # setup.py compiles exactly when the backend left "1"; the user's choice stays.
    assert os.environ[backend.SETUP_FLAG] == ("1" if compiles else "0")
    assert os.environ["HARP_COMPILE"] == wanted


def test_backend_refuses_a_bad_harp_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _backend()
    monkeypatch.setenv("HARP_COMPILE", "yes")
    with pytest.raises(SystemExit, match="HARP_COMPILE must be 0 or 1"):
        backend._compile()


def test_compiling_asks_for_the_compiler_and_harps_dependencies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = _backend()
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HARP_SETUP_COMPILE", raising=False)
    monkeypatch.setenv("HARP_COMPILE", "1")
    requires = backend.get_requires_for_build_wheel()
    assert any(r.startswith("mypy==") for r in requires)
    assert any(r.startswith("twisted") for r in requires)
    monkeypatch.setenv("HARP_COMPILE", "0")
    assert not any(r.startswith("mypy") for r in backend.get_requires_for_build_wheel())


def test_one_process_runs_every_hook_and_still_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    # tox calls get_requires_for_build_wheel (which runs setup.py without compiling) and
    # build_wheel in the same process: the second must still compile.
    backend = _backend()
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("HARP_SETUP_COMPILE", raising=False)
    monkeypatch.setenv("HARP_COMPILE", "1")
    seen: list[str | None] = []
    monkeypatch.setattr(
        backend._setuptools, "get_requires_for_build_wheel",
        lambda settings=None: seen.append(os.environ.get(backend.SETUP_FLAG)) or [],
    )
    monkeypatch.setattr(
        backend._setuptools, "build_wheel",
        lambda *args: seen.append(os.environ.get(backend.SETUP_FLAG)) or "harp.whl",
    )
    backend.get_requires_for_build_wheel()
    backend.build_wheel("dist")
    assert seen == ["0", "1"]
