"""What a replica says about Redis being away: once per outage, not once per failed call.

While Redis is unreachable every request that records a failure or changes the registry
would otherwise log the same error; an operator needs one line when the outage starts, one
when it ends, and a distinct line for each refused login (a wrong password in
``HP_REDIS_URL`` is not an outage to wait out).  Credentials never appear: only
:meth:`~harp.config.RedisURL.describe` and the server's own answers are logged.
"""

from __future__ import annotations

from typing import Final

from twisted.python.failure import Failure

from harp.config import RedisURL
from harp.logs import HarpLogger

log = HarpLogger("harp.redis")

#: Distinct login refusals remembered (so each is logged once); more are logged every time.
MAX_LOGIN_ERRORS: Final = 8


class OutageLog:
    """The log-once bookkeeping of one replica's Redis connections."""

    def __init__(self, url: RedisURL) -> None:
        self.target = url.describe()
        self._outage_logged = False
        self._error_logged = False
        self._login_errors: set[str] = set()

    def unavailable(self, link: str, why: str) -> None:
        """A connection failed or was lost: logged when the outage starts."""
        if not self._outage_logged:
            self._outage_logged = True
            log.warn(
                "Redis {target} unavailable ({link}: {why}); bans and the ExApp registry are "
                "per-replica until it is back", target=self.target, link=link, why=why,
            )

    def login_refused(self, why: str) -> None:
        """AUTH or SELECT refused: an operator error worth its own line even in an outage
        already logged (``why`` is the server's answer; the password is not in it)."""
        self.unavailable("login", why)
        if why not in self._login_errors:
            if len(self._login_errors) < MAX_LOGIN_ERRORS:
                self._login_errors.add(why)
            log.error("Redis {target}: {why}; check HP_REDIS_URL", target=self.target, why=why)

    def call_failed(self, what: str, failure: Failure) -> None:
        """A command failed: the first failure since the last sync is logged."""
        if not self._error_logged:
            self._error_logged = True
            log.warn("Redis: could not {what}: {error}", what=what,
                     error=failure.getErrorMessage())

    def synced(self) -> None:
        """Redis and the mirror agree again: the outage (if one was logged) is over."""
        self._error_logged = False
        if self._outage_logged:
            self._outage_logged = False
            log.warn("Redis {target} reconnected: bans and the ExApp registry are shared "
                     "again", target=self.target)
