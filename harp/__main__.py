"""``python -m harp``: operator commands beside ``twistd -n harp``.

``healthcheck`` asks the running HaRP's ``/heartbeat`` through its HTTP frontend, so a
hung reactor is detected, not just an open port (the reference's healthcheck.sh does the
same).  Exit code 0 = healthy, 1 = not, 2 = bad configuration.

``frpc-config engine|exapp`` prints (or, with ``--out DIR``, writes together with the
client certificates) the ``frpc.toml`` a remote Docker engine or an ExApp needs to reach
this HaRP, built from the same environment HaRP runs with, so that the key and the TLS
mode always match the server (docs/differences.md#10).  Exit code 0 = done, 1 = files could
not be read or written, 2 = bad configuration or arguments.

``check`` runs the operator self-test of :mod:`harp.check` (docs/operations.md): one
line per check, exit code 0 = all passed, 1 = something to fix, 2 = bad configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

from harp import check, frpc_config
from harp.check.engines import APPAPI_API_VERSION
from harp.config import ConfigError, Settings
from harp.frpc_config import FrpcConfig, FrpcConfigError, TlsFiles


def healthcheck(settings: Settings) -> int:
    address = settings.exapps_address
    host = address.loopback_host
    host = f"[{host}]" if ":" in host else host
    request = urllib.request.Request(
        f"http://{host}:{address.port}/exapps/app_api/heartbeat",
        headers={"harp-shared-key": settings.shared_key},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return 0 if response.status == 200 else 1
    except OSError as exc:
        sys.stderr.write(f"harp healthcheck: {exc}\n")
        return 1


def _port(text: str) -> int:
    """argparse type: a whole number; the range check is frpc_config's (it knows why)."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None


def _api_version(text: str) -> str:
    """argparse type: a Docker API version such as ``1.44``."""
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a version like 1.44")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harp", description="HaRP operator commands (HaRP itself: twistd harp)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("healthcheck", help="exit 0 if the local HaRP answers /heartbeat")
    check_parser = commands.add_parser(
        "check", help="self-test: configuration, certificates, ports, Nextcloud, Docker",
        description="Check this HaRP's setup with the daemon's own environment, one line "
        "per check with the fix when it fails. Run it where HaRP runs (docker exec harp "
        "python -m harp check). Exit code 0 = all passed, 1 = something to fix, 2 = bad "
        "configuration.",
    )
    check_parser.add_argument(
        "--app-id", metavar="ID",
        help="an installed ExApp: only with one can Nextcloud confirm the shared key",
    )
    check_parser.add_argument(
        "--docker-api-version", default=APPAPI_API_VERSION, metavar="X.Y", type=_api_version,
        help="the Docker API version AppAPI calls (app_api's docker_api_version; "
        f"default {APPAPI_API_VERSION}, 1.41 before app_api 32.0.3)",
    )

    frpc = commands.add_parser(
        "frpc-config",
        help="print or write a ready frpc.toml for a remote Docker engine or an ExApp",
        description="Build an frpc.toml from HaRP's environment (HP_SHARED_KEY, "
        "HP_FRP_ADDRESS, HP_FRP_DISABLE_TLS, HP_CERTS_DIR). The output contains the "
        "shared key: keep it private.",
    )
    kinds = frpc.add_subparsers(dest="kind", required=True, metavar="KIND")

    def common(sub: argparse.ArgumentParser, socket_default: str) -> None:
        sub.add_argument(
            "--server-addr", required=True, metavar="HOST",
            help="address the frpc machine uses to reach HaRP's FRP port (IP or host name)",
        )
        sub.add_argument(
            "--server-port", type=_port, metavar="PORT",
            help="HaRP's FRP port as seen from the frpc machine "
            "(default: the port of HP_FRP_ADDRESS, usually 8782)",
        )
        sub.add_argument(
            "--socket", default=socket_default, metavar="PATH",
            help=f"unix socket frpc forwards to (default: {socket_default})",
        )
        sub.add_argument(
            "--out", type=Path, metavar="DIR",
            help="write DIR/frpc.toml (0600) and, with TLS, ca.crt, client.crt, client.key "
            "into DIR instead of printing",
        )
        sub.add_argument(
            "--certs-path", metavar="DIR",
            help="absolute directory where frpc will find ca.crt, client.crt, client.key "
            "(default: DIR of --out; else HaRP's $HP_CERTS_DIR/frp for an engine, "
            f"{frpc_config.EXAPP_CERTS_DIR} for an ExApp)",
        )

    engine = kinds.add_parser("engine", help="a remote Docker engine (remote port 24001-24099)")
    common(engine, frpc_config.DOCKER_SOCKET)
    engine.add_argument(
        "--remote-port", type=_port, default=24001, metavar="PORT",
        help="tunnel port on HaRP, 24001-24099; AppAPI's daemon config names it "
        "as the Docker socket port (default: 24001)",
    )
    engine.add_argument(
        "--name", metavar="NAME",
        help="FRP proxy name, unique among all clients (default: deploy-daemon-<port-24000>)",
    )

    exapp = kinds.add_parser("exapp", help="an ExApp container (app port 23000-23999)")
    common(exapp, frpc_config.EXAPP_SOCKET)
    exapp.add_argument("--app-id", required=True, metavar="ID", help="the ExApp's app id")
    exapp.add_argument(
        "--app-port", type=_port, required=True, metavar="PORT",
        help="the ExApp's APP_PORT, 23000-23999",
    )
    return parser


