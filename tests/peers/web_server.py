"""Real nginx and Caddy in front of HaRP, configured with the README's own snippets.

Why real servers and the README's text: the reverse-proxy snippets are where operators go
wrong (a stripped ``/exapps/`` prefix, no WebSocket ``Upgrade`` handling, a buffered SSE
stream, a body-size limit, one ban bucket for everybody behind the proxy), so the snippets
the README shows must be the ones the tests run.  :func:`readme_snippet` takes a fenced
block from between ``<!-- snippet:NAME -->`` and ``<!-- /snippet -->`` in a document and
:func:`fill` replaces only documented placeholders (HaRP's address, a certificate path),
refusing a snippet that lost one; everything around the snippet (ports, pid, logs, temp
directories) is the test's.

Both servers run as unprivileged foreground processes on a free loopback port with every
file under the given directory, never as the system service::

    with NginxProcess(tmp_path, http_block, server_block) as nginx:
        ...  # http://127.0.0.1:{nginx.port}/exapps/...
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

from tests.peers.base import REPO, ChildProcess, free_port, port_accepts

#: HaRP's address in the README snippets: the one placeholder the tests replace.
HARP_PLACEHOLDER = "127.0.0.1:8780"

_SNIPPET = re.compile(
    r"<!-- snippet:(?P<name>[\w-]+) -->\s*```[\w-]*\n(?P<body>.*?)```\s*<!-- /snippet -->",
    re.DOTALL,
)


class ProxyUnavailable(RuntimeError):
    """The web server's program is not installed (``tools/install-peers`` installs it)."""


def snippets(document: Path) -> dict[str, str]:
    """Every marked snippet of ``document`` (relative to the checkout) by name."""
    found: dict[str, str] = {}
    for match in _SNIPPET.finditer((REPO / document).read_text()):
        name = match["name"]
        if name in found:
            raise AssertionError(f"{document}: snippet {name!r} appears twice")
        found[name] = match["body"]
    return found


def readme_snippet(name: str, document: str = "README.md") -> str:
    """The README's snippet ``name`` (or ``document``'s); a missing one fails the test."""
    found = snippets(Path(document))
    if name not in found:
        raise AssertionError(f"{document} has no <!-- snippet:{name} --> block")
    return found[name]


def fill(snippet: str, values: Mapping[str, str]) -> str:
    """The snippet with each documented placeholder (a key of ``values``) replaced."""
    for placeholder, value in values.items():
        if placeholder not in snippet:
            raise AssertionError(f"snippet lost its placeholder {placeholder}:\n{snippet}")
        snippet = snippet.replace(placeholder, value)
    return snippet


def find_program(name: str) -> str:
    """The installed server program (Debian puts nginx in /usr/sbin, often not on PATH)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        raise ProxyUnavailable(f"{name} is not installed (run tools/install-peers)")
    return path


class _ServerProcess(ChildProcess):
    """A web server child process in the foreground, listening on 127.0.0.1:``port``;
    :meth:`output` includes its error log."""

    program = ""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir / f"{self.program}.out")
        self.workdir = workdir
        self.port = free_port()
        #: What the test calls this server (one program may run in several set-ups).
        self.kind = self.program

    def command(self, binary: str) -> list[str]:
        """Write the configuration under ``workdir`` and return the command line."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self.command(find_program(self.program))
        proc = self.spawn(command, self.environment(), self.workdir, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not port_accepts(self.port):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"{self.program} did not listen:\n{self.output()}")
            time.sleep(0.05)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class NginxProcess(_ServerProcess):
    """nginx with the README's ``http {}`` and ``server {}`` parts around a test listener."""

    program = "nginx"

    def __init__(self, workdir: Path, http_part: str, server_part: str) -> None:
        super().__init__(workdir)
        self.http_part, self.server_part = http_part, server_part

    def command(self, binary: str) -> list[str]:
        d = self.workdir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / sub).mkdir(exist_ok=True)
        # As root, nginx's workers would switch to "nobody", who cannot enter pytest's
        # private tmp_path: keep them as the current user (the line is ignored otherwise).
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
        conf = d / "nginx.conf"
        conf.write_text(f"""
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {self.log_path} info;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{self.http_part}
    server {{
        listen 127.0.0.1:{self.port};
        server_name cloud.test;
{self.server_part}
    }}
}}
""")
        return [binary, "-p", str(d), "-c", str(conf), "-e", str(self.log_path),
                "-g", "daemon off;"]


class CaddyProcess(_ServerProcess):
    """Caddy with the README's site-block part under a plain-HTTP loopback site."""

    program = "caddy"

    def __init__(self, workdir: Path, site_part: str) -> None:
        super().__init__(workdir)
        self.site_part = site_part

    def environment(self) -> dict[str, str]:
        # Caddy keeps its storage under $XDG_DATA_HOME / $XDG_CONFIG_HOME (or $HOME).
        d = self.workdir
        return {**os.environ, "HOME": str(d), "XDG_DATA_HOME": str(d / "data"),
                "XDG_CONFIG_HOME": str(d / "config")}

    def command(self, binary: str) -> list[str]:
        conf = self.workdir / "Caddyfile"
        conf.write_text(f"""{{
    admin off
    auto_https off
}}

http://127.0.0.1:{self.port} {{
    bind 127.0.0.1
{self.site_part}
}}
""")
        return [binary, "run", "--config", str(conf), "--adapter", "caddyfile"]
