"""The pure parts of ``python -m harp check``: each check's judgement of what it found.

The I/O (files, sockets, HTTP) is exercised against real peers in
tests/interop/test_check.py; here every branch of the judging is covered with generated
certificates and hand-made answers.
"""

from __future__ import annotations

import datetime
import io
import json
import shutil
from email.utils import formatdate
from pathlib import Path

import pytest
from cryptography import x509

from harp import pki
from harp.check import certs, engines, frontends, nextcloud, redis, runner
from harp.check.http import Reply
from harp.check.nextcloud import Probe
from harp.check.result import Status, failed, passed
from harp.config.redis_url import parse_redis_url
from tests.conftest import self_signed_pem

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)
SECOND = datetime.timedelta(seconds=1)
RECORD = {"exapp_token": "t", "exapp_version": "1", "host": "127.0.0.1", "port": 23000,
          "routes": []}


def _json(status: int, body: object, **headers: str) -> Reply:
    return Reply(status, {"content-type": "application/json", **headers},
                 json.dumps(body).encode())


# ---------------------------------------------------------------- certificates


def test_https_pem_good_near_expiry_expired_and_not_yet_valid(tmp_path: Path) -> None:
    pem = tmp_path / "cert.pem"
    self_signed_pem(pem, "harp.example", days=90)
    data = pem.read_bytes()
    cert = x509.load_pem_x509_certificate(data)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    assert certs.judge_https_pem(data, "cert.pem", start + DAY).status is Status.PASS
    near = certs.judge_https_pem(data, "cert.pem", end - 19.5 * DAY)
    assert near.status is Status.WARN and "expires in 19 days" in near.detail
    assert "SIGHUP" in near.fix
    expired = certs.judge_https_pem(data, "cert.pem", end + SECOND)
    assert expired.status is Status.FAIL and "expired" in expired.detail
    early = certs.judge_https_pem(data, "cert.pem", start - SECOND)
    assert early.status is Status.FAIL and "not valid before" in early.detail


def test_https_pem_mismatched_or_unreadable(tmp_path: Path) -> None:
    self_signed_pem(tmp_path / "a.pem", "a", days=90)
    self_signed_pem(tmp_path / "b.pem", "b", days=90)
    cert_a = (tmp_path / "a.pem").read_bytes().split(b"-----BEGIN PRIVATE KEY")[0]
    key_b = b"-----BEGIN PRIVATE KEY" + (tmp_path / "b.pem").read_bytes().split(
        b"-----BEGIN PRIVATE KEY")[1]
    result = certs.judge_https_pem(cert_a + key_b, "cert.pem", NOW)
    assert result.status is Status.FAIL and "does not belong" in result.detail
    assert certs.judge_https_pem(cert_a, "cert.pem", NOW).detail == (
        "cert.pem holds no PEM private key")
    assert "no PEM certificate" in certs.judge_https_pem(b"junk", "cert.pem", NOW).detail


def test_https_certificate_absent_is_skipped(tmp_path: Path) -> None:
    result = certs.https_certificate(tmp_path / "cert.pem", NOW)
    assert result.status is Status.SKIP and "HTTPS frontend is off" in result.detail


@pytest.fixture(scope="module")
def frp_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("frp")
    pki.ensure_frp_certificates(directory, 100)
    return directory


def _files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in pki.FILES}


def test_frp_set_complete_and_expiring(frp_set: Path) -> None:
    later = NOW + datetime.timedelta(minutes=5)  # the set was made after NOW
    good = certs.frp_certificates(frp_set, disabled=False, now=later)
    assert good.status is Status.PASS and "CA, server and client match" in good.detail
    near = certs.judge_frp_set(_files(frp_set), "frp", NOW + 80 * DAY)
    assert near.status is Status.WARN and "expires in" in near.detail
    assert "never replaces" in near.fix


def test_frp_set_missing_files(frp_set: Path, tmp_path: Path) -> None:
    empty = certs.frp_certificates(tmp_path / "none", disabled=False, now=NOW)
    assert empty.status is Status.FAIL and "no FRP certificates" in empty.detail
    files = _files(frp_set)
    del files[pki.CLIENT_KEY]
    partial = certs.judge_frp_set(files, "frp", NOW + DAY)
    assert partial.status is Status.FAIL and "missing: client.key" in partial.detail
    disabled = certs.frp_certificates(tmp_path, disabled=True, now=NOW)
    assert disabled.status is Status.SKIP


