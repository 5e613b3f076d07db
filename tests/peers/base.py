"""What every test peer has in common: ``start()`` / ``stop()`` and a ``with`` block.

Why a base: a test reads the same whichever peer it drives (``with FakeNextcloud(key) as nc``,
``with ExAppProcess(...) as app``, ``HarpProcess(env, tmp).start()``), and a new peer only
writes its own start and stop.  The helpers below are the parts the subprocess peers
(``twistd harp``, the nc_py_api ExApp, frpc) would otherwise each spell out: ending a child
that may ignore SIGTERM, and reading a log that may not exist yet.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

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


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just reported free on ``host`` (the small race is acceptable in tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
