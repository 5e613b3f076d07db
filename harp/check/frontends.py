"""Is the HaRP this environment describes running, and are its ports bound?

Asked the way a client would: ``GET /exapps/app_api/info`` with the shared key on the
HTTP frontend (and on the HTTPS one when ``cert.pem`` exists), a TCP connect on the FRP
port.  A refused connection means HaRP is not running with this environment (or listens
elsewhere); a 401 means the HaRP that runs has another key, the commonest reason for
AppAPI's "cannot reach HaRP"; any other answer means another program holds the port.
"""

from __future__ import annotations

import json
import socket
import ssl
from typing import Final

from harp.check import http
from harp.check.result import Result, failed, passed, skipped
from harp.config import Address, Settings

HTTP: Final = "harp-http"
HTTPS: Final = "harp-https"
FRP: Final = "harp-frp"
INFO_PATH: Final = "/exapps/app_api/info"

_NOT_RUNNING_FIX = (
    "start HaRP with this environment (twistd -n harp, or the container) and read its log "
    "if it exits; run this check with the daemon's own environment "
    "(docker exec harp python -m harp check)"
)


def base_url(scheme: str, address: Address) -> str:
    host = address.loopback_host
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{address.port}"


def judge_info(name: str, where: str, reply: http.Reply) -> Result:
    """The answer of ``/info`` on one frontend, as a result."""
    try:
        body = json.loads(reply.body) if reply.status == 200 else None
    except ValueError:
        body = None
    if isinstance(body, dict) and "version" in body:
        return passed(name, f"HaRP {body['version']} answers on {where}")
    if reply.status == 401:
        return failed(
            name, f"the HaRP on {where} refuses HP_SHARED_KEY: it runs with another key",
            "give the daemon and this check the same HP_SHARED_KEY (or HP_SHARED_KEY_FILE); "
            "each refused request counts toward HaRP's ban of this address "
            "(HP_BLACKLIST_COUNT), so fix this before running the check again",
        )
    return failed(
        name, f"{where} answers HTTP {reply.status}, but not as HaRP",
        "another program holds this port: stop it or move HaRP with HP_EXAPPS_ADDRESS / "
        "HP_EXAPPS_HTTPS_ADDRESS",
    )


def _info(name: str, scheme: str, address: Address, key: str) -> Result:
    # Only the port is checked here: the certificate is https-cert's business, and a
    # certificate for the public name never matches the loopback address anyway.
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE
    where = f"{address.loopback_host}:{address.port}"
    try:
        reply = http.get(base_url(scheme, address) + INFO_PATH, {"harp-shared-key": key},
                         tls=tls)
    except http.Unreachable as exc:
        return failed(name, f"{where}: {exc.reason}: HaRP is not running here",
                      _NOT_RUNNING_FIX)
    return judge_info(name, where, reply)


def http_frontend(settings: Settings) -> Result:
    return _info(HTTP, "http", settings.exapps_address, settings.shared_key)


def https_frontend(settings: Settings) -> Result:
    if not settings.https_cert_path.exists():
        return skipped(HTTPS, "HTTPS frontend off (no cert.pem)")
    return _info(HTTPS, "https", settings.exapps_https_address, settings.shared_key)


def frp_port(settings: Settings) -> Result:
    """A TCP connect: frpc's first step.  Nothing is sent (no login is attempted)."""
    address = settings.frp_address
    where = f"{address.loopback_host}:{address.port}"
    try:
        with socket.create_connection((address.loopback_host, address.port), http.TIMEOUT):
            pass
    except OSError as exc:
        return failed(FRP, f"{where}: {http.describe(exc)}: HaRP's FRP port is not bound",
                      _NOT_RUNNING_FIX)
    tls = "without TLS" if settings.frp_disable_tls else "with TLS"
    return passed(FRP, f"FRP port {where} accepts connections ({tls})")
