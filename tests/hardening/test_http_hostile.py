"""Hostile raw bytes against the real ``twistd harp`` HTTP frontend.

One HaRP process and one :class:`~tests.hardening.helpers.RecordingUpstream` serve the
module; the ExApp ``app`` is registered through ``/exapps/app_api/exapp_storage`` with
the broad route ``.*`` PUBLIC, so the reserved-path and framing checks are all that
stands between a hostile client and the upstream.  Every case connects from its own
loopback address (127.0.10.x), so the bans its failures cause (HP_BLACKLIST_COUNT=3)
never hit another case.  Each case asserts HaRP's answer (a status or a silent drop)
*and* what reached the upstream, found by a per-case marker in the bytes sent.

"Refused" means a 400 (or 408/413/431 where the input is too big or too slow) or a
silent drop: the project drops malformed requests silently like the reference
(docs/compatibility.md#generated-responses), so both spellings of "no" are accepted.
"""

from __future__ import annotations

import base64
import http.client
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HarpProcess, base_env
from tests.hardening.conftest import fd_count
from tests.hardening.helpers import (
    GREETING,
    Exchange,
    RecordingUpstream,
    Sources,
    build_request,
    connect,
    exchange,
    parse_responses,
    read_exchange,
)
from tests.peers.fake_nextcloud import FakeNextcloud

pytestmark = pytest.mark.interop

APP = "app"
CLIENT_TIMEOUT = 3.0  # HP_TIMEOUT_CLIENT of the module's HaRP
CUT_WITHIN = 3 * CLIENT_TIMEOUT
REFUSED = ("400", "drop")
FORBIDDEN_UPSTREAM = ("harp-shared-key", "ex-app-host", "ex-app-port", "docker-engine-port")


def marker() -> str:
    return "mk" + secrets.token_hex(6)


def record_for(port: int) -> dict[str, Any]:
    return {"exapp_token": "tok", "exapp_version": "1.0.0", "host": "127.0.0.1", "port": port,
            "routes": [{"url": ".*", "access_level": 0}]}


def start_harp(tmp: Path, key: str, nextcloud: FakeNextcloud, **env: str) -> HarpProcess:
    settings = {"HP_FRP_DISABLE_TLS": "true", "HP_TIMEOUT_CLIENT": f"{CLIENT_TIMEOUT:g}s",
                "HP_BLACKLIST_COUNT": "3", "HP_BLACKLIST_WINDOW": "600",
                "HP_LOG_LEVEL": "info", **env}
    full = base_env(tmp, HP_SHARED_KEY=key, NC_INSTANCE_URL=nextcloud.url, **settings)
    return HarpProcess(full, tmp).start()


