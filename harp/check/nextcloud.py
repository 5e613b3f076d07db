"""Nextcloud checks: reachable, really AppAPI, accepting the shared key, clocks in step.

One request answers all three: ``GET {NC_INSTANCE_URL}/index.php/apps/app_api/harp/
exapp-meta?appId=<id>`` with ``harp-shared-key``, the call HaRP itself makes for every
ExApp it has not seen yet (docs/compatibility.md).  AppAPI answers it with

* 200 and the ExApp's JSON record: Nextcloud knows the app and accepts the key;
* 401 ``{"message": "Harp shared key is not valid"}`` for a wrong key **and** for an app
  it does not know (so installed apps cannot be guessed).

So an AppAPI answer proves "this is a Nextcloud with AppAPI"; anything else (a 404 page,
HTML, a redirect) is some other server or a wrong URL.  Then ``/status.php`` (which every
Nextcloud answers with its version) tells "a Nextcloud without AppAPI" (app_api disabled
or older than 32) from "not a Nextcloud at all".  The key itself can only be
confirmed with the id of an installed ExApp (``--app-id``): without one, a 401 is
reported as "not confirmed", never as "wrong", because it is not known to be wrong.
Each wrong key counts toward Nextcloud's brute-force throttling, hence one request.

The judging functions are pure (:class:`Probe` in, :class:`Result` out).
"""

from __future__ import annotations

import email.utils
import json
import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from harp.check import http
from harp.check.result import Result, failed, passed, skipped, warned
from harp.config.values import redact_url

META_PATH: Final = "/index.php/apps/app_api/harp/exapp-meta?appId="
#: The app id asked for when the operator names none (no ExApp is called that).
PROBE_APP: Final = "harp-check-probe"
BAD_KEY_MESSAGE: Final = "Harp shared key is not valid"
#: Clock difference (seconds) above which the clock check warns.
MAX_SKEW: Final = 30.0

REACH: Final = "nextcloud"
KEY: Final = "shared-key"
CLOCK: Final = "clock"


@dataclass(frozen=True, slots=True)
class Probe:
    """What the exapp-meta request brought back."""

    #: The URL asked (password redacted), for messages.
    url: str
    reply: http.Reply | None
    #: Why there is no reply (``reply is None``).
    error: str = ""
    #: Local wall-clock time (epoch seconds) half-way through the request.
    local_time: float = 0.0
    #: ``/status.php``'s answer, asked only when the first answer was not AppAPI's.
    status_php: http.Reply | None = None


def probe(base_url: str, shared_key: str, app_id: str | None) -> Probe:
    url = base_url + META_PATH + quote(app_id or PROBE_APP, safe="")
    shown = redact_url(url)
    started = time.time()
    try:
        reply = http.get(url, {"harp-shared-key": shared_key, "Accept": "application/json"})
    except http.Unreachable as exc:
        return Probe(shown, None, exc.reason)
    local_time = (started + time.time()) / 2
    status_php = None
    if not is_appapi(reply) and not 300 <= reply.status < 400:
        try:
            status_php = http.get(base_url + "/status.php", {"Accept": "application/json"})
        except http.Unreachable:
            pass
    return Probe(shown, reply, local_time=local_time, status_php=status_php)


def nextcloud_version(reply: http.Reply | None) -> str | None:
    """The version ``/status.php`` states, if the answer is a Nextcloud's."""
    body = _json(reply) if reply is not None and reply.status == 200 else None
    if isinstance(body, dict) and "installed" in body and "versionstring" in body:
        return str(body["versionstring"])
    return None


def _json(reply: http.Reply) -> object:
    try:
        return json.loads(reply.body)
    except ValueError:
        return None


def _is_bad_key_answer(reply: http.Reply) -> bool:
    body = _json(reply)
    return reply.status == 401 and isinstance(body, dict) and "message" in body


def _is_record(reply: http.Reply) -> bool:
    body = _json(reply)
    return reply.status == 200 and isinstance(body, dict) and "exapp_token" in body


def is_appapi(reply: http.Reply | None) -> bool:
    return reply is not None and (_is_record(reply) or _is_bad_key_answer(reply))


