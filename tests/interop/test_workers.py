"""``HP_WORKERS=2``: one primary, two serving workers, and the invariants that make them one.

Which worker served a request is read from the access log (``[harp.access#info worker N]``),
the request told apart by its client address (any 127.0.0.0/8 address works on Linux).
Each test checks that its requests did land on both workers, so a pass is never the
luck of one worker taking everything.  Peers: the fake Nextcloud, the nc_py_api ExApp
(tests/interop/conftest.py) and, for the tunnel test, the real frpc.

Propagation between processes is asynchronous only where HaRP says so (bans: the failure's
answer does not wait for the other workers); there the test waits for the outcome.  Registry
pushes are synchronous by contract: right after the 204, every worker must serve the change.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import signal
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509

from tests.conftest import HarpProcess, self_signed_pem
from tests.interop.conftest import (
    DROPPED,
    Response,
    ok,
    poll_until,
    record_for,
    request,
    start_harp,
)
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud
from tests.peers.frpc import FrpcProcess, FrpcProxy

pytestmark = pytest.mark.interop

APP = "harp-workers-exapp"
_sources = (f"127.{a}.{b}.{c}" for a, b, c in itertools.product(range(10, 250), range(1, 250),
                                                                  range(1, 250)))


def fresh_source() -> str:
    """A client address no request of this module used before."""
    return next(_sources)


#: The shared poll (tests/interop/conftest.py) with this module's patience.
wait_for = partial(poll_until, timeout=20.0)


def served_by(harp: HarpProcess, source: str) -> int:
    """The worker whose access line shows ``source`` (the line follows the response)."""
    pattern = re.compile(rf"\[harp\.access#\w+ worker (\d+)\] {re.escape(source)} ")
    found: list[int] = []

    def logged() -> bool:
        match = pattern.search(harp.output())
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    wait_for(logged, f"the access line of {source}:\n{harp.output()[-3000:]}")
    return found[0]


def served_by_nth(harp: HarpProcess, source: str, nth: int) -> int:
    """The worker of the ``nth`` (0-based) access line showing ``source``."""
    pattern = re.compile(rf"\[harp\.access#\w+ worker (\d+)\] {re.escape(source)} ")
    wait_for(lambda: len(pattern.findall(harp.output())) > nth,
             f"access line {nth} of {source}")
    return int(pattern.findall(harp.output())[nth])


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(entry))
    return sorted(kids)


def spread(harp: HarpProcess, send: Callable[[str], Response | str], n: int = 24,
           ) -> list[tuple[Response | str, int]]:
    """Requests on fresh connections from fresh addresses, ``n`` at a time, 8 at once,
    until both workers served some: (result, worker) each.

    Concurrent, because a worker that just answered is the first back in ``accept``: one
    client's sequential requests tend to land on one worker.
    """
    results: list[tuple[Response | str, int]] = []
    for _ in range(10):
        sources = [fresh_source() for _ in range(n)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, sources))
        pairs = zip(answers, sources, strict=True)
        results += [(answer, served_by(harp, src)) for answer, src in pairs]
        if {worker for _, worker in results} == {1, 2}:
            return results
    raise AssertionError(f"one worker served everything: {results}")


def dropped_by_both(harp: HarpProcess, source: str) -> set[str]:
    """Send concurrent requests from the banned ``source`` until both workers logged a drop
    for it (sequential requests from one client tend to land on one worker); the workers
    that did."""
    pattern = (
        rf"\[harp\.access#\w+ worker (\d+)\] {re.escape(source)} "
        rf"GET /exapps/{APP}/public drop"
    )
    for _ in range(10):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(
                lambda _: request(harp.http_port, f"/exapps/{APP}/public", source=source),
                range(16),
            ))
        assert all(answer == DROPPED for answer in answers), answers
        if set(re.findall(pattern, harp.output())) == {"1", "2"}:
            break
    return set(re.findall(pattern, harp.output()))


@pytest.fixture(scope="module")
def app_id() -> str:
    return APP


def all_serving(harp: HarpProcess, n: int = 2) -> HarpProcess:
    """Wait until ``n`` workers serve (the primary's socket accepts before they do)."""
    wait_for(lambda: len(re.findall(r"worker \d+ \(pid \d+\) serving", harp.output())) >= n,
             f"{n} workers to serve:\n{harp.output()[-3000:]}")
    return harp


def start_workers(tmp: Path, key: str, nextcloud: FakeNextcloud, **env: str) -> HarpProcess:
    return all_serving(start_harp(tmp, key, nextcloud, HP_WORKERS="2", **env))


@pytest.fixture(scope="module")
def harp(
    tmp_path_factory: pytest.TempPathFactory, key: str, nextcloud: FakeNextcloud,
) -> Iterator[HarpProcess]:
    proc = start_workers(tmp_path_factory.mktemp("harp"), key, nextcloud,
                         HP_BLACKLIST_COUNT="3", HP_BLACKLIST_WINDOW="120")
    yield proc
    proc.stop()


def storage(harp: HarpProcess, key: str, method: str, body: bytes | None = None) -> int:
    path = f"/exapps/app_api/exapp_storage/{APP}"
    return ok(request(harp.http_port, path, {"harp-shared-key": key}, method, body)).status


def test_two_workers_serve_and_single_process_has_none(
    harp: HarpProcess, key: str, tmp_path: Path, nextcloud: FakeNextcloud,
) -> None:
    assert harp.proc is not None
    assert len(children(harp.proc.pid)) == 2
    spread(harp, lambda src: request(harp.http_port, "/exapps/app_api/heartbeat",
                                     {"harp-shared-key": key}, source=src))
    single = start_harp(tmp_path, key, nextcloud, HP_WORKERS="1")
    try:
        assert single.proc is not None
        assert children(single.proc.pid) == []
        resp = ok(request(single.http_port, "/exapps/app_api/heartbeat", {"harp-shared-key": key}))
        assert resp.status == 200
    finally:
        single.stop()


def test_push_and_delete_are_in_every_worker_before_the_answer(
    harp: HarpProcess, key: str, exapp: ExAppProcess, nextcloud: FakeNextcloud,
) -> None:
    assert storage(harp, key, "POST", json.dumps(record_for(exapp)).encode()) == 204
    lookups = nextcloud.count("exapp-meta")
    for result, _ in spread(harp, lambda src: request(
            harp.http_port, f"/exapps/{APP}/public", source=src)):
        assert ok(result).status == 200
    assert nextcloud.count("exapp-meta") == lookups  # every worker had it, none asked

    assert storage(harp, key, "DELETE") == 204
    for result, _ in spread(harp, lambda src: request(
            harp.http_port, f"/exapps/{APP}/public", source=src)):
        assert ok(result).status == 404
    assert storage(harp, key, "DELETE") == 404
    assert storage(harp, key, "POST", json.dumps(record_for(exapp)).encode()) == 204


def test_failures_counted_in_both_workers_ban_in_both(
    harp: HarpProcess, key: str, exapp: ExAppProcess,
) -> None:
    assert storage(harp, key, "POST", json.dumps(record_for(exapp)).encode()) == 204
    # Three failures from one address, on fresh connections, until they fall on both
    # workers: then neither counted three on its own, only the primary did.
    for _ in range(20):
        source = fresh_source()
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda src: request(
                harp.http_port, f"/exapps/{APP}/admin", source=src), [source] * 3))
        assert [ok(answer).status for answer in answers] == [403] * 3
        workers = {served_by_nth(harp, source, i) for i in range(3)}
        if workers == {1, 2}:
            break
    else:
        pytest.fail("the failures never fell on both workers")

    def banned_everywhere() -> bool:
        return all(request(harp.http_port, f"/exapps/{APP}/public", source=source) == DROPPED
                   for _ in range(10))

    wait_for(banned_everywhere, "the ban to reach both workers")
    assert dropped_by_both(harp, source) == {"1", "2"}, harp.output()[-3000:]
    # Another address is not affected.
    assert ok(request(harp.http_port, f"/exapps/{APP}/public", source=fresh_source())).status == 200


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match.group(1))