def test_frp_set_mixed_from_two_sets(frp_set: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.ensure_frp_certificates(other, 100)
    files = _files(frp_set)
    files[pki.CLIENT_CRT] = (other / pki.CLIENT_CRT).read_bytes()
    mismatch = certs.judge_frp_set(files, "frp", NOW + DAY)
    assert mismatch.status is Status.FAIL and "does not belong" in mismatch.detail
    files[pki.CLIENT_KEY] = (other / pki.CLIENT_KEY).read_bytes()
    foreign = certs.judge_frp_set(files, "frp", NOW + DAY)
    assert foreign.status is Status.FAIL and "not issued by this ca.crt" in foreign.detail


def test_frp_set_unreadable_file(frp_set: Path, tmp_path: Path) -> None:
    copy = tmp_path / "frp"
    shutil.copytree(frp_set, copy)
    (copy / pki.SERVER_KEY).write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n")
    result = certs.frp_certificates(copy, disabled=False, now=NOW + DAY)
    assert result.status is Status.FAIL and "server.key" in result.detail


# ------------------------------------------------------------------- Nextcloud


def _probe(reply: Reply | None, error: str = "", skew: float = 0.0) -> Probe:
    local = 1_800_000_000.0
    if reply is not None:
        headers = {**reply.headers, "date": formatdate(local - skew, usegmt=True)}
        reply = Reply(reply.status, headers, reply.body)
    return Probe("http://nc/index.php/apps/app_api/harp/exapp-meta?appId=x", reply, error,
                 local_time=local)


def test_nextcloud_accepts_the_key() -> None:
    found = _probe(_json(200, RECORD))
    assert nextcloud.reachable(found).status is Status.PASS
    assert nextcloud.shared_key(found, "x").status is Status.PASS
    assert nextcloud.clock(found).status is Status.PASS


def test_nextcloud_refuses_the_key_only_known_wrong_with_an_app_id() -> None:
    found = _probe(_json(401, {"message": nextcloud.BAD_KEY_MESSAGE}))
    assert nextcloud.reachable(found).status is Status.PASS  # AppAPI answered
    wrong = nextcloud.shared_key(found, "x")
    assert wrong.status is Status.FAIL and "refuses HP_SHARED_KEY" in wrong.detail
    unknown = nextcloud.shared_key(found, None)
    assert unknown.status is Status.SKIP and "--app-id" in unknown.detail


@pytest.mark.parametrize(("reply", "words"), [
    (Reply(404, {"content-type": "text/html"}, b"<html>"), "not a Nextcloud with AppAPI"),
    (_json(200, {"hello": "world"}), "not a Nextcloud with AppAPI"),
    (_json(401, ["not", "appapi"]), "not a Nextcloud with AppAPI"),
    (Reply(301, {"location": "https://nc/"}), "a redirect to https://nc/"),
    (Reply(503), "maintenance"),
    (Reply(500), "an error inside Nextcloud"),
])
def test_nextcloud_other_answers(reply: Reply, words: str) -> None:
    found = _probe(reply)
    result = nextcloud.reachable(found)
    assert result.status is Status.FAIL and words in result.detail, result
    assert result.fix
    assert nextcloud.shared_key(found, "x").status is Status.SKIP


def test_nextcloud_without_appapi() -> None:
    status = _json(200, {"installed": True, "versionstring": "31.0.4", "productname": "N"})
    found = Probe("u", Reply(404, {"content-type": "text/html"}), status_php=status)
    result = nextcloud.reachable(found)
    assert result.status is Status.FAIL
    assert "Nextcloud 31.0.4 answers, but not its AppAPI" in result.detail
    assert "app_api" in result.fix


def test_nextcloud_unreachable() -> None:
    found = _probe(None, "connection refused (nothing listens there)")
    result = nextcloud.reachable(found)
    assert result.status is Status.FAIL and "cannot reach" in result.detail
    assert "NC_INSTANCE_URL" in result.fix
    untrusted = nextcloud.reachable(_probe(None, "its TLS certificate is not trusted (x)"))
    assert "trust" in untrusted.fix
    plain = nextcloud.reachable(_probe(None, "the TLS handshake failed (WRONG_VERSION_NUMBER)"))
    assert "scheme" in plain.fix
    assert nextcloud.clock(found).status is Status.SKIP


@pytest.mark.parametrize(("skew", "status", "words"), [
    (0, Status.PASS, "within 1 s"),
    (20, Status.PASS, "within 20 s"),
    (45, Status.WARN, "45 s ahead of"),
    (-3600, Status.WARN, "3600 s behind"),
])
def test_clock(skew: float, status: Status, words: str) -> None:
    result = nextcloud.clock(_probe(_json(200, RECORD), skew=skew))
    assert result.status is status and words in result.detail, result


def test_clock_without_a_date() -> None:
    found = Probe("u", Reply(200, {}, b""), local_time=1.0)
    assert nextcloud.clock(found).status is Status.SKIP


# ------------------------------------------------------------ HaRP and engines


def test_judge_info() -> None:
    assert frontends.judge_info("h", "w", _json(200, {"version": "1.0"})).status is Status.PASS
    other_key = frontends.judge_info("h", "w", Reply(401))
    assert other_key.status is Status.FAIL and "another key" in other_key.detail
    squatter = frontends.judge_info("h", "w", Reply(404, {}, b"nope"))
    assert squatter.status is Status.FAIL and "not as HaRP" in squatter.detail


def test_judge_version() -> None:
    new = _json(200, {"Version": "27.5.1", "ApiVersion": "1.47"})
    assert engines.judge_version("sock", new).status is Status.PASS
    old = engines.judge_version("sock", _json(200, {"Version": "20.10", "ApiVersion": "1.41"}))
    assert old.status is Status.FAIL and "too old for API 1.44" in old.detail
    assert "--docker-api-version" in old.fix
    assert engines.judge_version("sock", _json(200, {"ApiVersion": "1.41"}), "1.41").status \
        is Status.PASS
    assert engines.judge_version("sock", Reply(404)).status is Status.FAIL


def test_judge_engines() -> None:
    absent = Reply(503)
    up = Reply(200, {"server": "Docker/27.5.1 (linux)", "api-version": "1.47"}, b"OK")
    live = engines.judge_engines({24001: absent, 24002: up}, local_present=True)
    assert live.status is Status.PASS and "24002 (Docker/27.5.1 (linux), API 1.47)" in live.detail
    assert engines.judge_engines({24001: absent}, True).status is Status.SKIP
    none = engines.judge_engines({}, local_present=False)
    assert none.status is Status.FAIL and "no Docker engine at all" in none.detail
    old = engines.judge_engines({24003: Reply(400)}, True)
    assert old.status is Status.FAIL and "too old" in old.detail
    broken = engines.judge_engines({24004: Reply(502)}, True)
    assert broken.status is Status.FAIL and "24004 (HTTP 502)" in broken.detail


def test_local_engine_missing_socket_is_skipped(tmp_path: Path) -> None:
    assert engines.local_engine(tmp_path / "docker.sock").status is Status.SKIP


# ----------------------------------------------------------------------- redis


def test_redis_login_commands() -> None:
    url = parse_redis_url("redis://bob:s3cret@127.0.0.1:6379/2")
    assert url is not None
    assert redis.login(url) == [
        b"*3\r\n$4\r\nAUTH\r\n$3\r\nbob\r\n$6\r\ns3cret\r\n",
        b"*2\r\n$6\r\nSELECT\r\n$1\r\n2\r\n",
        b"*1\r\n$4\r\nPING\r\n",
    ]
    bare = parse_redis_url("unix:///run/redis.sock")
    assert bare is not None and redis.login(bare) == [redis.command("PING")]


@pytest.mark.parametrize(("replies", "status", "words"), [
    ([b"+OK\r\n", b"+PONG\r\n"], Status.PASS, "Redis answers"),
    ([b"-WRONGPASS invalid username-password pair\r\n", b"-NOAUTH x\r\n"], Status.FAIL,
     "refuses the login: WRONGPASS"),
    ([b"-NOAUTH Authentication required.\r\n"], Status.FAIL, "refuses the login"),
    ([b"+OK\r\n", b"-ERR DB index is out of range\r\n", b"+PONG\r\n"], Status.FAIL,
     "DB index"),
    ([b"HTTP/1.1 400 Bad Request\r\n"], Status.FAIL, "does not answer like Redis"),
    ([b""], Status.FAIL, "does not answer like Redis"),
])
def test_redis_judge(replies: list[bytes], status: Status, words: str) -> None:
    result = redis.judge("redis://h:1", replies)
    assert result.status is status and words in result.detail, result


def test_redis_unset_is_skipped() -> None:
    assert redis.redis_state(None).status is Status.SKIP


# ---------------------------------------------------------------------- runner


def test_format_line_shows_the_fix_only_when_not_ok() -> None:
    assert runner.format_line(passed("x", "fine")) == "PASS  x           fine"
    assert runner.format_line(failed("x", "broken", "mend it")).endswith(
        "broken -- fix: mend it")


def test_bad_configuration_is_the_config_line_and_exit_2() -> None:
    out = io.StringIO()
    code = runner.run({"HP_SHARED_KEY": "a-secret-key-1234", "NC_INSTANCE_URL": "ftp://x"}, out)
    assert code == 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FAIL  config") and "NC_INSTANCE_URL" in lines[0]
    assert "a-secret-key-1234" not in out.getvalue()
