"""Benchmark: direct upstream vs. through HaRP, printed as one table.

    python -m bench.bench_proxy [--duration 10] [--connections 32]

Scenarios (all on 127.0.0.1, each side measured with the same client):

- ``public route``: GET ``/public`` of the real nc_py_api test ExApp (uvicorn), with
  wrk; through HaRP it is ``/exapps/<app>/public`` on a PUBLIC route (route check,
  identity headers, pooled keep-alive upstream).  The reference HaRP reaches about
  0.19x of direct on a 2-core machine.
- ``user route (cached)``: the same on a USER route with a session cookie, answered
  from the user-info cache (fake Nextcloud behind it).
- ``1 MB`` / ``100 MB`` download: sequential transfers with one keep-alive client,
  MB/s, from a plain Python upstream.

wrk is Debian's package ``wrk``.  Nothing here asserts timings: it prints numbers.
"""

from __future__ import annotations

import argparse
import http.client
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.conftest import HarpProcess, base_env, new_key
from tests.peers.bulk_upstream import BulkUpstream
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud

MB = 1 << 20


def wrk(url: str, headers: dict[str, str], duration: int, connections: int) -> tuple[float, str]:
    args = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url]
    for name, value in headers.items():
        args[1:1] = ["-H", f"{name}: {value}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"99%\s+(\S+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"warning: {errors.group(1)} non-2xx answers from {url}", file=sys.stderr)
    return rps, p99.group(1) if p99 else "?"


def transfer(port: int, path: str, size: int, rounds: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    start = time.perf_counter()
    for _ in range(rounds):
        conn.request("GET", path)
        resp = conn.getresponse()
        got = 0
        while block := resp.read(1 << 18):
            got += len(block)
        assert got == size, (got, size)
    elapsed = time.perf_counter() - start
    conn.close()
    return size * rounds / MB / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2

    key = new_key()
    work = Path(tempfile.mkdtemp(prefix="harp-bench-"))
    rows: list[tuple[str, str, str, str]] = []
    with FakeNextcloud(key) as nc, BulkUpstream() as bulk, ExAppProcess(
        app_id="bench", log_path=work / "exapp.log"
    ) as app:
        nc.add_session("bench-session", "bench-user", 1)
        nc.apps["bench"] = {
            "exapp_token": app.secret, "exapp_version": app.version, "host": "127.0.0.1",
            "port": app.port,
            "routes": [{"url": "^/public$", "access_level": 0},
                       {"url": "^/user$", "access_level": 1}],
        }
        nc.apps["bulk"] = {"exapp_token": "t", "exapp_version": "1", "host": "127.0.0.1",
                           "port": bulk.port, "routes": [{"url": "^/", "access_level": 0}]}
        harp = HarpProcess(base_env(
            work, HP_SHARED_KEY=key, NC_INSTANCE_URL=nc.url, HP_FRP_DISABLE_TLS="true",
            HP_LOG_LEVEL="warning", HP_SESSION_LIFETIME="10",
        ), work).start()
        try:
            direct = f"http://127.0.0.1:{app.port}"
            via = f"http://127.0.0.1:{harp.http_port}/exapps/bench"
            for label, route, user, extra in (
                ("public route", "/public", "", {}),
                ("user route (cached)", "/user", "bench-user",
                 {"Cookie": "oc_sessionPassphrase=bench-session"}),
            ):
                identity = app.identity_headers(user)
                d_rps, d_p99 = wrk(direct + route, identity, args.duration, args.connections)
                h_rps, h_p99 = wrk(via + route, extra, args.duration, args.connections)
                rows.append((label + " req/s", f"{d_rps:,.0f}", f"{h_rps:,.0f}",
                             f"{h_rps / d_rps:.2f}x"))
                rows.append((label + " p99", d_p99, h_p99, ""))
            for label, size, rounds in (("1 MB download MB/s", MB, 200),
                                        ("100 MB download MB/s", 100 * MB, 3)):
                d = transfer(bulk.port, f"/bytes/{size}", size, rounds)
                h = transfer(harp.http_port, f"/exapps/bulk/bytes/{size}", size, rounds)
                rows.append((label, f"{d:,.0f}", f"{h:,.0f}", f"{h / d:.2f}x"))
        finally:
            harp.stop()

    width = max(len(r[0]) for r in rows)
    print(f"{'scenario'.ljust(width)} | {'direct':>10} | {'via HaRP':>10} | ratio")
    print("-" * (width + 36))
    for name, direct_v, via_v, ratio in rows:
        print(f"{name.ljust(width)} | {direct_v:>10} | {via_v:>10} | {ratio}")
    print(f"\n(wrk: 2 threads, {args.connections} connections, {args.duration}s each; "
          f"reference HaRP: public route ≈ 0.19x of direct)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
