"""The benchmark scenarios, each as "this path direct" vs "that path through HaRP".

``ref_ratio`` is the reference HaRP's ratio (through the proxy ÷ direct to nginx) measured on
the same 2-core machine and published with its benchmark; ``ref_p99_ms`` its p99 where published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.harness import APP_ID, APP_VERSION, SESSION, Stack


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    #: path on nginx ("direct")
    direct_path: str
    #: path on HaRP
    harp_path: str
    #: headers for both sides (a Cookie or Authorization header costs nginx nothing)
    headers: Callable[[Stack], dict[str, str]] = field(default=lambda stack: {})
    #: headers for a measured reference HaRP, where they must differ (``None``: the same)
    reference_headers: Callable[[Stack], dict[str, str]] | None = None
    connections: int = 50
    #: bulk transfer: compare MB/s instead of req/s
    bulk: bool = False
    https: bool = False
    ref_ratio: float | None = None
    ref_p50_ms: float | None = None
    ref_p99_ms: float | None = None
    ref_rps: float | None = None


def _signed(stack: Stack) -> dict[str, str]:
    return {
        "ex-app-version": APP_VERSION,
        "ex-app-id": APP_ID,
        "ex-app-host": "127.0.0.1",
        "ex-app-port": str(stack.nginx.port),
        "harp-shared-key": stack.key,
        "authorization-app-api": stack.app_api_auth(),
    }


def _ping(stack: Stack) -> dict[str, str]:
    return {"harp-shared-key": stack.key, "docker-engine-port": "24000"}


def _ping_reference(stack: Stack) -> dict[str, str]:
    """The reference reaches a local engine through its own FRP server and client (port
    24000 is an ``frpc`` tunnel to the socket), which the bench cannot start for it; it is
    sent straight to nginx's TCP port instead.  That spares it two hops, so its ``_ping``
    figure is the best it could reach."""
    return {"harp-shared-key": stack.key, "docker-engine-port": str(stack.nginx.port)}


_APP = f"/exapps/{APP_ID}"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("public", "public route, 1 KB", "/public/1k", f"{_APP}/public/1k",
             ref_ratio=0.205, ref_p50_ms=2.8, ref_p99_ms=8.1),
    Scenario("cookie", "USER route, cached cookie session", "/user/1k", f"{_APP}/user/1k",
             headers=lambda stack: {"Cookie": f"oc_sessionPassphrase={SESSION}"},
             ref_ratio=0.247),
    Scenario("basic", "USER route, Basic app password", "/user/1k", f"{_APP}/user/1k",
             headers=lambda stack: {"Authorization": stack.basic_auth()}, ref_ratio=0.081),
    Scenario("signed", "AppAPI-signed request", "/1k", f"{_APP}/1k", headers=_signed,
             ref_ratio=0.200),
    Scenario("ping", "Docker `_ping` passthrough", "/v1.44/_ping",
             "/exapps/app_api/v1.44/_ping", headers=_ping,
             reference_headers=_ping_reference, ref_ratio=0.165),
    Scenario("https", "public route over HTTPS (direct = plain HTTP)", "/public/1k",
             f"{_APP}/public/1k", https=True, ref_ratio=0.214),
    Scenario("1m", "1 MB GET (c50)", "/1m", f"{_APP}/1m", bulk=True, ref_ratio=0.568),
    Scenario("100m", "100 MB GET (c8)", "/100m", f"{_APP}/100m", connections=8, bulk=True,
             ref_ratio=0.683),
    Scenario("c500", "public route, 1 KB at c500", "/public/1k", f"{_APP}/public/1k",
             connections=500, ref_p99_ms=62.0, ref_rps=15_700.0),
)

BY_NAME = {scenario.name: scenario for scenario in SCENARIOS}