def test_metrics_report_every_worker(harp: HarpProcess, key: str) -> None:
    headers = {"harp-shared-key": key}

    def scrape() -> str:
        resp = ok(request(harp.http_port, "/exapps/app_api/metrics", headers))
        assert resp.status == 200
        return resp.body.decode()

    before = _metric(scrape(), 'harp_responses_total{code="200"}')
    results = spread(harp, lambda src: request(
        harp.http_port, "/exapps/app_api/heartbeat", headers, source=src))
    after = scrape()
    # Every heartbeat, on whichever worker, plus the first scrape itself.
    assert _metric(after, 'harp_responses_total{code="200"}') == before + len(results) + 1
    assert _metric(after, "harp_exapps_known") == 1


class _Engine(BaseHTTPRequestHandler):
    """A Docker engine as far as ``_ping`` goes."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def engine() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_every_worker_reaches_an_frp_engine(
    harp: HarpProcess, key: str, engine: int, frpc_binary: str, tmp_path: Path,
) -> None:
    headers = {"harp-shared-key": key, "docker-engine-port": "24007"}

    def ping(src: str) -> Response | str:
        return request(harp.http_port, "/exapps/app_api/v1.41/_ping", headers, source=src)

    for result, _ in spread(harp, ping, 8):
        assert ok(result).status == 503  # no tunnel yet, in any worker
    frpc = FrpcProcess(
        server_port=harp.frp_port, token=key, binary=frpc_binary, workdir=tmp_path,
        proxies=[FrpcProxy("engine-7", remote_port=24007, local_port=engine)],
    )
    frpc.start()
    try:
        frpc.wait_for_log(r"start proxy success", timeout=30)
        wait_for(lambda: all(ok(ping(fresh_source())).status == 200 for _ in range(6)),
                 "the tunnel port to reach the workers")
        for result, _ in spread(harp, ping):
            assert (ok(result).status, ok(result).body) == (200, b"OK")
    finally:
        frpc.stop()


def test_killed_worker_is_restarted_and_the_other_keeps_serving(
    harp: HarpProcess, key: str, exapp: ExAppProcess, nextcloud: FakeNextcloud,
) -> None:
    assert storage(harp, key, "POST", json.dumps(record_for(exapp)).encode()) == 204
    assert harp.proc is not None
    victim, survivor = children(harp.proc.pid)
    os.kill(victim, signal.SIGKILL)
    for _ in range(10):  # served meanwhile, by the survivor (or the restarted worker)
        assert ok(request(harp.http_port, f"/exapps/{APP}/public",
                          source=fresh_source())).status == 200
    wait_for(lambda: re.search(rf"worker \d \(pid {victim}\) exited \(killed by SIGKILL\); "
                               r"restarting", harp.output()) is not None, "the restart line")
    wait_for(lambda: len(children(harp.proc.pid)) == 2  # type: ignore[union-attr]
             and victim not in children(harp.proc.pid), "a new worker")  # type: ignore[union-attr]
    assert survivor in children(harp.proc.pid)
    (new,) = set(children(harp.proc.pid)) - {survivor}
    wait_for(lambda: f"(pid {new}) serving" in harp.output(), "the new worker to serve")
    # The new worker got the registry from the primary: no Nextcloud lookup needed.
    lookups = nextcloud.count("exapp-meta")
    for result, _ in spread(harp, lambda src: request(
            harp.http_port, f"/exapps/{APP}/public", source=src)):
        assert ok(result).status == 200
    assert nextcloud.count("exapp-meta") == lookups


def _tls_request(port: int, key: str, source: str) -> tuple[int, int]:
    """(status, certificate serial) of one heartbeat over a fresh TLS connection."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx,
                                       source_address=(source, 0))
    try:
        conn.request("GET", "/exapps/app_api/heartbeat", headers={"harp-shared-key": key})
        status = conn.getresponse().status
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
        assert der is not None
        return status, x509.load_der_x509_certificate(der).serial_number
    finally:
        conn.close()


