"""Several real ``twistd harp`` replicas sharing one real Redis (docs/differences.md#8).

Peers: Debian's ``redis-server`` (started here on a free port, no persistence, with a
password so that we can check it never reaches a log), the fake Nextcloud and the real
nc_py_api ExApp of ``test_pipeline.py``.  Nextcloud knows no app at all here, so every
``exapp-meta`` call is visible in its call log: a record served without one came from Redis.

The tests share the replicas and run in file order: the last one stops and restarts Redis.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import HarpProcess, free_port, new_key, peer_missing
from tests.interop.conftest import (
    DROPPED,
    ok,
    poll_until,
    record_for,
    request,
    start_harp,
)
from tests.peers.exapp_runner import ExAppProcess
from tests.peers.fake_nextcloud import FakeNextcloud

pytestmark = pytest.mark.interop

APP = "harp-redis-exapp"
PASSWORD = "redis-secret-" + new_key()
#: Pub/sub delivery between processes on one host takes well under a millisecond; this
#: leaves room for a loaded CI machine.
PROPAGATION = 0.3


class RedisServer:
    """``redis-server`` in a temp dir; :meth:`stop` / :meth:`start` keep the port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            peer_missing("redis-server (Debian package redis-server; tools/install-peers)")
        assert binary is not None
        with open(self.workdir / "redis.log", "ab") as log:  # the child keeps its own fd
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--requirepass", PASSWORD],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def command(self, *args: str) -> object:
        """One command over RESP on a fresh connection (tests only need a few)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            payload = b""
            for cmd in (("AUTH", PASSWORD), args):
                payload += f"*{len(cmd)}\r\n".encode()
                for arg in cmd:
                    data = arg.encode()
                    payload += b"$%d\r\n%s\r\n" % (len(data), data)
            sock.sendall(payload)
            reader = sock.makefile("rb")
            assert _read_reply(reader) == "OK"
            return _read_reply(reader)


def _read_reply(reader: object) -> object:
    line = reader.readline().rstrip(b"\r\n")  # type: ignore[attr-defined]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise AssertionError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = reader.read(size + 2)[:-2]  # type: ignore[attr-defined]
        return data.decode()
    if kind == b"*":
        return [_read_reply(reader) for _ in range(int(rest))]
    raise AssertionError(f"bad RESP line {line!r}")


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def app_id() -> str:
    """The shared ``exapp`` fixture (tests/interop/conftest.py) runs this ExApp."""
    return APP


#: The shared poll (tests/interop/conftest.py) with this module's patience.
wait_for = partial(poll_until, timeout=15.0)


def synced(harp: HarpProcess, times: int = 1) -> None:
    wait_for(lambda: harp.output().count("Redis state synchronised") >= times,
             f"a Redis sync of {harp.http_port}:\n{harp.output()}")


class Cluster:
    def __init__(self, tmp: Path, key: str, nextcloud: FakeNextcloud, redis: RedisServer):
        self.tmp, self.key, self.nextcloud, self.redis = tmp, key, nextcloud, redis
        self.replicas: list[HarpProcess] = []

    def start(self) -> HarpProcess:
        proc = start_harp(
            self.tmp, self.key, self.nextcloud, HP_REDIS_URL=self.redis.url,
            HP_BLACKLIST_COUNT="3", HP_BLACKLIST_WINDOW="60",
        )
        self.replicas.append(proc)
        synced(proc)
        return proc

    def push(self, harp: HarpProcess, app: str, record: dict[str, object]) -> None:
        path = f"/exapps/app_api/exapp_storage/{app}"
        body = json.dumps(record).encode()
        resp = ok(request(harp.http_port, path, {"harp-shared-key": self.key}, "POST", body))
        assert resp.status == 204, resp.body

    def delete(self, harp: HarpProcess, app: str) -> int:
        path = f"/exapps/app_api/exapp_storage/{app}"
        return ok(request(harp.http_port, path, {"harp-shared-key": self.key}, "DELETE")).status


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, key: str, nextcloud: FakeNextcloud,
    redis: RedisServer, exapp: ExAppProcess,
) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("harp"), key, nextcloud, redis)
    nodes.start()
    nodes.start()
    yield nodes
    for proc in nodes.replicas:
        proc.stop()
    for proc in nodes.replicas:
        assert PASSWORD not in proc.output(), "the Redis password reached a log"


def test_registry_push_on_a_is_served_by_b_delete_on_b_removes_on_a(
    cluster: Cluster, exapp: ExAppProcess, redis: RedisServer, nextcloud: FakeNextcloud,
) -> None:
    a, b = cluster.replicas
    cluster.push(a, APP, record_for(exapp))
    # The answer does not wait for Redis (write-through is asynchronous by design).
    wait_for(lambda: redis.command("HEXISTS", "harp:exapps", APP) == 1, "the write-through")
    stored = redis.command("HGET", "harp:exapps", APP)
    assert isinstance(stored, str) and json.loads(stored)["port"] == exapp.port
    time.sleep(PROPAGATION)
    resp = ok(request(b.http_port, f"/exapps/{APP}/public"))
    assert (resp.status, resp.json()["route"]) == (200, "public")
    assert nextcloud.count("exapp-meta") == 0  # B knew it from Redis, not from Nextcloud
    assert cluster.delete(b, APP) == 204
    wait_for(lambda: redis.command("HEXISTS", "harp:exapps", APP) == 0, "the delete")
    time.sleep(PROPAGATION)
    assert ok(request(a.http_port, f"/exapps/{APP}/public")).status == 404
    assert cluster.delete(a, APP) == 404  # gone from A's mirror too


def test_failures_on_both_replicas_ban_on_both(cluster: Cluster, exapp: ExAppProcess) -> None:
    a, b = cluster.replicas
    cluster.push(a, APP, record_for(exapp))
    time.sleep(PROPAGATION)
    src = "127.0.0.21"
    for port in (a.http_port, a.http_port, b.http_port):  # 2 on A + 1 on B = COUNT
        assert ok(request(port, f"/exapps/{APP}/admin", source=src)).status == 403
    time.sleep(PROPAGATION)
    for port in (a.http_port, b.http_port):
        assert request(port, f"/exapps/{APP}/public", source=src) == DROPPED
        assert ok(request(port, f"/exapps/{APP}/public", source="127.0.0.22")).status == 200
    # Logged once, by whichever replica's failure reached Redis last (A's writes are
    # asynchronous, so that is not necessarily B).
    assert sum("banning 127.0.0.21: 3 failures across" in p.output() for p in (a, b)) == 1


def test_replica_started_later_loads_registry_and_bans(
    cluster: Cluster, nextcloud: FakeNextcloud,
) -> None:
    before = nextcloud.count("exapp-meta")
    c = cluster.start()  # waits for its first sync
    resp = ok(request(c.http_port, f"/exapps/{APP}/public"))
    assert (resp.status, resp.json()["route"]) == (200, "public")
    assert nextcloud.count("exapp-meta") == before
    assert request(c.http_port, f"/exapps/{APP}/public", source="127.0.0.21") == DROPPED


def test_redis_outage_degrades_to_local_state_then_resyncs(
    cluster: Cluster, exapp: ExAppProcess, redis: RedisServer, nextcloud: FakeNextcloud,
) -> None:
    a, b = cluster.replicas[:2]
    redis.stop()
    wait_for(lambda: all("unavailable" in p.output() for p in cluster.replicas),
             "the replicas to notice the outage")
    # Serving goes on from the local mirror.
    for proc in (a, b):
        assert ok(request(proc.http_port, f"/exapps/{APP}/public")).status == 200
    # Registry writes are local for now; nc_py_api's 401 for a foreign app id proves that
    # A forwarded the request to the ExApp.
    cluster.push(a, "outage-app", record_for(exapp))
    assert ok(request(a.http_port, "/exapps/outage-app/public")).status == 401
    # Bans are counted per replica.
    src = "127.0.0.23"
    for _ in range(3):
        assert ok(request(b.http_port, f"/exapps/{APP}/admin", source=src)).status == 403
    assert request(b.http_port, f"/exapps/{APP}/public", source=src) == DROPPED
    assert ok(request(a.http_port, f"/exapps/{APP}/public", source=src)).status == 200

    redis.start()  # empty: no persistence
    for proc in cluster.replicas:
        wait_for(lambda proc=proc: "reconnected" in proc.output(),  # type: ignore[misc]
                 f"{proc.http_port} to reconnect:\n{proc.output()}")
    time.sleep(PROPAGATION)
    # Redis lost everything; the replicas re-seeded it from their mirrors.
    assert redis.command("HEXISTS", "harp:exapps", APP) == 1
    assert redis.command("HEXISTS", "harp:exapps", "outage-app") == 1
    before = nextcloud.count("exapp-meta")
    assert ok(request(b.http_port, "/exapps/outage-app/public")).status == 401
    # And new changes flow again.
    cluster.push(b, "after-app", record_for(exapp))
    time.sleep(PROPAGATION)
    for proc in cluster.replicas:
        assert ok(request(proc.http_port, "/exapps/after-app/public")).status == 401
    assert nextcloud.count("exapp-meta") == before
    src = "127.0.0.24"
    for port in (a.http_port, b.http_port, cluster.replicas[2].http_port):
        assert ok(request(port, f"/exapps/{APP}/admin", source=src)).status == 403
    time.sleep(PROPAGATION)
    assert request(a.http_port, f"/exapps/{APP}/public", source=src) == DROPPED


def test_delete_during_outage_is_not_undone_by_reseeding(
    cluster: Cluster, exapp: ExAppProcess, redis: RedisServer, key: str,
) -> None:
    """A deletes an app while Redis is down; Redis comes back empty and B, which
    still has the app in its mirror, re-seeds.  The app must stay deleted everywhere."""
    app = "doomed-app"
    a, b = cluster.replicas[:2]
    with_key = {"harp-shared-key": key}  # unknown apps then cost no ban failures

    def served(proc: HarpProcess) -> int:
        return ok(request(proc.http_port, f"/exapps/{app}/public", with_key)).status

    cluster.push(a, app, record_for(exapp))
    wait_for(lambda: redis.command("HEXISTS", "harp:exapps", app) == 1, "the write-through")
    time.sleep(PROPAGATION)
    assert [served(p) for p in cluster.replicas] == [401] * len(cluster.replicas)  # forwarded

    outages = [p.output().count("unavailable") for p in cluster.replicas]
    reconnects = [p.output().count("reconnected") for p in cluster.replicas]
    syncs = [p.output().count("Redis state synchronised") for p in cluster.replicas]
    redis.stop()
    for proc, n in zip(cluster.replicas, outages, strict=True):
        wait_for(lambda proc=proc, n=n: proc.output().count("unavailable") > n,  # type: ignore[misc]
                 "the replicas to notice the outage")
    assert cluster.delete(a, app) == 204
    assert served(a) == 404
    assert served(b) == 401  # B cannot know yet

    redis.start()  # empty: no persistence
    for proc, n, m in zip(cluster.replicas, reconnects, syncs, strict=True):
        wait_for(lambda proc=proc, n=n: proc.output().count("reconnected") > n,  # type: ignore[misc]
                 f"{proc.http_port} to reconnect:\n{proc.output()}")
        synced(proc, m + 1)
    time.sleep(PROPAGATION)
    assert redis.command("HEXISTS", "harp:exapps", app) == 0, "re-seeding resurrected the app"
    assert [served(p) for p in cluster.replicas] == [404] * len(cluster.replicas)
    # A later push of the same app id works again (the tombstone does not block it).
    cluster.push(b, app, record_for(exapp))
    time.sleep(PROPAGATION)
    assert [served(p) for p in cluster.replicas] == [401] * len(cluster.replicas)
