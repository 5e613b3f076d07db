"""Benchmark: nginx direct vs. through HaRP, per scenario, as one table.

    python -m bench [--duration 10] [--reps 3] [--scenario public] [--markdown]

The bench starts its own nginx (the upstream, also standing in for the Docker engine on a unix
socket), a fake Nextcloud and the real ``twistd harp`` (``HP_LOG_LEVEL=warning``), then runs
``wrk -t2 -c50 --latency`` (c8 for 100 MB, c500 for the latency row) against nginx directly and
through HaRP, interleaved (direct, HaRP, direct, HaRP, ...) for ``--reps`` rounds, and prints
medians: req/s (MB/s for the bulk rows), the ratio HaRP ÷ direct (median of the per-round
ratios), the reference HaRP's published ratio and ours ÷ that, HaRP's p50/p99, the CPU%
of HaRP's processes during its runs (100 = one core) and their RSS after.  Before all that,
2 000 idle connections: the fresh HaRP's RSS growth per connection.

A reference HaRP can be measured side by side (``--reference http://127.0.0.1:8780``): start it
with ``NC_INSTANCE_URL`` pointing at the bench's fake Nextcloud and the same key, e.g.
``--nextcloud-port 18000 --shared-key bench-key``; it then learns the ExApp ``bench`` with
the bench's nginx as upstream (fix that port with ``--nginx-port``: the reference keeps the
address it learnt).  ``--reference-pid`` adds its CPU%.  How it was run for the README:
bench/README.md.

Needs ``wrk`` and ``nginx`` (Debian packages).  Nothing here asserts timings.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from bench import idle, procstat, wrk
from bench.harness import Stack, stack
from bench.nginx import NGINX
from bench.report import Row, markdown, text
from bench.scenarios import BY_NAME, SCENARIOS, Scenario

MB = 1 << 20


def _harp_base(stack_: Stack, scenario: Scenario) -> str:
    return stack_.harp_https_url if scenario.https else stack_.harp_url


def _reference_base(args: argparse.Namespace, scenario: Scenario) -> str | None:
    if scenario.https:
        return args.reference_https
    return args.reference


def _reference_headers(stack_: Stack, scenario: Scenario) -> dict[str, str]:
    chosen = scenario.reference_headers or scenario.headers
    return chosen(stack_)


def _connections(args: argparse.Namespace, scenario: Scenario) -> int:
    return args.connections if scenario.connections == 50 else scenario.connections


def warm_up(stack_: Stack, args: argparse.Namespace, scenarios: list[Scenario]) -> None:
    """One short run per path: caches filled, upstream pools opened, nginx files cached."""
    for sc in scenarios:
        headers = sc.headers(stack_)
        bases = [stack_.nginx.url, _harp_base(stack_, sc)]
        ref = _reference_base(args, sc)
        runs = [(bases[0] + sc.direct_path, headers), (bases[1] + sc.harp_path, headers)]
        if ref:
            runs.append((ref.rstrip("/") + sc.harp_path, _reference_headers(stack_, sc)))
        for url, url_headers in runs:
            wrk.run(url, url_headers, 1, min(_connections(args, sc), 8 if sc.bulk else 50))


def run_scenario(stack_: Stack, args: argparse.Namespace, sc: Scenario) -> Row:
    row = Row(sc)
    headers = sc.headers(stack_)
    ref_headers = _reference_headers(stack_, sc)
    conns = _connections(args, sc)
    direct_url = stack_.nginx.url + sc.direct_path
    harp_url = _harp_base(stack_, sc) + sc.harp_path
    ref_base = _reference_base(args, sc)
    meter = procstat.CpuMeter(stack_.pid)
    ref_meters = [procstat.CpuMeter(pid) for pid in args.reference_pid]
    for rep in range(args.reps):
        row.direct.append(wrk.run(direct_url, headers, args.duration, conns))
        meter.start()
        row.harp.append(wrk.run(harp_url, headers, args.duration, conns))
        row.cpu.append(meter.stop())
        mem = procstat.memory(stack_.pid)
        row.rss.append(mem.total)
        row.rss_largest.append(mem.largest)
        row.processes = mem.processes
        if ref_base:
            for ref_meter in ref_meters:
                ref_meter.start()
            row.reference.append(wrk.run(ref_base.rstrip("/") + sc.harp_path, ref_headers,
                                         args.duration, conns))
            if ref_meters:
                row.reference_cpu.append(sum(ref_meter.stop() for ref_meter in ref_meters))
        last = row.harp[-1]
        print(
            f"  {sc.name} rep {rep + 1}/{args.reps}: direct "
            f"{row.value(row.direct[-1]):,.0f}, HaRP {row.value(last):,.0f}"
            f"{' MB/s' if sc.bulk else ' req/s'}, p99 {last.p99_ms:.1f} ms, "
            f"CPU {row.cpu[-1]:.0f}%, errors {last.errors}",
            file=sys.stderr, flush=True,
        )
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", action="append", choices=sorted(BY_NAME),
                        help="run only this scenario (repeatable); default: all")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk run")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds per scenario")
    parser.add_argument("--connections", type=int, default=50,
                        help="wrk connections of the c50 rows (default 50)")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument("--idle", type=int, default=2000,
                        help="idle connections to open at the end (0: skip)")
    parser.add_argument("--reference", metavar="URL",
                        help="base URL of a running reference HaRP's HTTP frontend")
    parser.add_argument("--reference-https", metavar="URL",
                        help="base URL of the reference's HTTPS frontend")
    parser.add_argument("--reference-pid", type=int, action="append", default=[], metavar="PID",
                        help="a process of the reference (with its children) whose CPU to "
                             "report, e.g. HAProxy's master and the agent (repeatable)")
    parser.add_argument("--shared-key", help="HP_SHARED_KEY (default: random)")
    parser.add_argument("--nextcloud-port", type=int, default=0,
                        help="fixed port for the fake Nextcloud (default: any)")
    parser.add_argument("--nginx-port", type=int, default=None,
                        help="fixed port for nginx (default: any)")
    parser.add_argument("--harp-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for HaRP, e.g. HP_WORKERS=2 (repeatable)")
    return parser.parse_args(argv)


def _build(pid: int) -> str:
    """Whether the HaRP under test runs its compiled modules (harp/compiled.py): the
    figures of the two builds differ by about a third."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "unknown"
    return "compiled (mypyc)" if "harp__mypyc" in maps else "interpreted"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", NGINX):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install wrk nginx-light", file=sys.stderr)
            return 2
    extra = {}
    for item in args.harp_env:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"--harp-env wants NAME=VALUE, not {item!r}", file=sys.stderr)
            return 2
        extra[name] = value
    scenarios = [BY_NAME[name] for name in args.scenario] if args.scenario else list(SCENARIOS)
    with_reference = bool(args.reference or args.reference_https)

    started = time.monotonic()
    with stack(args.shared_key, args.nextcloud_port, args.nginx_port, extra) as st:
        print(f"nginx {st.nginx.url} (docker socket {st.nginx.socket_path}), "
              f"HaRP {st.harp_url} pid {st.pid}, fake Nextcloud {st.nextcloud.url}",
              file=sys.stderr)
        # Idle first: after load the heap has room to spare and would hide the cost.
        idle_result = idle.measure(st, args.idle) if args.idle > 0 else None
        warm_up(st, args, scenarios)
        log_start = st.harp.log_path.stat().st_size
        rows = [run_scenario(st, args, sc) for sc in scenarios]
        log_growth = st.harp.log_path.stat().st_size - log_start
        harp_env = {k: v for k, v in st.env.items() if k in extra}
        build = _build(st.pid)

    print()
    print(text(rows, with_reference))
    print()
    conns = ", ".join(sorted({f"c{_connections(args, sc)}" for sc in scenarios}))
    print(f"wrk -t2 ({conns}), {args.duration:g} s per run, {args.reps} interleaved reps, "
          f"medians; ratio = HaRP ÷ direct (median of per-rep ratios); CPU 100 = one core; "
          f"HaRP env extra: {harp_env or 'none'}; total {time.monotonic() - started:.0f} s")
    print(f"HaRP log written during the runs: {log_growth:,} bytes; HaRP build: {build}")
    if idle_result is not None:
        print(
            f"{idle_result.connections} idle connections: "
            f"{idle_result.fresh_bytes / 1024:.1f} KiB each just accepted, "
            f"{idle_result.keepalive_bytes / 1024:.1f} KiB each idle after one request "
            f"(RSS {idle_result.rss_before / MB:.0f} → {idle_result.rss_fresh / MB:.0f} → "
            f"{idle_result.rss_keepalive / MB:.0f} MB)"
        )
    if args.markdown:
        print()
        print(markdown(rows, with_reference))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