def _tls_files(args: argparse.Namespace, settings: Settings) -> TlsFiles | None:
    if settings.frp_disable_tls:
        if args.certs_path is not None:
            sys.stderr.write(
                "harp frpc-config: note: --certs-path ignored, HP_FRP_DISABLE_TLS is true\n"
            )
        return None
    if args.certs_path is not None:
        return TlsFiles.in_directory(args.certs_path)
    if args.out is not None:
        return TlsFiles.in_directory(os.path.abspath(args.out))
    if args.kind == "exapp":
        return TlsFiles.in_directory(frpc_config.EXAPP_CERTS_DIR)
    return TlsFiles.in_directory(os.path.abspath(settings.frp_certs_dir))


def _build(args: argparse.Namespace, settings: Settings) -> FrpcConfig:
    port = args.server_port if args.server_port is not None else settings.frp_address.port
    tls = _tls_files(args, settings)
    if args.kind == "engine":
        return frpc_config.engine_config(
            server_addr=args.server_addr, server_port=port, token=settings.shared_key,
            remote_port=args.remote_port, name=args.name, socket_path=args.socket, tls=tls,
        )
    return frpc_config.exapp_config(
        server_addr=args.server_addr, server_port=port, token=settings.shared_key,
        app_id=args.app_id, app_port=args.app_port, socket_path=args.socket, tls=tls,
    )


def frpc_config_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        config = _build(args, settings)
    except FrpcConfigError as exc:
        sys.stderr.write(f"harp frpc-config: error: {exc}\n")
        return 2
    text = frpc_config.render(config, header=frpc_config.header_for(config))
    if args.out is None:
        sys.stdout.write(text)
        sys.stderr.write(
            "harp frpc-config: warning: this output contains HaRP's shared key; "
            "keep it private (store it with mode 0600)\n"
        )
        if config.tls is not None:
            sys.stderr.write(
                "harp frpc-config: note: this config expects ca.crt, client.crt and client.key "
                f"in {os.path.dirname(config.tls.key)} on the frpc machine; copy them from "
                f"HaRP's {settings.frp_certs_dir} (--out DIR writes them for you)\n"
            )
        return 0
    try:
        files = frpc_config.read_client_files(settings.frp_certs_dir) if config.tls else {}
        written = frpc_config.write_bundle(Path(os.path.abspath(args.out)), text, files)
    except FrpcConfigError as exc:
        sys.stderr.write(f"harp frpc-config: error: {exc}\n")
        return 1
    for path in written:
        sys.stdout.write(f"wrote {path}\n")
    sys.stdout.write(f"run on the {args.kind} machine: frpc -c {written[-1]}\n")
    sys.stderr.write(
        f"harp frpc-config: warning: {written[-1]} contains HaRP's shared key; keep it private\n"
    )
    return 0


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "check":  # reports a bad configuration as one of its lines
        return check.run(os.environ, sys.stdout, args.app_id, args.docker_api_version)
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"harp: configuration error: {exc.line()}\n")
        return 2
    if args.command == "healthcheck":
        return healthcheck(settings)
    return frpc_config_command(args, settings)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
