"""Ready-to-run ``frpc.toml`` files for remote Docker engines and ExApps.

Setting up a remote Docker engine for the reference HaRP meant copying three certificate
files by hand and typing an ``frpc.toml`` from a README: one
wrong key name, a changed ``serverName`` or a port outside the allowed range, and frpc
fails with a message that does not point at the cause.  ``python -m harp frpc-config``
(docs/differences.md#10) renders that file from the same environment HaRP runs with, so the
token and the TLS mode cannot disagree with the server.

This module is pure: it validates, renders and writes; ``harp.__main__`` does the argument
parsing and the printing.  The rendered keys are those frpc 0.61-0.65 accepts in strict
mode (``frpc verify`` rejects unknown keys), and the proxy mirrors what an ExApp's
``start.sh`` writes (docs/compatibility.md#exapp-container-contract).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from harp.pki import CA_CRT, CLIENT_CRT, CLIENT_FILES, CLIENT_KEY, SERVER_NAME, write_atomic

Kind = Literal["engine", "exapp"]

#: Tunnel port ranges HaRP's FRP server allows (docs/compatibility.md#frp-proxies).  24000 is the
#: local engine, which HaRP serves from ``HP_DOCKER_SOCKET`` itself (docs/differences.md#3),
#: so a generated engine config must never claim it.
PORT_RANGES: Final[Mapping[Kind, tuple[int, int]]] = {
    "engine": (24001, 24099),
    "exapp": (23000, 23999),
}

#: The modes the client's TLS files (:data:`harp.pki.CLIENT_FILES`) are written with.
#: Only the private key is secret; the certificates are public.
CLIENT_FILE_MODES: Final[Mapping[str, int]] = {CA_CRT: 0o644, CLIENT_CRT: 0o644, CLIENT_KEY: 0o600}
CONFIG_NAME: Final = "frpc.toml"

#: Where an ExApp container finds its certificates (``install_certificates`` puts them
#: there and ``start.sh`` hard-codes the path), so an ExApp config defaults to it.
EXAPP_CERTS_DIR: Final = "/certs/frp"
DOCKER_SOCKET: Final = "/var/run/docker.sock"
EXAPP_SOCKET: Final = "/tmp/exapp.sock"  # noqa: S108 - the ExApp contract's fixed path

# sun_path is 108 bytes on Linux, including the terminating NUL.
_UNIX_PATH_MAX: Final = 107
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_TOML_ESCAPES: Final = {
    '"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r",
}


class FrpcConfigError(ValueError):
    """An input that would produce a config frpc or HaRP rejects; the text says which."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Paths of the client's TLS files *as frpc will see them* (on its own machine)."""

    ca: str
    cert: str
    key: str

    @classmethod
    def in_directory(cls, directory: str) -> TlsFiles:
        """The standard file names inside ``directory`` (which must be absolute).

        Absolute, because frpc resolves relative paths against its working directory,
        not against the config file, so a relative path works only by accident.
        """
        _check_path("certificate directory", directory)
        base = directory.rstrip("/") or "/"
        return cls(
            ca=os.path.join(base, CA_CRT),
            cert=os.path.join(base, CLIENT_CRT),
            key=os.path.join(base, CLIENT_KEY),
        )


