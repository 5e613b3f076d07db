"""What every test peer has in common: ``start()`` / ``stop()`` and a ``with`` block.

Why a base: a test reads the same whichever peer it drives (``with FakeNextcloud(key) as nc``,
``with ExAppProcess(...) as app``, ``HarpProcess(env, tmp).start()``), and a new peer only
writes its own start and stop.  The helpers below are the parts the subprocess peers
(``twistd harp``, the nc_py_api ExApp, frpc) would otherwise each spell out: ending a child
that may ignore SIGTERM, and reading a log that may not exist yet.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

#: The checkout: the twistd plugin directory and ``tools/`` live here.
REPO = Path(__file__).resolve().parents[2]


class Peer:
    """A program the tests talk to over real sockets; ``with`` starts and stops it."""

    def start(self) -> Self:
        """Start serving and return ``self`` (so ``Peer(...).start()`` reads as one step)."""
        raise NotImplementedError

    def stop(self) -> object:
        """Stop; safe to call twice or before :meth:`start`."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ChildProcess(Peer):
    """A peer that is one child process, its stdout and stderr going to ``log_path``.

    The subprocess peers (``twistd harp``, nginx, Caddy) start differently but are read and
    stopped the same way: :meth:`output` for the log so far, :meth:`stop` for SIGTERM, then
    SIGKILL, and the log file closed.
    """

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def spawn(self, command: list[str], env: dict[str, str], cwd: Path,
              **popen: Any) -> subprocess.Popen[bytes]:
        """Start ``command`` with its output appended to the log; the process."""
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, **popen
        )
        return self.proc

    def output(self) -> str:
        """Everything the process logged so far (stdout and stderr)."""
        return read_log(self.log_path)

    def stop(self) -> int:
        """SIGTERM, SIGKILL after 10 s; the exit code (0 if never started)."""
        if self.proc is None:
            return 0
        code = end_process(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def end_process(
    proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0
) -> int:
    """Send ``sig``, wait ``timeout`` seconds, then SIGKILL; the exit code.

    A peer that hangs on shutdown must cost the suite seconds, not the whole run.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def read_log(path: Path) -> str:
    """A peer's log so far ("" before the peer created it); bad bytes are replaced."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def port_accepts(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection now (a peer's readiness check)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


#: Ports handed out by :func:`free_port` from below the ephemeral range: 10000 up to
#: the FRP tunnel ports (23000-24099), which the tests bind for their own purposes.
_PICK_LOW, _PICK_HIGH = 10000, 23000
_picked: set[int] = set()


def _ephemeral_low() -> int:
    """The first port the kernel hands out for outgoing connections and ``bind(0)``."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, chosen below the kernel's ephemeral range.

    Why not ``bind(0)``: that port comes from the ephemeral range, so between this
    check and the peer binding it, any outgoing connection (a test's client, HaRP's own
    upstream pool) may be given it as its source port, and the peer then fails with
    "Address already in use" (seen in CI).  Below the range only another listener can
    take it; each port is handed out once per test process.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    high = min(_PICK_HIGH, _ephemeral_low())
    if high - _PICK_LOW >= 1000:
        for _ in range(500):
            port = random.randrange(_PICK_LOW, high)
            if port in _picked:
                continue
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _picked.add(port)
            return port
    with socket.socket(family, socket.SOCK_STREAM) as sock:  # an unusual port range
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