def register(harp: HarpProcess, key: str, port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", harp.http_port, timeout=10)
    try:
        conn.request("POST", f"/exapps/app_api/exapp_storage/{APP}",
                     body=json.dumps(record_for(port)).encode(),
                     headers={"harp-shared-key": key, "Content-Type": "application/json"})
        assert conn.getresponse().status == 204
    finally:
        conn.close()


@pytest.fixture(scope="module")
def nextcloud(key: str, upstream: RecordingUpstream) -> Iterator[FakeNextcloud]:
    with FakeNextcloud(key) as fake:
        fake.apps[APP] = record_for(upstream.port)
        yield fake


@pytest.fixture(scope="module")
def harp(tmp_path_factory: pytest.TempPathFactory, key: str, nextcloud: FakeNextcloud,
         upstream: RecordingUpstream) -> Iterator[HarpProcess]:
    proc = start_harp(tmp_path_factory.mktemp("harp"), key, nextcloud)
    register(proc, key, upstream.port)
    yield proc
    proc.stop()


SOURCES = Sources(10)


@dataclass
class Env:
    """The module's HaRP and upstream, plus the per-test reporting fixtures."""

    harp: HarpProcess
    upstream: RecordingUpstream
    key: str
    record_case: Callable[..., None]
    measure: Callable[[Any], Any]

    @property
    def port(self) -> int:
        return self.harp.http_port

    def tracebacks(self) -> int:
        return self.harp.output().count("Traceback")

    def hostile(self, case: str, payload: bytes, expected: str, mark: str, *,
                pieces: list[tuple[float, bytes]] | None = None, want: int = 1,
                timeout: float = 2.0, strict: bool = True, harp: HarpProcess | None = None,
                source: str | None = None) -> tuple[Exchange, bool]:
        """Send ``payload``; record and return (what came back, did ``mark`` reach the
        upstream).  ``strict=False``: only a *complete* request counts as reaching it
        (a streamed head aborted on a broken body does not)."""
        target = harp or self.harp
        before = self.tracebacks()
        with self.measure(target) as m:
            result = exchange(target.http_port, pieces or payload,
                              source=source or SOURCES.new(), want=want, timeout=timeout)
            time.sleep(0.25)  # let anything HaRP forwards arrive upstream
        if strict:
            reached = self.upstream.saw(mark)
        else:
            reached = any(r.complete for r in self.upstream.requests_with(mark))
        new_tracebacks = self.tracebacks() - before
        observed = result.outcome + ("; upstream SAW it" if reached else "; upstream clean")
        if new_tracebacks:
            observed += f"; {new_tracebacks} Traceback(s) in log"
        self.record_case(case=case, input=payload, expected=expected, observed=observed,
                         measured=m)
        assert new_tracebacks == 0, target.output()[-3000:]
        return result, reached


@pytest.fixture
def env(harp: HarpProcess, upstream: RecordingUpstream, key: str,
        record_case: Callable[..., None], measure: Callable[[Any], Any]) -> Env:
    return Env(harp, upstream, key, record_case, measure)


def refused(result: Exchange, *extra: str) -> bool:
    return result.first in (*REFUSED, *extra) and len(result.responses) <= 1


# --- positive controls: the harness itself works


def test_control_get_and_keepalive_post(env: Env) -> None:
    mark = marker()
    payload = (build_request("GET", f"/exapps/{APP}/x?m={mark}")
               + build_request("POST", f"/exapps/{APP}/y?m={mark}",
                               [("Content-Length", "5")], b"hello"))
    result, reached = env.hostile("control/get+post pipelined", payload, "200,200 reached", mark,
                                  want=2)
    assert result.statuses == [200, 200]
    posted = [r for r in env.upstream.requests_with(mark) if r.method == "POST"]
    assert reached and posted and posted[0].body == b"hello"
    assert posted[0].target == f"/y?m={mark}"


# --- upgrades


WS_HEADERS = [("Connection", "Upgrade"), ("Upgrade", "websocket"),
              ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")]


@pytest.mark.parametrize("when", ["pipelined", "after-200"])
def test_hole1_refused_upgrade_does_not_tunnel_next_request(env: Env, when: str) -> None:
    first_mark, smuggled = marker(), marker()
    first = build_request("GET", f"/exapps/{APP}/ws?m={first_mark}", WS_HEADERS)
    second = build_request("GET", f"/exapps/{APP}/init?m={smuggled}",
                           [("EX-APP-ID", APP), ("AUTHORIZATION-APP-API", f"forged-{smuggled}"),
                            ("X-Smuggled", smuggled)])
    with env.measure(env.harp) as m, connect(env.port, SOURCES.new()) as sock:
        if when == "pipelined":
            sock.sendall(first + second)
            result = read_exchange(sock, want=2)
        else:
            sock.sendall(first)
            result = read_exchange(sock, want=1)
            if not result.closed:
                try:
                    sock.sendall(second)
                except OSError:
                    result.closed = True
                else:
                    later = read_exchange(sock, want=1)
                    result.data += later.data
                    result.closed = later.closed
                    result.responses, _ = parse_responses(result.data)
        time.sleep(0.3)
    reached = env.upstream.saw(smuggled)
    env.record_case(case=f"hole1/upgrade refused by 200, 2nd request {when}",
                    input=first + second,
                    expected="/init never reaches upstream (HaRP closes or drops it)",
                    observed=result.outcome + ("; upstream SAW /init" if reached
                                               else "; upstream clean"), measured=m)
    assert not reached, "the request behind a refused Upgrade reached the ExApp raw"
    assert 200 not in result.statuses[1:]


def test_hole1_real_101_tunnels_both_ways(env: Env) -> None:
    mark = marker()
    head = build_request("GET", f"/exapps/{APP}/ws101?m={mark}", WS_HEADERS)
    with env.measure(env.harp) as m, connect(env.port, SOURCES.new()) as sock:
        sock.sendall(head)
        result = read_exchange(sock, want=1, timeout=3)
        _, tunnel = parse_responses(result.data)
        sock.settimeout(3)
        echoed = b""
        try:
            while GREETING not in tunnel:
                tunnel += sock.recv(4096)
            sock.sendall(b"ping-" + mark.encode())
            while b"echo:ping-" + mark.encode() not in echoed:
                data = sock.recv(4096)
                if not data:
                    break
                echoed += data
        except OSError:
            pass
    seen = env.upstream.wait_for(mark)
    ok = GREETING in tunnel and b"echo:ping-" + mark.encode() in echoed
    env.record_case(case="hole1/real 101 tunnel", input=head, expected="101, data both ways",
                    observed=f"{result.outcome}; greeting={GREETING in tunnel}; echo={ok}",
                    measured=m)
    assert result.statuses == [101]
    assert ok
    assert seen is not None and seen.header("upgrade") == ["websocket"]
    assert seen.header("ex-app-id") == [APP]


@pytest.mark.parametrize("token", ["h2c", "foo"])
def test_hole1_other_upgrade_tokens_not_tunnelled(env: Env, token: str) -> None:
    mark = marker()
    headers = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", token),
               ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"), ("X-Hostile", mark)]
    payload = build_request("GET", f"/exapps/{APP}/ws101?m={mark}", headers)
    result, _ = env.hostile(f"hole1/Upgrade: {token}", payload,
                            "400/drop, or plain HTTP without Upgrade upstream", mark)
    forwarded = env.upstream.requests_with(mark)
    assert 101 not in result.statuses, "a non-websocket upgrade became a tunnel"
    assert not any(r.header("upgrade") for r in forwarded), "Upgrade header forwarded"
    assert refused(result) or result.statuses == [200]


def test_hole1_upgrade_with_body_refused(env: Env) -> None:
    mark = marker()
    payload = build_request("GET", f"/exapps/{APP}/ws101?m={mark}",
                            [*WS_HEADERS, ("Content-Length", "5")], b"hello")
    result, reached = env.hostile("hole1/upgrade with a body", payload, "400 (or drop)", mark)
    assert refused(result) and not reached


# --- small bodies on a cold upstream pool


@pytest.fixture
def fresh_harp(tmp_path: Path, key: str, nextcloud: FakeNextcloud) -> Iterator[HarpProcess]:
    proc = start_harp(tmp_path, key, nextcloud)
    yield proc
    proc.stop()


def small_body(mark: str) -> bytes:
    return mark.encode().ljust(20, b"x")


COLD = {
    "POST": lambda mark: build_request(
        "POST", f"/exapps/{APP}/up?m={mark}", [("Content-Length", "20")], small_body(mark)),
    "PUT": lambda mark: build_request(
        "PUT", f"/exapps/{APP}/up?m={mark}", [("Content-Length", "20")], small_body(mark)),
    "POST chunked": lambda mark: build_request(
        "POST", f"/exapps/{APP}/up?m={mark}", [("Transfer-Encoding", "chunked")],
        b"14\r\n" + small_body(mark) + b"\r\n0\r\n\r\n"),
}


@pytest.mark.parametrize("registered", ["nextcloud", "pushed"])
@pytest.mark.parametrize("kind", sorted(COLD))
def test_hole2_first_small_body_on_cold_pool(env: Env, fresh_harp: HarpProcess, kind: str,
                                             registered: str) -> None:
    if registered == "pushed":
        register(fresh_harp, env.key, env.upstream.port)
    mark = marker()
    payload = COLD[kind](mark)
    result, _ = env.hostile(f"hole2/cold pool first {kind} (record from {registered})",
                            payload, "200, upstream got the 20 bytes", mark, harp=fresh_harp,
                            timeout=5)
    seen = env.upstream.wait_for(mark, timeout=1)
    assert result.statuses == [200]
    assert seen is not None and seen.body == small_body(mark)


def test_hole2_post_right_after_upstream_closed_keepalive(env: Env) -> None:
    observed = []
    with env.measure(env.harp) as m:
        for _ in range(3):
            warm = exchange(env.port, build_request("GET", f"/exapps/{APP}/warm"),
                            source=SOURCES.new())
            assert warm.statuses == [200]
            time.sleep(0.05)
            env.upstream.close_idle()
            mark = marker()
            result = exchange(env.port, COLD["POST"](mark), source=SOURCES.new(), timeout=5)
            seen = env.upstream.wait_for(mark, timeout=1)
            observed.append((result.outcome, seen is not None and seen.body == small_body(mark)))
    env.record_case(case="hole2/POST right after upstream closed keep-alive (x3)",
                    input=COLD["POST"]("mk" + "0" * 12), expected="200 x3, bodies arrive",
                    observed=" ".join(f"{o}{'' if b else '(no body upstream)'}"
                                      for o, b in observed), measured=m)
    assert all(outcome == "200" and body for outcome, body in observed), observed


# --- request targets that are not origin-form


@pytest.mark.parametrize("target", [
    "0/exapps/app/x", "http://evil/exapps/app/x", "*", "exapps/app/x",
    "HTTP://evil/exapps/app/x",
])
def test_hole3_non_origin_form_targets(env: Env, target: str) -> None:
    mark = marker()
    payload = build_request("GET", target, [("X-Hostile", mark)])
    result, reached = env.hostile(f"hole3/target {target}", payload, "400 or drop", mark)
    assert refused(result) and not reached


# --- reserved ExApp paths in other spellings, and dot-dot


@pytest.mark.parametrize("path", [
    "/exapps/app/%69nit", "/exapps/app/init/", "/exapps/app//init", "/exapps/app/enabled/",
    "/exapps/app/./init", "/exapps/app/%2e/init", "/exapps/app/%2E/init",
    "/exapps/app/heartbeat/", "/exapps/app/%68eartbeat", "/exapps/app/en%61bled",
    "/exapps/app///heartbeat//", "/exapps/app/init?x=1",
])
def test_hole4_reserved_paths_unsigned(env: Env, path: str) -> None:
    mark = marker()
    # GET without a body: the verdict must come from the path alone.
    payload = build_request("GET", path, [("X-Hostile", mark)])
    result, reached = env.hostile(f"hole4/unsigned {path}", payload, "drop", mark)
    assert result.outcome == "drop" and not reached


@pytest.mark.parametrize("path", [
    "/exapps/app/../app/x", "/exapps/app/%2e%2e/x", "/exapps/app/.%2E/x",
    "/exapps/app/%2E./x", "/exapps/app/x/..", "/exapps/app/x%2f..%2fy", "/exapps/app/x/%2e%2E",
])
def test_hole4_dotdot_any_spelling(env: Env, path: str) -> None:
    mark = marker()
    payload = build_request("GET", path, [("X-Hostile", mark)])
    result, reached = env.hostile(f"hole4/dot-dot {path}", payload, "drop", mark)
    assert result.outcome == "drop" and not reached


# --- HaRP's own headers stay with HaRP


@pytest.mark.parametrize("kind", ["signed", "unsigned with key"])
def test_hole7_harp_headers_not_forwarded(env: Env, kind: str) -> None:
    mark = marker()
    headers = [("ex-app-version", "1.0.0"), ("ex-app-id", APP),
               ("ex-app-host", "127.0.0.1"), ("ex-app-port", str(env.upstream.port)),
               ("harp-shared-key", env.key), ("docker-engine-port", "24000")]
    if kind == "signed":
        headers.append(("authorization-app-api", base64.b64encode(b"admin:tok").decode()))
    payload = build_request("GET", f"/exapps/{APP}/x?m={mark}", headers)
    with env.measure(env.harp) as m:
        result = exchange(env.port, payload, source=SOURCES.new())
        seen = env.upstream.wait_for(mark, timeout=2)
    leaked = sorted(set(FORBIDDEN_UPSTREAM) & (seen.names() if seen else set()))
    key_leaked = env.upstream.saw(env.key)
    env.record_case(case=f"hole7/{kind} request",
                    input=payload.replace(env.key.encode(), b"<key>"),
                    expected="200; none of " + "/".join(FORBIDDEN_UPSTREAM) + " upstream",
                    observed=f"{result.outcome}; upstream got {leaked or 'none of them'}",
                    measured=m)
    assert result.statuses == [200] and seen is not None
    assert not leaked and not key_leaked


# --- control and non-ASCII bytes in the request target


CONTROL_TARGETS = {
    "DEL in path": b"/exapps/app/a\x7fb",
    "0x80 in path": b"/exapps/app/a\x80b",
    "0xff in path": b"/exapps/app/a\xffb",
    "NUL in path": b"/exapps/app/a\x00b",
    "0x01 in path": b"/exapps/app/a\x01b",
    "DEL in query": b"/exapps/app/x?q=\x7f",
    "0xe9 in query": b"/exapps/app/x?q=caf\xe9",
    "NUL in query": b"/exapps/app/x?q=\x00",
}


def control_request(target: bytes, mark: str) -> bytes:
    return (b"GET " + target + b" HTTP/1.1\r\nHost: harp.test\r\nX-Hostile: "
            + mark.encode() + b"\r\n\r\n")


@pytest.mark.parametrize("name", sorted(CONTROL_TARGETS))
def test_hole8_control_bytes_in_target(env: Env, name: str) -> None:
    mark = marker()
    payload = control_request(CONTROL_TARGETS[name], mark)
    result, reached = env.hostile(f"hole8/{name}", payload, "400 or drop, no Traceback", mark)
    assert refused(result) and not reached


def test_hole8_control_bytes_count_for_bans(env: Env) -> None:
    source = SOURCES.new()
    outcomes = []
    with env.measure(env.harp) as m:
        for target in (b"/exapps/app/a\x7f", b"/exapps/app/a\x80", b"/exapps/app/a\x00"):
            outcomes.append(exchange(env.port, control_request(target, marker()),
                                     source=source).outcome)
        after = exchange(env.port, build_request("GET", f"/exapps/{APP}/x"), source=source)
        other = exchange(env.port, build_request("GET", f"/exapps/{APP}/x"),
                         source=SOURCES.new())
    env.record_case(case="hole8/3 control-byte requests then a normal one (COUNT=3)",
                    input=control_request(b"/exapps/app/a\x7f", "..."),
                    expected="4th request from that address dropped; others 200",
                    observed=f"{','.join(outcomes)} then {after.outcome}; other {other.outcome}",
                    measured=m)
    assert other.statuses == [200]
    assert after.outcome == "drop", "control-byte requests did not count as failures"


# --- Transfer-Encoding other than a lone "chunked"


SMUGGLED = "GET /exapps/app/smuggled?m={m} HTTP/1.1\r\nHost: harp.test\r\nX-Smuggled: {m}\r\n\r\n"


@pytest.mark.parametrize("te", [
    ["identity"], ["chunked, identity"], ["gzip, chunked"], ["xchunked"], ["chunked", "identity"],
    ["identity", "chunked"], ["chunked;q=1"],
])
def test_hole9_odd_transfer_encodings(env: Env, te: list[str]) -> None:
    mark, smuggled = marker(), marker()
    body = b"5\r\nhello\r\n0\r\n\r\n" + SMUGGLED.format(m=smuggled).encode()
    head = [("Transfer-Encoding", value) for value in te]
    payload = build_request("POST", f"/exapps/{APP}/x?m={mark}", [*head, ("X-Hostile", mark)],
                            body)
    result, reached = env.hostile(f"hole9/TE {' + '.join(te)!r}", payload,
                                  "400 or drop; nothing upstream, body never a request", mark,
                                  want=2)
    assert not env.upstream.saw(smuggled), "the body was parsed as a new request"
    assert refused(result) and not reached


# --- a body that trickles in


def test_hole13_slow_body_is_cut(env: Env) -> None:
    mark = marker()
    head = build_request("POST", f"/exapps/{APP}/slow?m={mark}", [("Content-Length", "100000")])
    with env.measure(env.harp) as m:
        observed, cut_at = trickle(env, head, b"a", limit=CUT_WITHIN + 6)
    env.record_case(case="hole13/slow body, 1 byte/s (HP_TIMEOUT_CLIENT=3s)", input=head,
                    expected=f"408 or close within {CUT_WITHIN:g}s", observed=observed,
                    measured=m)
    assert cut_at is not None and cut_at <= CUT_WITHIN, observed


def trickle(env: Env, head: bytes, piece: bytes, limit: float,
            every: float = 1.0) -> tuple[str, float | None]:
    """Send ``head`` then ``piece`` every ``every`` seconds until HaRP answers or closes."""
    with connect(env.port, SOURCES.new()) as sock:
        start = time.monotonic()
        sock.sendall(head)
        sock.settimeout(every)
        got = b""
        while time.monotonic() - start < limit:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                try:
                    sock.sendall(piece)
                except OSError:
                    return f"closed (send failed) after {time.monotonic() - start:.1f}s", (
                        time.monotonic() - start)
                continue
            except OSError:
                data = b""
            elapsed = time.monotonic() - start
            got += data
            if not data or parse_responses(got)[0]:
                responses = parse_responses(got)[0]
                what = str(responses[0].status) if responses else "closed"
                return f"{what} after {elapsed:.1f}s", elapsed
        return f"still open after {limit:.0f}s", None


# --- held-up cases (regression): framing, sizes, forged identity, slow-loris


def smuggle_body(smuggled: str) -> bytes:
    return b"0\r\n\r\n" + SMUGGLED.format(m=smuggled).encode()


FRAMING: dict[str, Callable[[bytes], tuple[list[tuple[str, str]], bytes]]] = {
    "CL then TE": lambda b: ([("Content-Length", str(len(b))), ("Transfer-Encoding", "chunked")],
                             b),
    "TE then CL": lambda b: ([("Transfer-Encoding", "chunked"), ("Content-Length", str(len(b)))],
                             b),
    "CL 5 + CL 6": lambda b: ([("Content-Length", "5"), ("Content-Length", "6")], b"hello!"),
    "CL '5, 6'": lambda b: ([("Content-Length", "5, 6")], b"hello!"),
    "CL +5": lambda b: ([("Content-Length", "+5")], b"hello"),
    "CL -5": lambda b: ([("Content-Length", "-5")], b"hello"),
    "CL 0x5": lambda b: ([("Content-Length", "0x5")], b"hello"),
}


@pytest.mark.parametrize("name", list(FRAMING))
def test_heldup_ambiguous_framing(env: Env, name: str) -> None:
    mark, smuggled = marker(), marker()
    headers, body = FRAMING[name](smuggle_body(smuggled))
    payload = build_request("POST", f"/exapps/{APP}/x?m={mark}", headers, body)
    result, reached = env.hostile(f"held/{name}", payload, "400 or drop; nothing upstream",
                                  mark, want=2)
    assert refused(result) and not reached and not env.upstream.saw(smuggled)


@pytest.mark.parametrize("size", ["zz", "-5", "ffffffffffffffffffffff", "0x5", "5 5"])
def test_heldup_bad_chunk_size(env: Env, size: str) -> None:
    mark, smuggled = marker(), marker()
    body = size.encode() + b"\r\nhello\r\n" + smuggle_body(smuggled)
    payload = build_request("POST", f"/exapps/{APP}/x?m={mark}",
                            [("Transfer-Encoding", "chunked")], body)
    result, reached = env.hostile(f"held/chunk size {size!r}", payload,
                                  "400 or drop; no complete request upstream", mark, want=2,
                                  strict=False)
    assert refused(result) and not reached and not env.upstream.saw(smuggled)


@pytest.mark.parametrize("header", [b"X-A: a\rb", b"X-A: a\rX-Evil: b", b"X-A\r: b"])
def test_heldup_bare_cr_in_headers(env: Env, header: bytes) -> None:
    mark = marker()
    payload = (f"GET /exapps/{APP}/x?m={mark} HTTP/1.1\r\nHost: harp.test\r\n".encode()
               + header + b"\r\n\r\n")
    result, _ = env.hostile(f"held/bare CR {header!r}", payload,
                            "400/drop, or no bare CR upstream", mark)
    forwarded = env.upstream.requests_with(mark)
    bare_cr = any("\r" in k or "\r" in v for r in forwarded for k, v in r.headers)
    assert not bare_cr
    assert refused(result) or result.statuses == [200]


def test_heldup_100kb_header(env: Env) -> None:
    mark = marker()
    payload = build_request("GET", f"/exapps/{APP}/x?m={mark}", [("X-Big", "a" * 100_000)])
    result, reached = env.hostile("held/100 KB header", payload, "400/431 or drop", mark)
    assert refused(result, "431") and not reached


def test_heldup_10000_headers(env: Env) -> None:
    mark = marker()
    headers = [(f"X-H{i}", "v") for i in range(10_000)]
    payload = build_request("GET", f"/exapps/{APP}/x?m={mark}", headers)
    result, reached = env.hostile("held/10000 headers", payload, "400/431 or drop", mark)
    assert refused(result, "431") and not reached


def test_channel_pipelined_flood_answered_in_order(env: Env) -> None:
    """More pipelined requests than HaRP reads ahead (16 KiB): reading pauses and resumes,
    every request is answered, in order, and nothing is lost."""
    mark = marker()
    count = 300
    payload = b"".join(
        build_request("GET", f"/exapps/{APP}/x?m={mark}&n={n}") for n in range(count)
    )
    assert len(payload) > 16384
    result, reached = env.hostile("channel/300 pipelined GETs (> 16 KiB)", payload,
                                  "300 x 200, in order", mark, want=count, timeout=10.0)
    assert result.statuses == [200] * count and reached
    targets = [r.target for r in env.upstream.requests_with(mark)]
    assert targets == [f"/x?m={mark}&n={n}" for n in range(count)]


FOLDED: dict[str, bytes] = {
    "folded Content-Length": b"Content-Length: 5\r\n 6\r\n",
    "folded TE + CL": b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n",
    "CL + folded TE": b"Content-Length: 5\r\nTransfer-Encoding:\r\n\tchunked\r\n",
}


@pytest.mark.parametrize("name", list(FOLDED))
def test_channel_folded_framing_headers(env: Env, name: str) -> None:
    mark, smuggled = marker(), marker()
    payload = (f"POST /exapps/{APP}/x?m={mark} HTTP/1.1\r\nHost: harp.test\r\n".encode()
               + FOLDED[name] + b"\r\n" + smuggle_body(smuggled))
    result, reached = env.hostile(f"channel/{name}", payload, "400 or drop; nothing upstream",
                                  mark, want=2)
    assert refused(result) and not reached and not env.upstream.saw(smuggled)


def test_channel_two_blank_lines_before_a_request(env: Env) -> None:
    """One empty line before a request line is tolerated (as twisted.web does); two are not
    a request."""
    mark = marker()
    payload = b"\r\n\r\n" + build_request("GET", f"/exapps/{APP}/x?m={mark}")
    result, reached = env.hostile("channel/two blank lines, then GET", payload,
                                  "400 or drop", mark)
    assert refused(result) and not reached
    mark = marker()
    payload = b"\r\n" + build_request("GET", f"/exapps/{APP}/x?m={mark}")
    result, reached = env.hostile("channel/one blank line, then GET", payload, "200", mark)
    assert result.statuses == [200] and reached


def test_heldup_forged_identity_replaced(env: Env) -> None:
    mark, forged = marker(), marker()
    payload = build_request("GET", f"/exapps/{APP}/x?m={mark}", [
        ("EX-APP-ID", f"forged-{forged}"), ("EX-APP-VERSION", f"forged-{forged}"),
        ("AUTHORIZATION-APP-API", f"forged-{forged}"), ("AA-VERSION", f"forged-{forged}"),
        ("ex-app-id", f"forged2-{forged}"),
    ])
    result, _ = env.hostile("held/forged identity headers", payload,
                            "200; upstream sees HaRP's EX-APP-ID", forged)
    seen = env.upstream.wait_for(mark, timeout=1)
    assert result.statuses == [200] and seen is not None
    assert seen.header("ex-app-id") == [APP]
    assert seen.header("aa-version") == ["32"]
    assert seen.header("ex-app-version") == ["1.0.0"]
    assert seen.header("authorization-app-api") == [base64.b64encode(b":tok").decode()]
    assert not env.upstream.saw(forged)


def test_heldup_slowloris_headers_cut(env: Env) -> None:
    mark = marker()
    head = f"GET /exapps/{APP}/x?m={mark} HTTP/1.1\r\nHost: harp.test\r\n".encode()
    with env.measure(env.harp) as m:
        observed, cut_at = trickle(env, head, b"X-Slow: 1\r\n", limit=CUT_WITHIN + 6)
    env.record_case(case="held/slow-loris headers (HP_TIMEOUT_CLIENT=3s)", input=head,
                    expected=f"408 or close within {CUT_WITHIN:g}s", observed=observed,
                    measured=m)
    assert cut_at is not None and cut_at <= CUT_WITHIN, observed
    assert not env.upstream.saw(mark)


# --- connection limit


def test_max_connections(tmp_path: Path, key: str, nextcloud: FakeNextcloud,
                         upstream: RecordingUpstream, record_case: Callable[..., None],
                         measure: Callable[[Any], Any]) -> None:
    proc = start_harp(tmp_path, key, nextcloud, HP_MAX_CONNECTIONS="50",
                      HP_TIMEOUT_CLIENT="60s", HP_LOG_LEVEL="warning")
    socks: list[socket.socket] = []
    try:
        pid = proc.proc.pid if proc.proc else 0
        time.sleep(0.3)
        baseline = fd_count(pid) or 0
        with measure(proc) as m:
            for _ in range(200):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", proc.http_port))
                socks.append(sock)
            time.sleep(1.5)
            held = (fd_count(pid) or 0) - baseline
            for sock in socks:
                sock.close()
            socks.clear()
            served_at = None
            start = time.monotonic()
            while time.monotonic() - start < 2.0:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", proc.http_port, timeout=1)
                    conn.request("GET", "/exapps/app_api/info", headers={"harp-shared-key": key})
                    status = conn.getresponse().status
                    conn.close()
                except OSError:
                    time.sleep(0.1)
                    continue
                if status == 200:
                    served_at = time.monotonic() - start
                    break
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and (fd_count(pid) or 0) > baseline:
                time.sleep(0.1)
        final = (fd_count(pid) or 0) - baseline
        record_case(case="maxconn/200 idle connections, HP_MAX_CONNECTIONS=50",
                    input="200 x connect(), nothing sent",
                    expected="<=50 accepted; info 200 within 2s after close; fds back",
                    observed=f"{held} accepted; info after "
                             f"{'never' if served_at is None else f'{served_at:.1f}s'}; "
                             f"fds {final:+d} vs baseline", measured=m)
        assert held <= 50 + 2, f"{held} connections accepted with HP_MAX_CONNECTIONS=50"
        assert served_at is not None
        assert final <= 0
    finally:
        for sock in socks:
            sock.close()
        proc.stop()
