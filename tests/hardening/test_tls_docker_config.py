"""TLS, Docker passthrough and start-up hardening, end to end against the real ``twistd harp``.

* TLS policy (docs/security.md#tls) of the HTTPS frontend, probed with Debian's ``openssl s_client``
  and Python's ``ssl``: no static-RSA/CBC suite, no TLS 1.1, ALPN ``h2`` only still connects.
* the Docker passthrough (docs/differences.md#22) forwards only AppAPI's query parameters: an
  ``images/create?fromSrc=<url>`` in any spelling never makes the engine fetch the URL.
* ``install_certificates`` puts the FRP files into a stopped container before
  it first runs (the test container records what it found at its first start).
* six replicas (docs/security.md#pki) on one empty ``HP_CERTS_DIR`` all start and share one valid
  FRP PKI; a malformed IPv6 URL is one line and exit code 2.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.conftest import HarpProcess, base_env, run_harp_once, self_signed_pem
from tests.hardening.helpers import RecordingUpstream
from tests.interop.docker_helpers import (
    LOCAL_IMAGE,
    AppApi,
    Engine,
    docker_engine,
    harp_env_for,
    running_harp,
)

pytestmark = pytest.mark.interop
__all__ = ["docker_engine"]  # the session fixture, re-exported for pytest

RecordCase = Callable[..., None]


# =========================================================================== TLS


@pytest.fixture(scope="module")
def https_harp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HarpProcess]:
    workdir = tmp_path_factory.mktemp("harp-tls")
    # HTTP/2 off: these cases check the HTTP/1.1-only ALPN answers (tests/interop/
    # test_http2.py covers h2 on).
    env = base_env(workdir, HP_HTTP2="false")
    certs = Path(env["HP_CERTS_DIR"])
    certs.mkdir(parents=True)
    self_signed_pem(certs / "cert.pem", "tls.example")
    proc = HarpProcess(env, workdir).start()
    yield proc
    proc.stop()


def _openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("openssl command not installed")
    return found


def s_client(port: int, *args: str, send: bytes = b"") -> tuple[bool, str]:
    """Run ``openssl s_client`` against 127.0.0.1:port: (handshake done, output).

    With ``send``, s_client waits for the server to close (``Connection: close``) so the
    answer is in the output; without, it hangs up right after the handshake.
    """
    wait = ["-ign_eof"] if send and "-no_ign_eof" not in args else []
    done = subprocess.run(
        [_openssl(), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "tls.example",
         *wait, *args],
        input=send, capture_output=True, timeout=20, check=False,
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    established = done.returncode == 0 and "Cipher is (NONE)" not in output and (
        "New, TLSv1" in output or "Protocol version:" in output or "Protocol  :" in output
    )
    return established, output


def _negotiated(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("New, "):
            return line.strip()
    return "handshake failed"


def _request(key: str) -> bytes:
    return (
        b"GET /exapps/app_api/heartbeat HTTP/1.1\r\nHost: tls.example\r\n"
        b"harp-shared-key: " + key.encode() + b"\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("static RSA + CBC (AES128-SHA)", ["-tls1_2", "-cipher", "AES128-SHA"]),
        ("static RSA + GCM (AES256-GCM-SHA384)", ["-tls1_2", "-cipher", "AES256-GCM-SHA384"]),
        ("ECDHE + CBC (ECDHE-RSA-AES128-SHA)", ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"]),
        ("TLS 1.1", ["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]),
        ("TLS 1.0", ["-tls1", "-cipher", "DEFAULT:@SECLEVEL=0"]),
    ],
)
def test_weak_tls_refused(
    https_harp: HarpProcess, record_case: RecordCase, case: str, args: list[str]
) -> None:
    established, output = s_client(https_harp.https_port, *args)
    record_case(case=f"hole10/{case}", input="openssl s_client " + " ".join(args),
                expected="handshake refused", observed=_negotiated(output))
    assert not established, output


@pytest.mark.parametrize(
    ("case", "args", "protocol"),
    [
        ("TLS 1.2 ECDHE-RSA-AES128-GCM-SHA256",
         ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"], "TLSv1.2"),
        ("TLS 1.2 ECDHE-RSA-CHACHA20-POLY1305",
         ["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"], "TLSv1.2"),
        ("TLS 1.3 default", ["-tls1_3"], "TLSv1.3"),
    ],
)
def test_modern_tls_accepted(
    https_harp: HarpProcess, record_case: RecordCase, case: str, args: list[str], protocol: str
) -> None:
    established, output = s_client(https_harp.https_port, *args,
                                   send=_request(https_harp.env["HP_SHARED_KEY"]))
    record_case(case=f"hole10/{case}", input="openssl s_client " + " ".join(args),
                expected=f"{protocol}, HTTP 200", observed=_negotiated(output))
    assert established, output
    assert f"New, {protocol}" in output
    assert "HTTP/1.1 200" in output and '{"status":"ok"}' in output


def _frp_client_cert(harp: HarpProcess) -> list[str]:
    frp = Path(harp.env["HP_CERTS_DIR"]) / "frp"
    return ["-cert", str(frp / "client.crt"), "-key", str(frp / "client.key")]


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("static RSA + CBC (AES128-SHA)", ["-tls1_2", "-cipher", "AES128-SHA"]),
        ("ECDHE + CBC (ECDHE-RSA-AES128-SHA)", ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"]),
        ("TLS 1.1", ["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"]),
    ],
)
def test_frp_port_weak_tls_refused(
    https_harp: HarpProcess, record_case: RecordCase, case: str, args: list[str]
) -> None:
    """The FRP server applies the same policy, even to a client holding a valid cert."""
    established, output = s_client(https_harp.frp_port, *_frp_client_cert(https_harp), *args)
    record_case(case=f"hole10/FRP port {case}", input="openssl s_client " + " ".join(args),
                expected="handshake refused", observed=_negotiated(output))
    assert not established, output


def test_frp_port_modern_tls_accepted(https_harp: HarpProcess, record_case: RecordCase) -> None:
    args = ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]
    established, output = s_client(https_harp.frp_port, *_frp_client_cert(https_harp), *args)
    record_case(case="hole10/FRP port TLS 1.2 ECDHE-RSA-AES128-GCM-SHA256",
                input="openssl s_client " + " ".join(args),
                expected="TLSv1.2 with the client certificate", observed=_negotiated(output))
    assert established and "New, TLSv1.2" in output, output


def test_renegotiation_refused(https_harp: HarpProcess, record_case: RecordCase) -> None:
    # s_client reads "R" on a line of its own as "renegotiate now", then sends the request.
    _, output = s_client(
        https_harp.https_port, "-tls1_2", "-no_ign_eof",
        send=b"R\n" + _request(https_harp.env["HP_SHARED_KEY"]),
    )
    answered = "HTTP/1.1 200" in output
    observed = "renegotiated and answered" if answered else "renegotiation refused"
    record_case(case="hole10/client renegotiation (TLS 1.2)", input="s_client R",
                expected="renegotiation refused", observed=observed)
    assert "RENEGOTIATING" in output, output
    assert not answered, output


def test_alpn_h2_only_falls_back_to_http11(
    https_harp: HarpProcess, record_case: RecordCase
) -> None:
    established, output = s_client(https_harp.https_port, "-alpn", "h2",
                                   send=_request(https_harp.env["HP_SHARED_KEY"]))
    observed = "no ALPN, HTTP 200" if (
        established and "No ALPN negotiated" in output and "HTTP/1.1 200" in output
    ) else _negotiated(output)
    record_case(case="hole10/ALPN h2 only (openssl)", input="s_client -alpn h2",
                expected="no ALPN, HTTP 200", observed=observed)
    assert established, output
    assert "No ALPN negotiated" in output
    assert "HTTP/1.1 200" in output and '{"status":"ok"}' in output


def _python_tls(port: int, alpn: list[str]) -> tuple[str | None, int]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        selected = conn.sock.selected_alpn_protocol()
        conn.request("GET", "/exapps/app_api/heartbeat")
        return selected, conn.getresponse().status
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("alpn", "selected"),
    [(["h2"], None), (["h2", "http/1.1"], "http/1.1"), (["http/1.1"], "http/1.1"),
     (["spdy/3", "acme-tls/1"], None)],
)
def test_alpn_python_client(
    https_harp: HarpProcess, record_case: RecordCase, alpn: list[str], selected: str | None
) -> None:
    try:
        observed: tuple[str | None, int] | str = _python_tls(https_harp.https_port, alpn)
    except (OSError, ssl.SSLError) as exc:
        observed = f"handshake failed: {exc}"
    record_case(case=f"hole10/ALPN {','.join(alpn)} (python)", input=str(alpn),
                expected=f"{selected}, 401", observed=str(observed))
    # 401: no shared key; what matters is that HTTP/1.1 works on the connection
    assert observed == (selected, 401)


def test_policy_survives_sighup_reload(
    https_harp: HarpProcess, record_case: RecordCase
) -> None:
    certs = Path(https_harp.env["HP_CERTS_DIR"])
    serial = self_signed_pem(certs / "cert.pem", "reloaded.example")
    assert https_harp.proc is not None
    https_harp.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        pem = ssl.get_server_certificate(("127.0.0.1", https_harp.https_port), timeout=5)
        if x509.load_pem_x509_certificate(pem.encode()).serial_number == serial:
            break
        assert time.monotonic() < deadline, "SIGHUP did not reload cert.pem"
        time.sleep(0.1)
    weak, output = s_client(https_harp.https_port, "-tls1_2", "-cipher", "AES128-SHA")
    h2, _ = s_client(https_harp.https_port, "-alpn", "h2")
    record_case(case="hole10/after SIGHUP reload", input="AES128-SHA; -alpn h2",
                expected="refused; connects", observed=f"weak={weak}; h2={h2}")
    assert not weak, output
    assert h2


# ============================================================ passthrough queries


@pytest.fixture(scope="module")
def docker_harp(
    docker_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HarpProcess]:
    workdir = tmp_path_factory.mktemp("harp-docker-hardening")
    with running_harp(workdir, harp_env_for(workdir, docker_engine.socket_path)) as proc:
        yield proc


@pytest.fixture
def api_version(docker_engine: Engine) -> str:
    return "v1.44" if docker_engine.kind == "podman" else "v1.41"


IMPORT_QUERIES = {
    "fromSrc url": "fromSrc={url}&repo=harp-evil-{tag}",
    "fromImage + fromSrc": "fromImage=busybox&fromSrc={url}&repo=harp-evil-{tag}",
    "percent-encoded name": "from%53rc={url}&repo=harp-evil-{tag}",
    "semicolon separator": "fromImage=busybox;fromSrc={url}&repo=harp-evil-{tag}",
    "duplicate fromImage": "fromImage=busybox&fromImage=x&fromSrc={url}",
    "plus in name": "fromSrc+={url}&repo=harp-evil-{tag}",
}


@pytest.mark.parametrize("case", sorted(IMPORT_QUERIES))
def test_image_import_from_url_refused(
    docker_harp: HarpProcess, docker_engine: Engine, api_version: str,
    record_case: RecordCase, case: str,
) -> None:
    tag = secrets.token_hex(4)
    with RecordingUpstream() as upstream:
        url = f"http%3A%2F%2F127.0.0.1%3A{upstream.port}%2F{tag}.tar"
        query = IMPORT_QUERIES[case].format(url=url, tag=tag)
        status, _, body = AppApi(docker_harp).raw(
            "POST", f"/{api_version}/images/create?{query}", timeout=30
        )
        time.sleep(0.3)
        fetched = upstream.saw(tag)
    record_case(case=f"hole11/{case}", input=f"POST images/create?{query}",
                expected="403, engine fetches nothing",
                observed=f"{status}, fetched={fetched}")
    assert (status, body) == (403, b"403 Forbidden")
    assert not fetched
    assert docker_engine.api("GET", f"/images/harp-evil-{tag}/json")[0] == 404


@pytest.mark.parametrize(
    ("case", "method", "path"),
    [
        ("logs follow", "GET", "/containers/nc_app_x/logs?stdout=true&follow=true"),
        ("inspect size", "GET", "/containers/nc_app_x/json?size=true"),
        ("ping query", "GET", "/_ping?x=1"),
    ],
)
def test_unknown_parameters_refused(
    docker_harp: HarpProcess, api_version: str, record_case: RecordCase,
    case: str, method: str, path: str,
) -> None:
    status, _, _ = AppApi(docker_harp).raw(method, f"/{api_version}{path}", timeout=10)
    record_case(case=f"hole11/{case}", input=f"{method} {path}", expected="403",
                observed=str(status))
    assert status == 403


def test_appapi_pull_still_works(
    docker_harp: HarpProcess, docker_engine: Engine, api_version: str, record_case: RecordCase
) -> None:
    ref = docker_engine.registry_ref
    quoted = ref.replace("/", "%2F").replace(":", "%3A")
    conn = AppApi(docker_harp).connection(120)
    try:
        conn.request("POST", f"/exapps/app_api/{api_version}/images/create?fromImage={quoted}",
                     headers=AppApi(docker_harp).headers(Connection="close"))
        resp = conn.getresponse()
        status, body = resp.status, resp.read()
    finally:
        conn.close()
    events = [json.loads(line) for line in body.splitlines() if line.strip()]
    record_case(case="hole11/AppAPI pull (fromImage)", input=f"images/create?fromImage={quoted}",
                expected="200 + NDJSON, no error", observed=f"{status}, {len(events)} events")
    assert status == 200
    assert events and not any("error" in event for event in events), events
    status, _, body = AppApi(docker_harp).raw(
        "GET", f"/{api_version}/containers/nc_app_none/logs?stdout=true&stderr=true&tail=all"
    )
    assert status == 404  # forwarded (the engine's answer), not refused by the allow-list


# ============================================== install_certificates file order

#: Records, at the container's first start only, whether the FRP files were there.
RECORDER = (
    "[ -e /first-start ] || { if [ -f /certs/frp/client.key ] && [ -f /certs/frp/ca.crt ]; "
    "then echo frp=yes; else echo frp=no; fi > /first-start; }; "
    "trap 'exit 0' TERM; while :; do sleep 0.1; done"
)


@pytest.fixture
def recorder(docker_engine: Engine) -> Iterator[str]:
    """A stopped ``nc_app_<id>`` container from the test image running :data:`RECORDER`."""
    app_id = f"harptls{secrets.token_hex(4)}"
    status, body = docker_engine.api_json(
        "POST", f"/containers/create?name=nc_app_{app_id}",
        {"Image": LOCAL_IMAGE, "Cmd": ["/bin/sh", "-c", RECORDER],
         "HostConfig": {"NetworkMode": "host"}},
    )
    assert status == 201, body
    yield app_id
    docker_engine.force_remove(f"nc_app_{app_id}")


def _read(engine: Engine, container: str, path: str) -> bytes | None:
    import io
    import tarfile

    status, data = engine.api("GET", f"/containers/{container}/archive?path={path}")
    if status != 200:
        return None
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(path.rsplit("/", 1)[1])
        return None if member is None else member.read()


def _state(engine: Engine, container: str) -> dict[str, Any]:
    status, info = engine.api_json("GET", f"/containers/{container}/json")
    assert status == 200
    state = info["State"]
    assert isinstance(state, dict)
    return state


@pytest.mark.parametrize("with_ca_bundle", [True, False])
def test_frp_certs_in_place_before_first_start(
    docker_harp: HarpProcess, docker_engine: Engine, recorder: str,
    record_case: RecordCase, with_ca_bundle: bool,
) -> None:
    container = f"nc_app_{recorder}"
    ca_pem = (Path(docker_harp.env["HP_CERTS_DIR"]) / "frp" / "ca.crt").read_text()
    appapi = AppApi(docker_harp)
    status, body = appapi.exapp("install_certificates", {
        "name": recorder, "instance_id": "",
        "system_certs_bundle": ca_pem if with_ca_bundle else None, "install_frp_certs": True,
    })
    state_after = _state(docker_engine, container)
    # AppAPI's next step: start (204 expected), then the ExApp's frpc connects.
    started = appapi.exapp("start", {"name": recorder, "instance_id": ""})
    deadline = time.monotonic() + 10
    while (first := _read(docker_engine, container, "/first-start")) is None:
        assert time.monotonic() < deadline, "the container never recorded its first start"
        time.sleep(0.1)
    never_started = state_after["StartedAt"].startswith("0001-")
    record_case(
        case=f"hole14/install_certificates ({'with' if with_ca_bundle else 'no'} CA bundle)",
        input="stopped container, install_frp_certs=true",
        expected="frp=yes at first start; stopped; start 204",
        observed=f"{first.decode().strip()}; running={state_after['Running']}; "
                 f"start {started[0]}; never started={never_started}",
    )
    assert (status, body) == (204, "")
    assert first.strip() == b"frp=yes"
    assert state_after["Running"] is False
    assert started == (204, "")
    if not with_ca_bundle:
        assert never_started  # nothing to run: the container is not started at all
    else:
        installed = _read(docker_engine, container,
                          "/usr/local/share/ca-certificates/custom_ca_cert_0.crt")
        assert installed is not None and installed.strip() == ca_pem.strip().encode()
        bundle = _read(docker_engine, container, "/etc/ca-bundle.pem")
        assert bundle is not None and b"BEGIN CERTIFICATE" in bundle  # the update ran


# ================================================================ PKI race, URLs


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[HarpProcess]]:
    """Six HaRP processes on one empty ``HP_CERTS_DIR``, started without waiting.

    Each gets its own working directory: log file names are per millisecond, and six
    processes started together would share (and truncate) one.
    """
    certs = tmp_path / "shared-certs"
    procs = []
    for index in range(6):
        workdir = tmp_path / f"replica-{index}"
        workdir.mkdir()
        procs.append(HarpProcess(base_env(workdir, HP_CERTS_DIR=str(certs)), workdir))
    for proc in procs:
        proc.start(wait=False)
    yield procs
    for proc in procs:
        proc.stop()


def test_six_replicas_share_one_fresh_pki(
    tmp_path: Path, replicas: list[HarpProcess], harp_factory: type[HarpProcess],
    record_case: RecordCase,
) -> None:
    certs = tmp_path / "shared-certs"
    procs = replicas
    failures = []
    for proc in procs:
        try:
            proc.wait_listening(timeout=60)
        except AssertionError as exc:
            failures.append(str(exc)[:300])
    frp = certs / "frp"
    load = x509.load_pem_x509_certificate
    problems: list[str] = []
    try:
        ca = load((frp / "ca.crt").read_bytes())
        for stem in ("server", "client"):
            cert = load((frp / f"{stem}.crt").read_bytes())
            key = serialization.load_pem_private_key((frp / f"{stem}.key").read_bytes(), None)
            if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
                problems.append(f"{stem}.key does not match {stem}.crt")
            try:
                cert.verify_directly_issued_by(ca)
            except Exception as exc:  # any failure is the finding
                problems.append(f"{stem}.crt not issued by ca.crt: {exc!r}")
        ca_key = serialization.load_pem_private_key((frp / "ca.key").read_bytes(), None)
        if ca_key.public_key().public_numbers() != ca.public_key().public_numbers():  # type: ignore[union-attr]
            problems.append("ca.key does not match ca.crt")
    except (OSError, ValueError) as exc:
        problems.append(f"unreadable set: {exc}")
    leftovers = sorted(n for n in os.listdir(frp) if n.startswith(".harp-pki-new."))
    # Exactly one replica wrote the set; the others waited and used it (no overwriting).
    writers = sum("generated FRP certificates" in proc.output() for proc in procs)
    record_case(case="hole15/6 replicas, one empty HP_CERTS_DIR", input="6 x twistd harp",
                expected="all start; 1 writer; set verifies",
                observed=f"{6 - len(failures)}/6 started; {writers} writers; "
                         f"problems={problems or 'none'}")
    assert not failures, failures
    assert not problems, problems
    assert writers == 1
    assert not leftovers
    # and a later start keeps using the same, valid set
    before = (frp / "ca.crt").read_bytes()
    harp_factory(base_env(tmp_path, HP_CERTS_DIR=str(certs))).start()
    assert (frp / "ca.crt").read_bytes() == before


@pytest.mark.parametrize(
    ("variable", "value"),
    [("NC_INSTANCE_URL", "http://[::1"), ("HP_REDIS_URL", "redis://[::1"),
     ("HP_REDIS_URL", "redis://:hunter2-secret@[::1:6379/0")],
)
def test_malformed_ipv6_url_is_one_line_exit_2(
    tmp_path: Path, record_case: RecordCase, variable: str, value: str
) -> None:
    code, output = run_harp_once(base_env(tmp_path, **{variable: value}), tmp_path)
    lines = [line for line in output.splitlines() if line.strip()]
    record_case(case=f"hole15/{variable} malformed IPv6", input=value,
                expected="exit 2, one line naming it", observed=f"exit {code}, {len(lines)} lines")
    assert code == 2, output
    assert len(lines) == 1 and variable in lines[0], output
    assert "Traceback" not in output and "hunter2" not in output
