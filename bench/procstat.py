"""CPU time and memory of a process tree, read from ``/proc`` (Linux only).

HaRP may fork serving workers, so every figure covers the ``twistd`` process and all its
descendants, found by walking the ``ppid`` field of ``/proc/*/stat``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the ``(comm)`` field (which may contain spaces)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """utime + stime of each pid, in seconds (pids that vanished are left out)."""
    out = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # after "(comm)": state=0, ppid=1, ..., utime=11, stime=12
            out[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, slots=True)
class Memory:
    total: int
    largest: int
    processes: int


def memory(root: int) -> Memory:
    sizes = [rss_bytes(pid) for pid in tree(root)]
    return Memory(sum(sizes), max(sizes, default=0), len(sizes))


class CpuMeter:
    """CPU% of a process tree over an interval (100 = one core busy)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self._start: dict[int, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._start = cpu_seconds(tree(self.root))
        self._t0 = _now()

    def stop(self) -> float:
        end = cpu_seconds(tree(self.root))
        elapsed = _now() - self._t0
        used = sum(t - self._start.get(pid, 0.0) for pid, t in end.items())
        return 100.0 * used / elapsed if elapsed > 0 else 0.0


def _now() -> float:
    return time.monotonic()
