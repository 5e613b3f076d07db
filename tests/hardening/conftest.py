"""The hardening suite's results table: one row per hostile case, printed at session end.

API (two fixtures; no imports needed)::

    def test_something(record_case, measure, harp):
        with measure(harp) as m:                  # fds / RSS of the harp process
            observed = send_hostile_bytes(...)    # "drop", "400", "200", "open after 9s", ...
        record_case(case="hole9/te-identity", input=raw_bytes, expected="400 or drop",
                    observed=observed, measured=m)
        assert observed in ("400", "drop")       # record first, then assert

``record_case(case: str, input: bytes | str, expected: str, observed: str, *,
measured: Measurement | None = None, proc=None, note: str = "")`` appends a row.
``input`` may be the raw bytes sent (shown as their repr, cut to about 60 characters).
Give ``measured=`` (from ``measure``) for fds/RSS before→after the case, or ``proc=``
for a single snapshot taken now (shown as ``?→now``).  ``proc`` / ``measure(proc)``
accept a ``tests.conftest.HarpProcess``, a ``subprocess.Popen`` or a pid.

``measure(proc)`` is a context manager yielding a :class:`Measurement`; its
``fds_before``/``rss_before`` are read on entry, ``fds_after``/``rss_after`` on exit
(RSS in KiB from ``VmRSS``, fds = entries of ``/proc/<pid>/fd``).  ``m.snapshot()``
re-reads the after values at any time inside the block (e.g. while connections are held).

For annotations: ``from tests.hardening.conftest import RecordCase, Measurement``.
Raw-socket tools (a recording upstream, a byte-level client, distinct loopback source
addresses so bans do not leak between cases) live in ``tests/hardening/helpers.py``.

Each row also gets the test's result (PASS / FAIL / SKIP), filled in after the test ran,
so call ``record_case`` *before* the assertions.  At the end of the session the table is
printed (also under ``-q``) and written to ``$HARP_HARDENING_REPORT`` or, by default,
``build/hardening-report.txt`` in the repository (``build/`` is not committed).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import new_key
from tests.hardening.helpers import RecordingUpstream

INPUT_WIDTH = 60
CELL_WIDTH = 48


# --- process measurements


def _pid(proc: Any) -> int:
    if isinstance(proc, int):
        return proc
    if isinstance(proc, subprocess.Popen):
        return proc.pid
    inner = getattr(proc, "proc", None)  # tests.conftest.HarpProcess
    if isinstance(inner, subprocess.Popen):
        return inner.pid
    pid = getattr(proc, "pid", None)
    if isinstance(pid, int):
        return pid
    raise TypeError(f"cannot find a pid in {proc!r}")


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Measurement:
    """fds and RSS (KiB) of one process before and after a case; None = unreadable."""

    pid: int
    fds_before: int | None = None
    rss_before: int | None = None
    fds_after: int | None = None
    rss_after: int | None = None

    def snapshot(self) -> Measurement:
        """Read the current values into the ``after`` fields."""
        self.fds_after = fd_count(self.pid)
        self.rss_after = rss_kib(self.pid)
        return self


@contextmanager
def measure_process(proc: Any) -> Iterator[Measurement]:
    pid = _pid(proc)
    m = Measurement(pid, fd_count(pid), rss_kib(pid))
    try:
        yield m
    finally:
        m.snapshot()


# --- the table


@dataclass
class Row:
    nodeid: str
    case: str
    input: str
    expected: str
    observed: str
    fds: str
    rss: str
    note: str = ""
    result: str = "?"


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)


RESULTS = Results()


def _show_input(value: bytes | str) -> str:
    text = repr(value) if isinstance(value, bytes | bytearray) else str(value)
    return _cut(text, INPUT_WIDTH)


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def _num(value: int | None) -> str:
    return "?" if value is None else str(value)


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 1024:.1f}M"


RecordCase = Callable[..., None]


@pytest.fixture
def record_case(request: pytest.FixtureRequest) -> RecordCase:
    """A callable adding one row to the session's hardening table (see module docstring)."""
    nodeid = request.node.nodeid

    def record(
        *, case: str, input: bytes | str, expected: str, observed: str,
        measured: Measurement | None = None, proc: Any = None, note: str = "",
    ) -> None:
        if measured is None and proc is not None:
            pid = _pid(proc)
            measured = Measurement(pid, None, None, fd_count(pid), rss_kib(pid))
        if measured is not None:
            fds = f"{_num(measured.fds_before)}→{_num(measured.fds_after)}"
            rss = f"{_mib(measured.rss_before)}→{_mib(measured.rss_after)}"
        else:
            fds = rss = "-"
        RESULTS.rows.append(Row(nodeid, case, _show_input(input), str(expected),
                                str(observed), fds, rss, note))

    return record


@pytest.fixture
def measure() -> Callable[[Any], Any]:
    """``with measure(harp) as m: ...``: fds / RSS before and after (see module docstring)."""
    return measure_process


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when == "setup" and report.passed:
        return
    if report.when == "teardown" and report.passed:
        return
    verdict = "PASS" if report.passed else "SKIP" if report.skipped else "FAIL"
    for row in RESULTS.rows:
        if row.nodeid == item.nodeid and (row.result in ("?", "PASS")):
            row.result = verdict


def _table() -> list[str]:
    header = ("result", "case", "input", "expected", "observed", "fds", "RSS")
    body = [
        (r.result, r.case, r.input, _cut(r.expected, CELL_WIDTH),
         _cut(r.observed + (f" [{r.note}]" if r.note else ""), CELL_WIDTH), r.fds, r.rss)
        for r in RESULTS.rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out.extend(line(row) for row in body)
    failed = sum(1 for r in RESULTS.rows if r.result == "FAIL")
    out.append(f"{len(RESULTS.rows)} cases, {failed} in failing tests")
    return out


def _report_path(config: pytest.Config) -> Path:
    explicit = os.environ.get("HARP_HARDENING_REPORT")
    if explicit:
        return Path(explicit)
    return Path(str(config.rootpath)) / "build" / "hardening-report.txt"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    if not RESULTS.rows:
        return
    lines = _table()
    terminalreporter.section("hardening cases")
    for text in lines:
        terminalreporter.write_line(text)
    path = _report_path(config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as exc:
        terminalreporter.write_line(f"hardening report not written to {path}: {exc}")
    else:
        terminalreporter.write_line(f"hardening report written to {path}")


# --- shared peers (module-scoped: one per test module)


@pytest.fixture(scope="module")
def key() -> str:
    """The shared key of the module's HaRP."""
    return new_key()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    """A raw recording upstream that keeps every byte it receives."""
    with RecordingUpstream() as up:
        yield up
