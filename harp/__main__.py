"""``python -m harp``: operator commands beside ``twistd -n harp``.

``healthcheck`` asks the running HaRP's ``/heartbeat`` through its HTTP frontend, so a
hung reactor is detected, not just an open port (the reference's healthcheck.sh does the
same).  Exit code 0 = healthy, 1 = not, 2 = bad configuration.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from harp.config import ConfigError, Settings


def healthcheck(settings: Settings) -> int:
    address = settings.exapps_address
    host = address.loopback_host
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(
        f"http://{host}:{address.port}/exapps/app_api/heartbeat",
        headers={"harp-shared-key": settings.shared_key},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except OSError as exc:
        sys.stderr.write(f"harp healthcheck: {exc}\n")
        return 1


def main(argv: list[str]) -> int:
    if argv[:1] != ["healthcheck"]:
        sys.stderr.write("usage: python -m harp healthcheck\n")
        return 2
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"harp: configuration error: {exc.line()}\n")
        return 2
    return healthcheck(settings)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
