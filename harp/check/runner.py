"""Run every check in order, print one line each, and decide the exit status.

The order follows the path of a request: configuration, certificates, HaRP's own ports,
Nextcloud (reachable, key, clock), Redis, Kubernetes, Docker engines.  Later checks use what
earlier ones found (no point probing FRP engines through a HaRP that is not running).

Exit status: 0 when every check passed or had nothing to check, 1 when any warned or
failed, 2 when the configuration is invalid (as the daemon: the same one line).
The shared key is never printed: every line is scrubbed of it before it is written.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping
from typing import TextIO

from harp.check import build, certs, engines, frontends, kubernetes, nextcloud, redis
from harp.check.result import Result, Status, failed, passed
from harp.compiled import MODULES, compiled_modules
from harp.config import ConfigError, Settings

CONFIG = "config"


def format_line(result: Result) -> str:
    line = f"{result.status.value}  {result.name:<11} {result.detail}"
    if not result.status.ok and result.fix:
        line += f" -- fix: {result.fix}"
    return line


def checks(settings: Settings, app_id: str | None, docker_api: str) -> Iterator[Result]:
    now = datetime.datetime.now(datetime.UTC)
    remarks = "; ".join(settings.warnings)
    yield passed(CONFIG, "environment valid" + (f" ({remarks})" if remarks else ""))
    yield build.build(compiled_modules(), MODULES)
    yield certs.https_certificate(settings.https_cert_path, now)
    yield certs.frp_certificates(settings.frp_certs_dir, settings.frp_disable_tls, now)
    http_result = frontends.http_frontend(settings)
    yield http_result
    yield frontends.https_frontend(settings)
    yield frontends.frp_port(settings)
    found = nextcloud.probe(settings.nc_instance_url, settings.shared_key, app_id)
    yield nextcloud.reachable(found)
    yield nextcloud.shared_key(found, app_id)
    yield nextcloud.clock(found)
    yield redis.redis_state(settings.redis_url)
    yield kubernetes.kubernetes(settings.k8s)
    local = engines.local_engine(settings.docker_socket, docker_api)
    yield local
    yield engines.frp_engines(
        settings, harp_running=http_result.status is Status.PASS,
        local_present=local.status is not Status.SKIP, wanted=docker_api,
    )


def run(
    env: Mapping[str, str], out: TextIO, app_id: str | None = None,
    docker_api: str = engines.APPAPI_API_VERSION,
) -> int:
    try:
        settings = Settings.from_env(env)
    except ConfigError as exc:
        out.write(format_line(failed(
            CONFIG, exc.line(), "see docs/configuration.md for the accepted values")) + "\n")
        return 2
    worst = 0
    for result in checks(settings, app_id, docker_api):
        out.write(format_line(result).replace(settings.shared_key, "<shared key>") + "\n")
        out.flush()
        if not result.status.ok:
            worst = 1
    out.write("all checks passed\n" if worst == 0 else "some checks did not pass\n")
    return worst