def test_sighup_reloads_every_worker_and_sigterm_stops_all(
    tmp_path: Path, key: str, nextcloud: FakeNextcloud,
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    first = self_signed_pem(certs / "cert.pem", "first.example")
    harp = start_workers(tmp_path, key, nextcloud, HP_CERTS_DIR=str(certs))
    try:
        assert harp.proc is not None
        workers = children(harp.proc.pid)
        assert len(workers) == 2
        results: list[tuple[int, int]] = []

        def https(src: str) -> Response | str:
            status, serial = _tls_request(harp.https_port, key, src)
            results.append((status, serial))
            return Response(status, {}, b"")

        spread(harp, https, 12)
        assert set(results) == {(200, first)}

        second = self_signed_pem(certs / "cert.pem", "second.example")
        harp.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all(
            re.search(rf"worker {n}\] SIGHUP: reloaded HTTPS certificate", harp.output())
            for n in (1, 2)), "both workers to reload")
        results.clear()
        spread(harp, https, 12)
        assert set(results) == {(200, second)}
        assert children(harp.proc.pid) == workers  # reloaded, not restarted
    finally:
        code = harp.stop()
    # twistd ends a SIGTERM shutdown by re-raising the signal on itself (exit -15).
    assert code in (0, -signal.SIGTERM), harp.output()[-3000:]
    for n in (1, 2):
        assert re.search(rf"worker {n} \(pid \d+\) stopped: exit code 0", harp.output()), (
            harp.output()[-3000:]
        )
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_workers_compose_with_redis_replicas(
    tmp_path: Path, key: str, nextcloud: FakeNextcloud, exapp: ExAppProcess,
) -> None:
    """Two replicas x two workers: a push on one replica's worker reaches every worker of
    the other through Redis, and so does a ban."""
    from tests.interop.test_redis_state import RedisServer

    redis = RedisServer(tmp_path)
    redis.start()
    settings = {"HP_REDIS_URL": redis.url, "HP_BLACKLIST_COUNT": "3"}
    a = start_workers(tmp_path, key, nextcloud, **settings)
    b = start_workers(tmp_path, key, nextcloud, **settings)
    try:
        for proc in (a, b):
            wait_for(lambda proc=proc: "Redis state synchronised" in proc.output(),  # type: ignore[misc]
                     "the Redis sync")
        assert storage(a, key, "POST", json.dumps(record_for(exapp)).encode()) == 204

        def b_serves() -> bool:
            # Spread over both workers: each must hold the record.
            return all(ok(result).status == 200 for result, _ in spread(b, lambda src: request(
                b.http_port, f"/exapps/{APP}/public", source=src)))

        wait_for(b_serves, "replica B's workers to hold the record")
        # Across replicas the record travels through Redis, eventually: a worker of B
        # asked before it arrived may have looked it up in Nextcloud.  Once B serves,
        # every worker holds it and no request needs Nextcloud any more.
        lookups = nextcloud.count("exapp-meta")
        for result, _ in spread(b, lambda src: request(
                b.http_port, f"/exapps/{APP}/public", source=src)):
            assert ok(result).status == 200
        assert nextcloud.count("exapp-meta") == lookups

        source = fresh_source()
        for _ in range(3):
            assert ok(request(a.http_port, f"/exapps/{APP}/admin", source=source)).status == 403
        wait_for(lambda: all(request(b.http_port, f"/exapps/{APP}/public", source=source)
                             == DROPPED for _ in range(10)), "the ban on B's workers")
        assert dropped_by_both(b, source) == {"1", "2"}, b.output()[-3000:]
    finally:
        a.stop()
        b.stop()
        redis.stop()
