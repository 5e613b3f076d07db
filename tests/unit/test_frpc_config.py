"""``harp.frpc_config`` and ``python -m harp frpc-config``: rendering, validation, files.

The rendered text is parsed back with ``tomllib`` rather than compared as a string, so
the tests pin what frpc will *read* (key names, types, values) and not the layout.  That
the text is also what the real frpc accepts is proven in tests/interop/test_frpc_config.py.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harp import __main__ as cli
from harp import frpc_config as fc
from harp.pki import ensure_frp_certificates

KEY = "s3cret-Key_42"
TLS = fc.TlsFiles.in_directory("/etc/frp")


def parse(config: fc.FrpcConfig) -> dict[str, Any]:
    return tomllib.loads(fc.render(config, header=fc.header_for(config)))


def engine(**overrides: Any) -> fc.FrpcConfig:
    options: dict[str, Any] = {
        "server_addr": "harp.example.com", "server_port": 8782, "token": KEY, "tls": TLS,
    }
    options.update(overrides)
    return fc.engine_config(**options)


def exapp(**overrides: Any) -> fc.FrpcConfig:
    options: dict[str, Any] = {
        "server_addr": "10.0.0.5", "server_port": 8782, "token": KEY,
        "app_id": "my_app", "app_port": 23000, "tls": None,
    }
    options.update(overrides)
    return fc.exapp_config(**options)


# --------------------------------------------------------------------------- rendering


def test_engine_with_tls_renders_every_key_frpc_needs() -> None:
    assert parse(engine()) == {
        "serverAddr": "harp.example.com",
        "serverPort": 8782,
        "loginFailExit": False,
        "transport": {"tls": {
            "enable": True,
            "certFile": "/etc/frp/client.crt",
            "keyFile": "/etc/frp/client.key",
            "trustedCaFile": "/etc/frp/ca.crt",
            "serverName": "harp.nc",
        }},
        "metadatas": {"token": KEY},
        "proxies": [{
            "name": "deploy-daemon-1",
            "type": "tcp",
            "remotePort": 24001,
            "plugin": {"type": "unix_domain_socket", "unixPath": "/var/run/docker.sock"},
        }],
    }


def test_exapp_without_tls_says_tls_enable_false() -> None:
    """frpc turns TLS on by default, which a HP_FRP_DISABLE_TLS server cannot speak."""
    data = parse(exapp())
    assert data["transport"] == {"tls": {"enable": False}}
    assert data["proxies"] == [{
        "name": "my_app", "type": "tcp", "remotePort": 23000,
        "plugin": {"type": "unix_domain_socket", "unixPath": "/tmp/exapp.sock"},
    }]
    assert data["serverAddr"] == "10.0.0.5"


def test_header_is_comments_only_and_warns_about_the_key() -> None:
    text = fc.render(engine(), header=fc.header_for(engine()))
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("shared key" in line for line in comments)
    assert tomllib.loads(text) == tomllib.loads(fc.render(engine()))


def test_default_engine_name_follows_the_port() -> None:
    assert engine(remote_port=24007).proxy_name == "deploy-daemon-7"
    assert engine(remote_port=24007, name="gpu-box").proxy_name == "gpu-box"


def test_ipv6_server_address_is_unbracketed() -> None:
    assert engine(server_addr="[::1]").server_addr == "::1"
    assert engine(server_addr=" 2001:db8::1 ").server_addr == "2001:db8::1"


def test_tls_files_in_directory_tolerates_a_trailing_slash() -> None:
    assert fc.TlsFiles.in_directory("/certs/frp/") == fc.TlsFiles(
        "/certs/frp/ca.crt", "/certs/frp/client.crt", "/certs/frp/client.key"
    )


# --------------------------------------------------------------------------- escaping


@pytest.mark.parametrize(
    "value",
    ['say "hi"', "back\\slash", "line\nbreak\ttab\r\f\b", "del\x7f", "nul\x00",
     "{{ .Envs.HOME }}", "a{{{b}}}c", "ünïcödé ✓", ""],
)
def test_toml_string_round_trips(value: str) -> None:
    assert tomllib.loads(f"x = {fc.toml_string(value)}")["x"] == value


@given(st.text())
def test_toml_string_round_trips_anything(value: str) -> None:
    encoded = fc.toml_string(value)
    assert tomllib.loads(f"x = {encoded}")["x"] == value
    # frpc runs the file through Go's text/template first: no braces may survive raw.
    assert "{" not in encoded and "}" not in encoded
    assert "\n" not in encoded


def test_key_with_template_braces_is_escaped_in_the_file() -> None:
    text = fc.render(engine(token="ab{{cd}}"))
    assert "{{" not in text
    assert tomllib.loads(text)["metadatas"]["token"] == "ab{{cd}}"


def test_socket_path_with_quote_and_space_is_escaped() -> None:
    path = '/run/my "odd" dir/docker.sock'
    assert parse(engine(socket_path=path))["proxies"][0]["plugin"]["unixPath"] == path


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("port", [24001, 24050, 24099])
def test_engine_ports_in_range(port: int) -> None:
    assert engine(remote_port=port).remote_port == port


@pytest.mark.parametrize("port", [24000, 24100, 23999, 8782, 0, 70000])
def test_engine_ports_out_of_range(port: int) -> None:
    with pytest.raises(fc.FrpcConfigError, match="24001-24099"):
        engine(remote_port=port, name="x")


def test_engine_port_24000_explains_why() -> None:
    with pytest.raises(fc.FrpcConfigError, match="local Docker socket"):
        engine(remote_port=24000, name="x")


@pytest.mark.parametrize("port", [23000, 23999])
def test_exapp_ports_in_range(port: int) -> None:
    assert exapp(app_port=port).remote_port == port


@pytest.mark.parametrize("port", [22999, 24000, 24001])
def test_exapp_ports_out_of_range(port: int) -> None:
    with pytest.raises(fc.FrpcConfigError, match="23000-23999"):
        exapp(app_port=port)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_server_port_checked(port: int) -> None:
    with pytest.raises(fc.FrpcConfigError, match="server port"):
        engine(server_port=port)


@pytest.mark.parametrize(
    "name", ['a"b', "a'b", "a\nb", "a b", "", "-lead", "x" * 101, "a\\b", "ünï", "a{b"]
)
def test_bad_names_rejected(name: str) -> None:
    with pytest.raises(fc.FrpcConfigError, match="name"):
        engine(name=name)
    with pytest.raises(fc.FrpcConfigError, match="name"):
        exapp(app_id=name)


@pytest.mark.parametrize("name", ["deploy-daemon-1", "my_app", "a.b-c_d", "x" * 100, "9"])
def test_good_names_accepted(name: str) -> None:
    assert engine(name=name).proxy_name == name


@pytest.mark.parametrize(
    "addr", ["", "host:8782", "a b", "-bad.example", "bad-.example", 'h"x', "h\nx",
             "1.2.3", "[::1", "x" * 254, "http://harp"],
)
def test_bad_server_addresses_rejected(addr: str) -> None:
    with pytest.raises(fc.FrpcConfigError, match="server address"):
        engine(server_addr=addr)


@pytest.mark.parametrize(
    "addr", ["harp", "harp.example.com", "harp.example.com.", "appapi_harp", "192.0.2.1"]
)
def test_good_server_addresses_accepted(addr: str) -> None:
    assert engine(server_addr=addr).server_addr == addr.removesuffix(".")


@pytest.mark.parametrize(
    ("path", "message"),
    [("docker.sock", "absolute"), ("/run/a\nb.sock", "control"), ("/" + "s" * 107, "107 bytes")],
)
def test_bad_socket_paths_rejected(path: str, message: str) -> None:
    with pytest.raises(fc.FrpcConfigError, match=message):
        engine(socket_path=path)


def test_relative_certs_dir_rejected() -> None:
    with pytest.raises(fc.FrpcConfigError, match="absolute"):
        fc.TlsFiles.in_directory("certs/frp")


@pytest.mark.parametrize("token", ["", "tab\tkey", "nl\n"])
def test_bad_token_rejected(token: str) -> None:
    with pytest.raises(fc.FrpcConfigError, match="shared key"):
        engine(token=token)


# --------------------------------------------------------------------------- files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_bundle_modes_order_and_contents(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    files = {"ca.crt": b"CA", "client.crt": b"CRT", "client.key": b"KEY"}
    written = fc.write_bundle(out, "x = 1\n", files)
    assert [p.name for p in written] == ["ca.crt", "client.crt", "client.key", "frpc.toml"]
    assert {p.name: mode(p) for p in written} == {
        "ca.crt": 0o644, "client.crt": 0o644, "client.key": 0o600, "frpc.toml": 0o600,
    }
    assert mode(out) == 0o700
    assert (out / "client.key").read_bytes() == b"KEY"
    assert sorted(os.listdir(out)) == ["ca.crt", "client.crt", "client.key", "frpc.toml"]


def test_write_bundle_replaces_existing_files_and_keeps_private_mode(tmp_path: Path) -> None:
    (tmp_path / "frpc.toml").write_text("old")
    os.chmod(tmp_path / "frpc.toml", 0o644)
    fc.write_bundle(tmp_path, "new\n", {})
    assert (tmp_path / "frpc.toml").read_text() == "new\n"
    assert mode(tmp_path / "frpc.toml") == 0o600


def test_write_bundle_refuses_a_file_as_directory(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(fc.FrpcConfigError, match="not a directory"):
        fc.write_bundle(target, "x\n", {})


def test_read_client_files_missing_says_start_harp(tmp_path: Path) -> None:
    with pytest.raises(fc.FrpcConfigError, match="start HaRP once"):
        fc.read_client_files(tmp_path)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HaRP's environment for the command; returns HP_CERTS_DIR."""
    for name in list(os.environ):
        if name.startswith(("HP_", "NC_")):
            monkeypatch.delenv(name)
    certs = tmp_path / "certs"
    monkeypatch.setenv("HP_SHARED_KEY", KEY)
    monkeypatch.setenv("NC_INSTANCE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HP_FRP_ADDRESS", "0.0.0.0:9782")
    monkeypatch.setenv("HP_CERTS_DIR", str(certs))
    return certs


