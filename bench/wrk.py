"""Running wrk (Debian's ``wrk``) and reading its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Final

_UNITS: Final = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_BYTES: Final = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    #: bytes per second read by wrk (headers included)
    bytes_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    #: non-2xx/3xx answers plus socket errors (connect, read, write, timeout)
    errors: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes_per_s / (1 << 20)


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"unreadable wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(out: str) -> WrkResult:
    """The figures of one wrk run (``--latency`` output)."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, out)
        if match is None:
            raise ValueError(f"wrk output without {pattern!r}:\n{out}")
        return match

    rps = float(find(r"Requests/sec:\s+([\d.]+)").group(1))
    transfer = find(r"Transfer/sec:\s+([\d.]+)([KMGT]?B)")
    p50 = _ms(find(r"\n\s+50%\s+(\S+)").group(1))
    p99 = _ms(find(r"\n\s+99%\s+(\S+)").group(1))
    requests = int(find(r"(\d+) requests in").group(1))
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return WrkResult(
        rps=rps,
        bytes_per_s=float(transfer.group(1)) * _BYTES[transfer.group(2)],
        p50_ms=p50,
        p99_ms=p99,
        requests=requests,
        errors=errors,
    )


def run(
    url: str,
    headers: dict[str, str],
    duration: float,
    connections: int,
    threads: int = 2,
    timeout_s: int = 30,
) -> WrkResult:
    """``wrk -t<threads> -c<connections> -d<duration>s --latency`` against ``url``."""
    args = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{duration:g}s",
        f"--timeout={timeout_s}s", "--latency",
    ]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    args.append(url)
    done = subprocess.run(
        args, capture_output=True, text=True, check=False, timeout=duration + timeout_s + 30
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)
