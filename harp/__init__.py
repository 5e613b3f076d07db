"""HaRP: the AppAPI reverse proxy for Nextcloud ExApps, as one Twisted process.

The version is reported by ``GET /exapps/app_api/info``.  AppAPI 33+ refuses HaRP
releases older than 0.3.0 and image clean-up needs 0.4.1, so it must stay a full
semver string at or above the reference release we are wire-compatible with.
"""

__version__ = "0.5.0"
