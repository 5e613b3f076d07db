"""Prometheus metrics for ``GET /exapps/app_api/metrics`` (docs/differences.md#9).

Counting must not slow the hot path: a finished request costs two dict increments
and two float additions.  Gauges (bans, ExApps, tunnels) are computed only when
scraped, from callables registered at wiring time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from harp import __version__

CONTENT_TYPE: Final = b"text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.responses: dict[int, int] = {}
        self.drops: dict[str, int] = {}
        self.request_seconds = 0.0
        self.requests = 0
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []

    def response(self, status: int, seconds: float) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1
        self.requests += 1
        self.request_seconds += seconds

    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def counters(self) -> dict[str, Any]:
        """The counters as plain JSON data (a worker's share, see :mod:`harp.workers`)."""
        return {
            "responses": {str(code): n for code, n in self.responses.items()},
            "drops": dict(self.drops),
            "request_seconds": self.request_seconds,
            "requests": self.requests,
        }

    def add_counters(self, shares: Iterable[dict[str, Any]]) -> None:
        """Add other processes' :meth:`counters` to these (HP_WORKERS > 1)."""
        for share in shares:
            for code, n in share.get("responses", {}).items():
                self.responses[int(code)] = self.responses.get(int(code), 0) + int(n)
            for reason, n in share.get("drops", {}).items():
                self.drops[str(reason)] = self.drops.get(str(reason), 0) + int(n)
            self.request_seconds += float(share.get("request_seconds", 0.0))
            self.requests += int(share.get("requests", 0))

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges.append((name, help_text, read))

    def render(self) -> bytes:
        out = [
            "# HELP harp_info HaRP build information.",
            "# TYPE harp_info gauge",
            f'harp_info{{version="{__version__}"}} 1',
            "# HELP harp_responses_total Responses on the ExApp frontends, by status.",
            "# TYPE harp_responses_total counter",
        ]
        out += [
            f'harp_responses_total{{code="{code}"}} {n}'
            for code, n in sorted(self.responses.items())
        ]
        out += [
            "# HELP harp_dropped_total Connections closed without a response, by reason.",
            "# TYPE harp_dropped_total counter",
        ]
        out += [
            f'harp_dropped_total{{reason="{_label(r)}"}} {n}' for r, n in sorted(self.drops.items())
        ]
        out += [
            "# HELP harp_request_duration_seconds Time from request head to response end.",
            "# TYPE harp_request_duration_seconds summary",
            f"harp_request_duration_seconds_sum {self.request_seconds:.6f}",
            f"harp_request_duration_seconds_count {self.requests}",
        ]
        for name, help_text, read in self._gauges:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return ("\n".join(out) + "\n").encode()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
