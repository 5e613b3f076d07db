"""Certificate checks: present, key matching certificate, issued by the CA, not near expiry.

Two sets, both under ``HP_CERTS_DIR`` (docs/operations.md#python--m-harp-check):

* ``cert.pem``: the HTTPS frontend's chain and private key in one PEM file, as the daemon
  loads it (:mod:`harp.tlsctx`); absent means the HTTPS frontend is off, which is a valid
  choice, so the check is skipped.
* ``frp/``: the FRP PKI :mod:`harp.pki` generated.  HaRP never renews or replaces it (every
  frpc holds a copy), so the check warns long before it expires.

The judging functions take bytes and "now" and do no I/O, so they are unit-tested with
generated certificates; only :func:`https_certificate` and :func:`frp_certificates` read files.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from harp import pki
from harp.check.result import Result, failed, passed, skipped, warned

#: Warn when a certificate has fewer days left than this.
WARN_DAYS: Final = 30

HTTPS: Final = "https-cert"
FRP: Final = "frp-certs"

_HTTPS_RENEW = (
    "renew cert.pem (chain and key in one PEM file) and send HaRP SIGHUP: it reloads "
    "the certificate without dropping connections"
)
_FRP_RENEW = (
    "HaRP never replaces the FRP set: move the files out of the directory, restart HaRP "
    "to generate a new set, then copy ca.crt, client.crt, client.key to every remote "
    "engine's frpc again (python -m harp frpc-config engine --out DIR) and re-enable ExApps"
)


class _Unusable(Exception):
    """A file cannot be used; the message names it and says why."""


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _certificates(data: bytes, label: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise _Unusable(f"{label} holds no PEM certificate")
    return certs


def _private_key(data: bytes, label: str) -> PrivateKeyTypes:
    """The (first) private key of a PEM file; certificates around it are skipped."""
    if b"PRIVATE KEY-----" not in data:
        raise _Unusable(f"{label} holds no PEM private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise _Unusable(f"{label}: the private key cannot be read ({exc})") from None


def _require_match(cert: x509.Certificate, key: PrivateKeyTypes, label: str) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise _Unusable(f"{label}: the private key does not belong to the certificate")


def _validity(
    name: str, subject: str, cert: x509.Certificate, now: datetime.datetime, renew: str
) -> Result:
    """PASS with the expiry date, WARN within :data:`WARN_DAYS`, FAIL when not valid now."""
    until = cert.not_valid_after_utc
    if cert.not_valid_before_utc > now:
        return failed(
            name, f"{subject} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
            "check this machine's clock, or " + renew,
        )
    if until <= now:
        return failed(name, f"{subject} expired on {until:%Y-%m-%d}", renew)
    days = (until - now).days
    if days < WARN_DAYS:
        return warned(name, f"{subject} expires in {days} days ({until:%Y-%m-%d})", renew)
    return passed(name, f"{subject} valid until {until:%Y-%m-%d} ({days} days)")


def judge_https_pem(data: bytes, label: str, now: datetime.datetime) -> Result:
    """The HTTPS ``cert.pem`` (chain then key, in any order) judged at ``now``."""
    try:
        certs = _certificates(data, label)
        _require_match(certs[0], _private_key(data, label), label)
    except _Unusable as exc:
        return failed(HTTPS, str(exc), _HTTPS_RENEW.replace("renew", "fix", 1))
    return _validity(HTTPS, label, certs[0], now, _HTTPS_RENEW)


def https_certificate(path: Path, now: datetime.datetime) -> Result:
    if not path.exists():
        return skipped(
            HTTPS, f"{path} does not exist: the HTTPS frontend is off (HTTP only)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        return failed(HTTPS, f"{path} cannot be read ({exc.strerror})",
                      "make it readable by the user HaRP runs as")
    return judge_https_pem(data, str(path), now)


def judge_frp_set(files: dict[str, bytes], directory: str, now: datetime.datetime) -> Result:
    """The FRP PKI (``pki.FILES`` name → contents) judged at ``now``."""
    missing = [name for name in pki.FILES if name not in files]
    if len(missing) == len(pki.FILES):
        return failed(
            FRP, f"no FRP certificates in {directory}",
            "start HaRP once with this HP_CERTS_DIR (it generates them), or mount the "
            "volume that holds them",
        )
    if missing:
        return failed(
            FRP, f"{directory} is incomplete (missing: {', '.join(missing)})",
            "restore the missing files from a backup; " + _FRP_RENEW,
        )
    try:
        ca = _certificates(files[pki.CA_CRT], pki.CA_CRT)[0]
        certs = {pki.CA_CRT: ca}
        for crt, key in ((pki.CA_CRT, pki.CA_KEY), (pki.SERVER_CRT, pki.SERVER_KEY),
                         (pki.CLIENT_CRT, pki.CLIENT_KEY)):
            cert = _certificates(files[crt], crt)[0]
            _require_match(cert, _private_key(files[key], key), f"{key} and {crt}")
            if crt != pki.CA_CRT:
                try:
                    cert.verify_directly_issued_by(ca)
                except (InvalidSignature, ValueError, TypeError) as exc:
                    raise _Unusable(f"{crt} was not issued by this {pki.CA_CRT} "
                                    f"({type(exc).__name__})") from None
            certs[crt] = cert
    except _Unusable as exc:
        return failed(FRP, f"{directory}: {exc}", _FRP_RENEW)
    name, soonest = min(certs.items(), key=lambda item: item[1].not_valid_after_utc)
    result = _validity(FRP, f"{directory}/{name}", soonest, now, _FRP_RENEW)
    if result.status.ok:
        return passed(FRP, f"{directory}: CA, server and client match; {result.detail}")
    return result


def frp_certificates(directory: Path, disabled: bool, now: datetime.datetime) -> Result:
    if disabled:
        return skipped(FRP, "HP_FRP_DISABLE_TLS is true: FRP runs without certificates")
    files: dict[str, bytes] = {}
    for name in pki.FILES:
        try:
            files[name] = (directory / name).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return failed(FRP, f"{directory / name} cannot be read ({exc.strerror})",
                          "make it readable by the user HaRP runs as")
    return judge_frp_set(files, str(directory), now)