@dataclass(frozen=True, slots=True)
class FrpcConfig:
    """One frpc client with one ``tcp`` proxy onto a unix socket; validated on creation.

    ``tls`` is ``None`` when HaRP runs with ``HP_FRP_DISABLE_TLS=true``: frpc enables TLS
    by default, and a TLS client cannot log in to a plain server, so the file must then
    say ``transport.tls.enable = false`` explicitly.
    """

    kind: Kind
    server_addr: str
    server_port: int
    token: str
    proxy_name: str
    remote_port: int
    unix_path: str
    tls: TlsFiles | None

    def __post_init__(self) -> None:
        if self.kind not in PORT_RANGES:
            raise FrpcConfigError(f"unknown kind {self.kind!r}: expected engine or exapp")
        object.__setattr__(self, "server_addr", normalise_server_addr(self.server_addr))
        if not 1 <= self.server_port <= 65535:
            raise FrpcConfigError(f"server port {self.server_port} is not in 1-65535")
        low, high = PORT_RANGES[self.kind]
        if not low <= self.remote_port <= high:
            hint = " (24000 is HaRP's local Docker socket)" if self.remote_port == 24000 else ""
            raise FrpcConfigError(
                f"remote port {self.remote_port} is outside {low}-{high}, "
                f"the range HaRP allows for an {'ExApp' if self.kind == 'exapp' else 'engine'}"
                + hint
            )
        check_proxy_name(self.proxy_name)
        _check_path("unix socket path", self.unix_path)
        if len(os.fsencode(self.unix_path)) > _UNIX_PATH_MAX:
            raise FrpcConfigError(
                f"unix socket path is longer than {_UNIX_PATH_MAX} bytes, "
                "the most a unix socket address can hold"
            )
        if not self.token or any(not 0x20 <= ord(ch) <= 0x7E for ch in self.token):
            # Settings already guarantees this; a direct caller gets the same promise.
            raise FrpcConfigError("the shared key must be non-empty printable ASCII")
        if self.tls is not None:
            for path in (self.tls.ca, self.tls.cert, self.tls.key):
                _check_path("certificate path", path)


def engine_config(
    *,
    server_addr: str,
    server_port: int,
    token: str,
    remote_port: int = 24001,
    name: str | None = None,
    socket_path: str = DOCKER_SOCKET,
    tls: TlsFiles | None,
) -> FrpcConfig:
    """A remote Docker engine's client; the name defaults to ``deploy-daemon-<n>``.

    Deriving the default name from the port keeps two engines set up with defaults
    from colliding: FRP proxy names must be unique across all clients, and a clash
    is only reported in frpc's log (``proxy [...] already exists``).
    """
    if name is None:
        name = f"deploy-daemon-{remote_port - 24000}"
    return FrpcConfig(
        kind="engine", server_addr=server_addr, server_port=server_port, token=token,
        proxy_name=name, remote_port=remote_port, unix_path=socket_path, tls=tls,
    )


def exapp_config(
    *,
    server_addr: str,
    server_port: int,
    token: str,
    app_id: str,
    app_port: int,
    socket_path: str = EXAPP_SOCKET,
    tls: TlsFiles | None,
) -> FrpcConfig:
    """An ExApp's client, as its ``start.sh`` would write it (proxy name = app id)."""
    return FrpcConfig(
        kind="exapp", server_addr=server_addr, server_port=server_port, token=token,
        proxy_name=app_id, remote_port=app_port, unix_path=socket_path, tls=tls,
    )


def normalise_server_addr(raw: str) -> str:
    """An IP literal (brackets around IPv6 removed) or a DNS name; anything else fails.

    frpc dials ``serverAddr:serverPort`` itself and wants a bare IPv6 address, so
    ``[::1]`` as an operator would write it in a URL is accepted and unwrapped.
    """
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    host = text.removesuffix(".")
    if (
        0 < len(host) <= 253
        and all(_LABEL_RE.fullmatch(label) for label in host.split("."))
        and not host.replace(".", "").isdigit()
    ):
        return host
    raise FrpcConfigError(
        f"server address {raw!r} is not an IP address or host name "
        "(give the address the frpc machine uses to reach HaRP's FRP port, without a port)"
    )


def check_proxy_name(name: str) -> None:
    """Proxy names: letters, digits, ``.``, ``_``, ``-``; at most 100 characters.

    Names appear in frpc's and HaRP's logs and must be unique across all clients;
    quotes, spaces or newlines there only ever come from a copy-paste accident.  Nextcloud
    app ids (``[a-z0-9_]``) and ``deploy-daemon-N`` fit.
    """
    if not _NAME_RE.fullmatch(name):
        raise FrpcConfigError(
            f"name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _check_path(what: str, path: str) -> None:
    if not path.startswith("/"):
        raise FrpcConfigError(f"{what} {path!r} must be an absolute path")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in path):
        raise FrpcConfigError(f"{what} {path!r} contains control characters")


