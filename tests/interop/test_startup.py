"""Start-up of the real ``twistd harp`` process: configuration errors, certificates, listeners."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from harp import __version__
from tests.conftest import self_signed_pem
from tests.peers.base import free_port
from tests.peers.harp import HarpProcess, run_harp_once

pytestmark = pytest.mark.interop

SECRET = "s3cr3t-Key_with.punct'ok"


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# --- bad configuration: exit code 2, one line naming the variable, no traceback, no secret


def _bad(env: dict[str, str], **changes: str | None) -> dict[str, str]:
    out = dict(env)
    for name, value in changes.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


BAD_CASES = {
    "no key": ({"HP_SHARED_KEY": None}, "HP_SHARED_KEY"),
    "key with quote": ({"HP_SHARED_KEY": 'ab"cd' + SECRET}, "HP_SHARED_KEY"),
    "key with backslash": ({"HP_SHARED_KEY": "ab\\cd" + SECRET}, "HP_SHARED_KEY"),
    "key with tab": ({"HP_SHARED_KEY": "ab\tcd" + SECRET}, "HP_SHARED_KEY"),
    "key only quotes": ({"HP_SHARED_KEY": '""'}, "HP_SHARED_KEY"),
    "key with template braces": ({"HP_SHARED_KEY": "ab{{x}}" + SECRET}, "HP_SHARED_KEY"),
    "empty NC url": ({"NC_INSTANCE_URL": ""}, "NC_INSTANCE_URL"),
    "NC url without scheme": ({"NC_INSTANCE_URL": "cloud.example.com"}, "NC_INSTANCE_URL"),
    "malformed address": ({"HP_EXAPPS_ADDRESS": "nohost"}, "HP_EXAPPS_ADDRESS"),
    "bad port": ({"HP_EXAPPS_HTTPS_ADDRESS": "127.0.0.1:99999"}, "HP_EXAPPS_HTTPS_ADDRESS"),
    "hostname address": ({"HP_FRP_ADDRESS": "example.com:8782"}, "HP_FRP_ADDRESS"),
    "empty frp address": ({"HP_FRP_ADDRESS": ""}, "HP_FRP_ADDRESS"),
    "session lifetime too big": ({"HP_SESSION_LIFETIME": "11"}, "HP_SESSION_LIFETIME"),
    "session lifetime negative": ({"HP_SESSION_LIFETIME": "-1"}, "HP_SESSION_LIFETIME"),
    "session lifetime text": ({"HP_SESSION_LIFETIME": "abc"}, "HP_SESSION_LIFETIME"),
    "unknown log level": ({"HP_LOG_LEVEL": "verbose"}, "HP_LOG_LEVEL"),
    "blacklist count text": ({"HP_BLACKLIST_COUNT": "ten"}, "HP_BLACKLIST_COUNT"),
    "blacklist count zero": ({"HP_BLACKLIST_COUNT": "0"}, "HP_BLACKLIST_COUNT"),
    "blacklist window float": ({"HP_BLACKLIST_WINDOW": "1.5"}, "HP_BLACKLIST_WINDOW"),
    "bad timeout": ({"HP_TIMEOUT_SERVER": "30 seconds"}, "HP_TIMEOUT_SERVER"),
    "bad tunnel timeout": ({"HP_TIMEOUT_TUNNEL": "-1"}, "HP_TIMEOUT_TUNNEL"),
    "bad trusted proxy": ({"HP_TRUSTED_PROXY_IPS": "10.0.0.0/8,not-an-ip"}, "HP_TRUSTED_PROXY_IPS"),
    "bad validity": ({"HP_FRP_CERT_VALIDITY_DAYS": "0"}, "HP_FRP_CERT_VALIDITY_DAYS"),
    "bad redis url": ({"HP_REDIS_URL": "http://user:pw@x"}, "HP_REDIS_URL"),
    # urlsplit's ValueError used to end start-up with a traceback, exit 1
    "NC url malformed IPv6": ({"NC_INSTANCE_URL": "http://[::1"}, "NC_INSTANCE_URL"),
    "NC url bad port": ({"NC_INSTANCE_URL": "http://127.0.0.1:99999"}, "NC_INSTANCE_URL"),
    "workers zero": ({"HP_WORKERS": "0"}, "HP_WORKERS"),
    "workers not a number": ({"HP_WORKERS": "all"}, "HP_WORKERS"),
    "redis url malformed IPv6": ({"HP_REDIS_URL": "redis://[::1"}, "HP_REDIS_URL"),
    "redis url malformed IPv6 with password": (
        {"HP_REDIS_URL": f"redis://:{SECRET}@[::1:6379"}, "HP_REDIS_URL"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_configuration_exits_2_with_one_line(
    case: str, harp_env: dict[str, str], tmp_path: Path
) -> None:
    changes, variable = BAD_CASES[case]
    env = _bad(harp_env, **changes)
    code, output = run_harp_once(env, tmp_path)
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert variable in lines[0]
    assert "Traceback" not in output
    assert harp_env["HP_SHARED_KEY"] not in output
    assert SECRET not in output


def test_both_key_and_key_file(harp_env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(SECRET + "\n")
    code, output = run_harp_once({**harp_env, "HP_SHARED_KEY_FILE": str(key_file)}, tmp_path)
    assert code == 2
    assert "HP_SHARED_KEY" in output and "only one" in output
    assert harp_env["HP_SHARED_KEY"] not in output and SECRET not in output


@pytest.mark.parametrize("content", [None, b"", b"\n\n", b"bad\\key\n"])
def test_bad_key_file(harp_env: dict[str, str], tmp_path: Path, content: bytes | None) -> None:
    key_file = tmp_path / "keyfile"
    if content is not None:
        key_file.write_bytes(content)
    env = _bad(harp_env, HP_SHARED_KEY=None, HP_SHARED_KEY_FILE=str(key_file))
    code, output = run_harp_once(env, tmp_path)
    assert code == 2, output
    assert "HP_SHARED_KEY_FILE" in output
    assert len(output.strip().splitlines()) == 1
    assert "Traceback" not in output


def test_key_file_is_used(harp_env: dict[str, str], harp_factory: type[HarpProcess],
                          tmp_path: Path) -> None:
    key_file = tmp_path / "keyfile"
    key_file.write_text(f'"{SECRET}"\n')
    env = _bad(harp_env, HP_SHARED_KEY=None, HP_SHARED_KEY_FILE=str(key_file))
    harp = harp_factory(env).start()
    assert get(harp.http_port, "/exapps/app_api/heartbeat", {"harp-shared-key": SECRET})[0] == 200


def test_unusable_certs_dir(harp_env: dict[str, str], tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code, output = run_harp_once({**harp_env, "HP_CERTS_DIR": str(not_a_dir)}, tmp_path)
    assert code == 2 and "HP_CERTS_DIR" in output and "Traceback" not in output


def test_partial_frp_certs_is_an_error(harp_env: dict[str, str], tmp_path: Path) -> None:
    frp = Path(harp_env["HP_CERTS_DIR"]) / "frp"
    frp.mkdir(parents=True)
    (frp / "ca.crt").write_text("x")
    code, output = run_harp_once(harp_env, tmp_path)
    assert code == 2, output
    assert "HP_CERTS_DIR" in output and "incomplete" in output and "server.key" in output


def test_port_in_use_is_a_clear_error(harp_env: dict[str, str], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = run_harp_once({**harp_env, "HP_FRP_ADDRESS": f"127.0.0.1:{port}"}, tmp_path)
    assert code == 2, output
    assert "HP_FRP_ADDRESS" in output and "Traceback" not in output


# --- certificates


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_frp_certificates_generated_and_kept(
    harp_env: dict[str, str], harp_factory: type[HarpProcess]
) -> None:
    env = {**harp_env, "HP_FRP_CERT_VALIDITY_DAYS": "42"}
    frp = Path(env["HP_CERTS_DIR"]) / "frp"
    frp.mkdir(parents=True)  # an existing *empty* directory must get certificates too
    harp = harp_factory(env).start()
    names = ["ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"]
    # .harp-pki.lock: the generation lock (docs/security.md#pki), kept on purpose
    assert sorted(n for n in os.listdir(frp) if not n.startswith(".")) == sorted(names)
    assert set(os.listdir(frp)) <= {*names, ".harp-pki.lock"}
    for key in ("ca.key", "server.key", "client.key"):
        assert (frp / key).stat().st_mode & 0o777 == 0o600
    ca, server, client = _load(frp / "ca.crt"), _load(frp / "server.crt"), _load(frp / "client.crt")
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "harp.nc"
    assert ca.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca
    for cert, name in ((server, "harp.nc"), (client, "harp.client.nc")):
        cert.verify_directly_issued_by(ca)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
        assert san.value.get_values_for_type(x509.DNSName) == [name]
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
        assert cert.public_key().key_size == 2048  # type: ignore[union-attr]
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert lifetime == datetime.timedelta(days=42)
    # The keys belong to the certificates.
    for stem in ("server", "client"):
        key = serialization.load_pem_private_key((frp / f"{stem}.key").read_bytes(), None)
        assert key.public_key().public_numbers() == (  # type: ignore[union-attr]
            _load(frp / f"{stem}.crt").public_key().public_numbers()  # type: ignore[union-attr]
        )
    before = {n: hashlib.sha256((frp / n).read_bytes()).hexdigest() for n in names}
    harp.stop()
    harp_factory(env).start()
    after = {n: hashlib.sha256((frp / n).read_bytes()).hexdigest() for n in names}
    assert before == after


def test_no_frp_certificates_when_tls_disabled(
    harp_env: dict[str, str], harp_factory: type[HarpProcess]
) -> None:
    harp_factory({**harp_env, "HP_FRP_DISABLE_TLS": "true"}).start()
    assert not (Path(harp_env["HP_CERTS_DIR"]) / "frp").exists()


# --- HTTP / HTTPS frontends


def test_info_and_heartbeat_need_the_key(
    harp_env: dict[str, str], harp_factory: type[HarpProcess]
) -> None:
    harp = harp_factory(harp_env).start()
    key = {"harp-shared-key": harp_env["HP_SHARED_KEY"]}
    status, body = get(harp.http_port, "/exapps/app_api/info", key)
    assert status == 200
    info = json.loads(body)
    assert info["version"] == __version__ and info["docker"] is True
    major, minor, _patch = (int(x) for x in info["version"].split("."))
    assert (major, minor) >= (0, 4)
    assert get(harp.http_port, "/exapps/app_api/heartbeat", key) == (200, b'{"status":"ok"}')
    assert get(harp.http_port, "/exapps/app_api/info") == (401, b"401 Unauthorized")
    assert get(harp.http_port, "/exapps/app_api/info", {"harp-shared-key": "wrong"}) == (
        401, b"401 Unauthorized",
    )
    assert harp_env["HP_SHARED_KEY"] not in harp.output()


def _tls_connection(port: int) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=ctx)


def _served_serial(conn: http.client.HTTPSConnection) -> int:
    assert conn.sock is not None
    der = conn.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_https_only_with_cert_pem(harp_env: dict[str, str],
                                  harp_factory: type[HarpProcess]) -> None:
    harp = harp_factory(harp_env).start()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", harp.https_port), timeout=2).close()
    harp.stop()

    certs = Path(harp_env["HP_CERTS_DIR"])
    first = self_signed_pem(certs / "cert.pem", "first.example")
    harp = harp_factory(harp_env).start()
    key = {"harp-shared-key": harp_env["HP_SHARED_KEY"]}
    conn = _tls_connection(harp.https_port)
    conn.request("GET", "/exapps/app_api/info", headers=key)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["docker"] is True
    assert _served_serial(conn) == first

    # SIGHUP: new connections get the new certificate, the open one keeps working.
    second = self_signed_pem(certs / "cert.pem", "second.example")
    assert harp.proc is not None
    harp.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        fresh = _tls_connection(harp.https_port)
        fresh.request("GET", "/exapps/app_api/heartbeat", headers=key)
        assert fresh.getresponse().read() == b'{"status":"ok"}'
        if _served_serial(fresh) == second or time.monotonic() > deadline:
            break
        fresh.close()
        time.sleep(0.1)
    assert _served_serial(fresh) == second
    fresh.close()
    conn.request("GET", "/exapps/app_api/heartbeat", headers=key)
    assert conn.getresponse().read() == b'{"status":"ok"}'
    conn.close()

    # A broken file on SIGHUP keeps the current certificate.
    (certs / "cert.pem").write_text("garbage")
    harp.proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    again = _tls_connection(harp.https_port)
    again.request("GET", "/exapps/app_api/heartbeat", headers=key)
    assert again.getresponse().status == 200 and _served_serial(again) == second
    again.close()
    assert "keeping the current HTTPS certificate" in harp.output()


def test_ipv6_listeners(harp_env: dict[str, str], harp_factory: type[HarpProcess]) -> None:
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    harp = harp_factory({**harp_env, "HP_FRP_ADDRESS": f"[::1]:{port}"}).start()
    socket.create_connection(("::1", port), timeout=2).close()
    assert harp.proc is not None and harp.proc.poll() is None


def test_verbose_start_redacts_secrets(harp_env: dict[str, str],
                                       harp_factory: type[HarpProcess]) -> None:
    env = {**harp_env, "HP_VERBOSE_START": "1", "HP_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0"}
    harp = harp_factory(env).start()
    out = harp.output()
    assert "HP_SHARED_KEY" in out and "<redacted>" in out
    assert env["HP_SHARED_KEY"] not in out and "hunter2" not in out
