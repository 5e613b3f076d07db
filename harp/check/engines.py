"""Docker engines: the local one on ``HP_DOCKER_SOCKET`` and each live FRP engine.

The local engine is asked directly (``/_ping``, then ``/version``), as HaRP would reach
it.  FRP engines exist only inside the running HaRP (an frpc that logged in), so they
are asked through HaRP's own control plane, exactly as AppAPI asks: ``GET
/exapps/app_api/v1.44/_ping`` with ``docker-engine-port`` (the version AppAPI calls:
``--docker-api-version``).  HaRP listens on ``127.0.0.1:<port>`` for each live tunnel, so
only the engine ports that cannot be bound here are asked about (a port without an engine
would answer 503): a check run adds a line or two to HaRP's access log, not a hundred.
The check must therefore run where HaRP runs (``docker exec harp python -m harp check``).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Final

from harp.check import http
from harp.check.frontends import base_url
from harp.check.result import Result, failed, passed, skipped
from harp.config import Settings
from harp.docker.engines import LOCAL_PORT, PORT_HEADER, REMOTE_PORTS
from harp.frp.tunnels import BIND_HOST

LOCAL: Final = "docker"
REMOTE: Final = "frp-engines"
#: The Docker API version AppAPI 32.0.3 and newer call (docs/compatibility.md); from
#: Nextcloud 33.0.1 app_api's ``docker_api_version`` setting may change it.
APPAPI_API_VERSION: Final = "1.44"


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return ()


def _too_old_fix(wanted: str) -> str:
    return (
        f"upgrade the Docker engine (API {wanted} needs Docker 25 or newer for 1.44), or set "
        "app_api's docker_api_version in Nextcloud (33.0.1+) to what the engine speaks and "
        "pass it here with --docker-api-version"
    )


def judge_version(where: str, reply: http.Reply, wanted: str = APPAPI_API_VERSION) -> Result:
    """The local engine's ``/version`` answer (after a good ``/_ping``): it must speak
    the API version AppAPI calls (``wanted``)."""
    try:
        body = json.loads(reply.body)
    except ValueError:
        body = None
    if reply.status != 200 or not isinstance(body, dict):
        return failed(LOCAL, f"{where}: /version answered HTTP {reply.status}",
                      "HP_DOCKER_SOCKET must be a Docker Engine API socket")
    api = str(body.get("ApiVersion", "?"))
    detail = f"Docker {body.get('Version', '?')} (API {api}) on {where}"
    if _version(api) and _version(api) < _version(wanted):
        return failed(
            LOCAL, detail + f": too old for API {wanted}, which AppAPI calls",
            _too_old_fix(wanted),
        )
    return passed(LOCAL, detail)


def local_engine(socket_path: Path, wanted: str = APPAPI_API_VERSION) -> Result:
    where = f"unix:{socket_path}"
    if not socket_path.exists():
        return skipped(
            LOCAL, f"no local engine: {socket_path} does not exist (remote engines over "
            "FRP only; AppAPI's default port 24000 then needs an frpc on 24000)",
        )
    try:
        ping = http.unix_get(str(socket_path), "/_ping")
        if ping.status != 200:
            return failed(LOCAL, f"{where}: /_ping answered HTTP {ping.status}",
                          "HP_DOCKER_SOCKET must be a Docker Engine API socket")
        return judge_version(where, http.unix_get(str(socket_path), "/version"), wanted)
    except http.Unreachable as exc:
        if "permission" in exc.reason:
            fix = "let the user HaRP runs as use the socket (e.g. the docker group)"
        else:
            fix = ("start the Docker engine, or mount its socket into HaRP's container "
                   "(-v /var/run/docker.sock:/var/run/docker.sock)")
        return failed(LOCAL, f"{where}: {exc.reason}", fix)


def judge_engines(
    pings: dict[int, http.Reply], local_present: bool, wanted: str = APPAPI_API_VERSION
) -> Result:
    """The ``/v<wanted>/_ping`` answers of each engine port through HaRP (503 = no engine
    there), as AppAPI's "Check connection" asks them."""
    live = {port: reply for port, reply in sorted(pings.items()) if reply.status != 503}
    broken = [port for port, reply in live.items() if reply.status != 200]
    too_old = [port for port in broken if live[port].status == 400]
    if too_old:
        return failed(
            REMOTE, f"refusing API {wanted} (too old): " + ", ".join(map(str, too_old)),
            _too_old_fix(wanted),
        )
    if broken:
        return failed(
            REMOTE, "connected but not answering /_ping: " + ", ".join(
                f"{port} (HTTP {live[port].status})" for port in broken),
            "check the Docker engine on the machine that frpc runs on, and frpc's "
            "unixPath (the engine's socket)",
        )
    if not live:
        if not local_present:
            return failed(
                REMOTE, "no Docker engine at all: no local socket and no FRP engine connected",
                "mount the Docker socket (HP_DOCKER_SOCKET), or connect a remote engine's "
                "frpc (python -m harp frpc-config engine --help)",
            )
        return skipped(REMOTE, "no FRP engine connected")
    names = []
    for port, reply in live.items():
        server = reply.headers.get("server", "")
        api = reply.headers.get("api-version", "")
        names.append(f"{port} ({server or 'Docker'}{f', API {api}' if api else ''})")
    return passed(REMOTE, "answering /_ping: " + ", ".join(names))


def listening(port: int, host: str = BIND_HOST) -> bool:
    """True if something listens on ``host:port`` (it cannot be bound); connects nowhere."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def frp_engines(
    settings: Settings, harp_running: bool, local_present: bool,
    wanted: str = APPAPI_API_VERSION,
) -> Result:
    if not harp_running:
        return skipped(REMOTE, "not checked: HaRP's control plane did not answer (see harp-http)")
    key = {"harp-shared-key": settings.shared_key}
    candidates = list(REMOTE_PORTS) if local_present else [LOCAL_PORT, *REMOTE_PORTS]
    ports = [port for port in candidates if listening(port)]
    if not ports:
        return judge_engines({}, local_present, wanted)
    conn, _ = http.connection(base_url("http", settings.exapps_address))
    try:
        pings = {
            port: http.exchange(conn, f"/exapps/app_api/v{wanted}/_ping",
                                {**key, PORT_HEADER.decode(): str(port)})
            for port in ports
        }
    except http.Unreachable as exc:
        return failed(REMOTE, f"asking HaRP failed: {exc.reason}",
                      "see harp-http; HaRP must answer on HP_EXAPPS_ADDRESS")
    finally:
        conn.close()
    return judge_engines(pings, local_present, wanted)