def toml_string(value: str) -> str:
    """A TOML basic string that frpc reads back as exactly ``value``.

    Besides TOML's own escapes, ``{`` and ``}`` are written as ``\\u007B``/``\\u007D``:
    frpc (0.52+) runs every config file through Go's ``text/template`` *before* parsing
    the TOML, so a literal ``{{`` (allowed in a shared key) would be taken as a template
    action and break the file.  The escaped form passes the template step untouched and
    the TOML parser turns it back into the brace.
    """
    out: list[str] = []
    for ch in value:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F or ch in "{}":
            out.append(f"\\u{code:04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def render(config: FrpcConfig, *, header: Iterable[str] = ()) -> str:
    """The ``frpc.toml`` text; ``header`` lines become leading ``#`` comments."""

    def line(key: str, value: str | int | bool) -> str:
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = toml_string(value)
        return f"{key} = {text}"

    lines = [f"# {text}".rstrip() for text in header]
    if lines:
        lines.append("")
    lines += [
        line("serverAddr", config.server_addr),
        line("serverPort", config.server_port),
        # Keep retrying while HaRP restarts instead of exiting after one failed login.
        line("loginFailExit", False),
        "",
    ]
    if config.tls is None:
        lines.append(line("transport.tls.enable", False))
    else:
        lines += [
            line("transport.tls.enable", True),
            line("transport.tls.certFile", config.tls.cert),
            line("transport.tls.keyFile", config.tls.key),
            line("transport.tls.trustedCaFile", config.tls.ca),
            # The name in HaRP's server certificate; frpc checks it against the CA.
            line("transport.tls.serverName", SERVER_NAME),
        ]
    lines += [
        "",
        line("metadatas.token", config.token),
        "",
        "[[proxies]]",
        line("name", config.proxy_name),
        line("type", "tcp"),
        line("remotePort", config.remote_port),
        "",
        "[proxies.plugin]",
        line("type", "unix_domain_socket"),
        line("unixPath", config.unix_path),
    ]
    return "\n".join(lines) + "\n"


def header_for(config: FrpcConfig) -> list[str]:
    """Comment lines saying what the file is for, and that it holds a secret."""
    what = (
        f"remote Docker engine (socket {config.unix_path})"
        if config.kind == "engine"
        else f"ExApp {config.proxy_name}"
    )
    return [
        f"frpc configuration for a {what},",
        "generated by `python -m harp frpc-config`.",
        "It contains HaRP's shared key: keep it private (mode 0600).",
        f"Run with: frpc -c {CONFIG_NAME}  (frpc 0.61 or newer)",
    ]


def read_client_files(certs_dir: Path) -> dict[str, bytes]:
    """HaRP's ``ca.crt``, ``client.crt`` and ``client.key``, or a clear error.

    HaRP generates them on its first start with TLS on; this command never generates
    them itself, because a new CA made here would not be the one HaRP trusts.
    """
    files: dict[str, bytes] = {}
    for name in CLIENT_FILES:
        path = certs_dir / name
        try:
            files[name] = path.read_bytes()
        except FileNotFoundError:
            raise FrpcConfigError(
                f"{path} does not exist: start HaRP once (with HP_FRP_DISABLE_TLS=false) "
                "so that it generates the FRP certificates, and run this command with the "
                "same HP_CERTS_DIR"
            ) from None
        except OSError as exc:
            raise FrpcConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    return files


def write_bundle(out_dir: Path, config_text: str, client_files: Mapping[str, bytes]) -> list[Path]:
    """Write the certificate files and then ``frpc.toml`` into ``out_dir``; their paths.

    Every file is written atomically with its final mode from the start, so the key is
    never readable by others.  ``frpc.toml`` comes last: if it exists, the files it
    names exist too.  A directory that does not exist yet is created private (0700).
    """
    unknown = set(client_files) - set(CLIENT_FILES)
    if unknown:
        raise FrpcConfigError(f"unexpected client files: {', '.join(sorted(unknown))}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FrpcConfigError(f"{out_dir} exists and is not a directory")
    written: list[Path] = []
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in CLIENT_FILES:
            if name in client_files:
                path = out_dir / name
                write_atomic(path, client_files[name], CLIENT_FILE_MODES[name])
                written.append(path)
        path = out_dir / CONFIG_NAME
        write_atomic(path, config_text.encode(), 0o600)
        written.append(path)
    except OSError as exc:
        raise FrpcConfigError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    return written