def test_cli_prints_config_and_warns_about_the_key(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["frpc-config", "engine", "--server-addr", "harp.example.com"])
    out, err = capsys.readouterr()
    assert code == 0
    data = tomllib.loads(out)
    assert data["metadatas"]["token"] == KEY
    assert data["serverPort"] == 9782  # from HP_FRP_ADDRESS
    assert data["transport"]["tls"]["keyFile"] == str(env / "frp" / "client.key")
    assert "contains HaRP's shared key" in err
    assert KEY not in err


def test_cli_exapp_defaults_to_the_container_cert_path(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main([
        "frpc-config", "exapp", "--server-addr", "10.1.2.3", "--server-port", "8782",
        "--app-id", "llm2", "--app-port", "23005",
    ])
    data = tomllib.loads(capsys.readouterr().out)
    assert code == 0
    assert data["transport"]["tls"]["certFile"] == "/certs/frp/client.crt"
    assert data["proxies"][0]["name"] == "llm2"
    assert data["serverPort"] == 8782


def test_cli_out_writes_certs_with_absolute_paths(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ensure_frp_certificates(env / "frp", 1)
    monkeypatch.chdir(tmp_path)
    code = cli.main([
        "frpc-config", "engine", "--server-addr", "harp", "--remote-port", "24077",
        "--out", "bundle",
    ])
    out, err = capsys.readouterr()
    assert code == 0, err
    bundle = tmp_path / "bundle"
    data = tomllib.loads((bundle / "frpc.toml").read_text())
    assert data["transport"]["tls"]["trustedCaFile"] == str(bundle / "ca.crt")
    assert data["proxies"][0]["name"] == "deploy-daemon-77"
    for name in ("ca.crt", "client.crt", "client.key"):
        assert (bundle / name).read_bytes() == (env / "frp" / name).read_bytes()
    assert mode(bundle / "client.key") == 0o600
    assert mode(bundle / "frpc.toml") == 0o600
    assert KEY not in out + err
    assert f"wrote {bundle / 'frpc.toml'}" in out


def test_cli_out_with_certs_path_for_another_machine(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ensure_frp_certificates(env / "frp", 1)
    code = cli.main([
        "frpc-config", "engine", "--server-addr", "harp", "--out", str(tmp_path / "b"),
        "--certs-path", "/etc/frp",
    ])
    assert code == 0
    data = tomllib.loads((tmp_path / "b" / "frpc.toml").read_text())
    assert data["transport"]["tls"]["certFile"] == "/etc/frp/client.crt"


def test_cli_out_without_tls_writes_only_the_config(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HP_FRP_DISABLE_TLS", "true")
    code = cli.main(
        ["frpc-config", "engine", "--server-addr", "harp", "--out", str(tmp_path / "b")]
    )
    assert code == 0
    assert os.listdir(tmp_path / "b") == ["frpc.toml"]
    data = tomllib.loads((tmp_path / "b" / "frpc.toml").read_text())
    assert data["transport"] == {"tls": {"enable": False}}


def test_cli_out_without_certificates_fails_clearly(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["frpc-config", "engine", "--server-addr", "harp", "--out", str(tmp_path / "b")]
    )
    assert code == 1
    assert "start HaRP once" in capsys.readouterr().err
    assert not (tmp_path / "b" / "frpc.toml").exists()


def test_cli_bad_environment_is_one_line_exit_2(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HP_SHARED_KEY")
    assert cli.main(["frpc-config", "engine", "--server-addr", "harp"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("harp: configuration error: HP_SHARED_KEY")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["frpc-config", "engine", "--server-addr", "harp", "--remote-port", "24000"],
        ["frpc-config", "engine", "--server-addr", "harp", "--name", 'a"b'],
        ["frpc-config", "exapp", "--server-addr", "harp", "--app-id", "a", "--app-port", "80"],
        ["frpc-config", "engine", "--server-addr", "harp:8782"],
    ],
)
def test_cli_bad_arguments_exit_2_without_output(
    env: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("harp frpc-config: error:")


@pytest.mark.parametrize(
    "argv",
    [[], ["nope"], ["frpc-config"], ["frpc-config", "engine"],
     ["frpc-config", "exapp", "--server-addr", "h", "--app-id", "a", "--app-port", "x"]],
)
def test_cli_usage_errors_exit_2(env: Path, argv: list[str]) -> None:
    assert cli.main(argv) == 2


def test_cli_healthcheck_still_dispatched(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def fake(settings: Any) -> int:
        seen.append(settings.shared_key)
        return 0

    monkeypatch.setattr(cli, "healthcheck", fake)
    assert cli.main(["healthcheck"]) == 0
    assert seen == [KEY]
