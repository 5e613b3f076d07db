"""What one check found: a status, a name, a detail, and the fix when it did not pass.

Every check of ``python -m harp check`` returns one :class:`Result`; the runner only
prints them and turns them into the exit status, so a check never prints or exits
itself and each can be tested on its own.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    """``PASS`` and ``SKIP`` (nothing to check here) keep the exit status 0;
    ``WARN`` (works today, will break or is fragile) and ``FAIL`` make it 1."""

    PASS = "PASS"  # noqa: S105 - a status word, not a password
    SKIP = "SKIP"
    WARN = "WARN"
    FAIL = "FAIL"

    @property
    def ok(self) -> bool:
        return self in (Status.PASS, Status.SKIP)


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    status: Status
    detail: str
    #: What the operator should do; only shown when the status is not ok.
    fix: str = ""


def passed(name: str, detail: str) -> Result:
    return Result(name, Status.PASS, detail)


def skipped(name: str, detail: str) -> Result:
    return Result(name, Status.SKIP, detail)


def warned(name: str, detail: str, fix: str) -> Result:
    return Result(name, Status.WARN, detail, fix)


def failed(name: str, detail: str, fix: str) -> Result:
    return Result(name, Status.FAIL, detail, fix)
