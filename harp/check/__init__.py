"""``python -m harp check``: an operator self-test in the daemon's own environment.

One small function per check (certificates, HaRP's ports, Nextcloud, clock, Redis, Kubernetes,
Docker engines), each returning a :class:`~harp.check.result.Result`; :mod:`harp.check.runner`
prints them one line each and sets the exit status.  Blocking standard-library I/O with
short timeouts: this is a command-line tool, not the reactor.
See docs/operations.md#python--m-harp-check.
"""

from harp.check.runner import run

__all__ = ["run"]