def reachable(found: Probe) -> Result:
    """``nextcloud``: reachable, and answering like AppAPI."""
    reply = found.reply
    if reply is None:
        fix = (
            "check NC_INSTANCE_URL and that this machine (or container) can reach it: "
            "DNS, firewall, Docker network"
        )
        if "not trusted" in found.error:
            fix = ("give Nextcloud a certificate this machine trusts, or add its CA to the "
                   "system trust store")
        elif "TLS handshake" in found.error:
            fix = "check the scheme (https:// or http://) and the port in NC_INSTANCE_URL"
        return failed(REACH, f"cannot reach {found.url}: {found.error}", fix)
    if is_appapi(reply):
        return passed(REACH, f"AppAPI answers at {found.url.split('?')[0]}")
    where = f"{found.url.split('?')[0]} answered HTTP {reply.status}"
    if 300 <= reply.status < 400:
        target = reply.headers.get("location", "?")
        return failed(
            REACH, f"{where}, a redirect to {target}",
            "set NC_INSTANCE_URL to the address Nextcloud answers on without redirecting "
            "(often https:// instead of http://); HaRP does not follow redirects",
        )
    if reply.status == 503:
        return failed(REACH, f"{where}: Nextcloud is in maintenance mode or overloaded",
                      "end maintenance (occ maintenance:mode --off) or see Nextcloud's log")
    if reply.status >= 500:
        return failed(REACH, f"{where}: an error inside Nextcloud", "see Nextcloud's log")
    kind = reply.headers.get("content-type", "no content type").split(";")[0]
    version = nextcloud_version(found.status_php)
    if version is not None:
        return failed(
            REACH, f"{where} ({kind}): Nextcloud {version} answers, but not its AppAPI",
            "enable the AppAPI app (occ app:enable app_api); HaRP needs Nextcloud 32 or "
            "newer",
        )
    return failed(
        REACH, f"{where} ({kind}): not a Nextcloud with AppAPI",
        "NC_INSTANCE_URL must be Nextcloud's base URL as HaRP reaches it (no /index.php), "
        "and the AppAPI app (Nextcloud 32 or newer) must be enabled",
    )


def shared_key(found: Probe, app_id: str | None) -> Result:
    """``shared-key``: Nextcloud accepts ``HP_SHARED_KEY`` (for ``app_id``'s daemon)."""
    reply = found.reply
    if reply is None or not is_appapi(reply):
        return skipped(KEY, "not checked: Nextcloud's AppAPI did not answer (see nextcloud)")
    if _is_record(reply):
        return passed(KEY, f"Nextcloud accepts HP_SHARED_KEY (ExApp {app_id!r})")
    if app_id is None:
        return skipped(
            KEY,
            "not confirmed: AppAPI refuses a wrong key and an unknown app alike, so the key "
            "can be confirmed only against an installed ExApp (rerun with --app-id ID)",
        )
    return failed(
        KEY, f"Nextcloud refuses HP_SHARED_KEY for ExApp {app_id!r} (wrong key, or no "
        "such ExApp)",
        "set HP_SHARED_KEY to the key of the deploy daemon the ExApp runs on (Nextcloud: "
        "Administration settings > AppAPI > the daemon), or register the daemon again with "
        "that key; each wrong try counts toward Nextcloud's brute-force throttling",
    )


def clock(found: Probe, max_skew: float = MAX_SKEW) -> Result:
    """``clock``: this machine's clock against the ``Date`` of Nextcloud's answer."""
    reply = found.reply
    if reply is None:
        return skipped(CLOCK, "not checked: no answer from Nextcloud")
    header = reply.headers.get("date", "")
    try:
        remote = email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return skipped(CLOCK, f"not checked: Nextcloud's answer has no usable Date ({header!r})")
    skew = found.local_time - remote
    # Date has whole seconds: up to 1 s of difference is rounding, not skew.
    way = "ahead of" if skew > 0 else "behind"
    if abs(skew) > max_skew:
        return warned(
            CLOCK, f"this machine's clock is {abs(skew):.0f} s {way} Nextcloud's",
            "synchronise both machines' clocks with NTP (chrony, systemd-timesyncd); a "
            "container uses its host's clock",
        )
    return passed(CLOCK, f"within {max(abs(skew), 1.0):.0f} s of Nextcloud's")
