"""What ``/docker/exapp/install_certificates`` puts into an ExApp container, and where.

Two sets of files (docs/compatibility.md#docker-lifecycle-endpoints): the PEM certificates
of AppAPI's system CA bundle, into the directory the container's OS reads its trust anchors
from, and HaRP's FRP client certificates into ``/certs/frp``, where the ExApp's frpc looks
for them at its first start (which is why they go in before the container ever runs).
Deciding *which* files go *where* is done here, without the engine (only HaRP's own FRP
files are read from disk); copying them in and running the CA update is
:mod:`harp.docker.lifecycle`'s part.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from harp.pki import CLIENT_FILES

#: HaRP's FRP client certificate files, under ``$HP_CERTS_DIR/frp`` on HaRP and
#: ``/certs/frp`` in the ExApp (their names are spelled once, in harp.pki).
FRP_CLIENT_FILES: Final = CLIENT_FILES
#: Where the ExApp's frpc expects them, relative to the container's ``/``.
FRP_CERTS_TARGET: Final = "certs/frp"

_DEBIAN_LIKE: Final = ("alpine", "debian", "ubuntu")
_RHEL_LIKE: Final = ("centos", "almalinux", "rhel", "fedora")
_PEM_RE: Final = re.compile(
    r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def bundle_certificates(bundle: str | None) -> list[str]:
    """The PEM certificates in AppAPI's ``system_certs_bundle`` (none for None or "")."""
    return _PEM_RE.findall(bundle or "")


def ca_target(os_release: str) -> tuple[str | None, list[str]]:
    """Where system CA PEMs go and how they are activated, by ``/etc/os-release`` text."""
    text = os_release.lower()
    if any(name in text for name in _DEBIAN_LIKE):
        return "/usr/local/share/ca-certificates", ["update-ca-certificates"]
    if any(name in text for name in _RHEL_LIKE):
        return "/etc/pki/ca-trust/source/anchors", ["update-ca-trust", "extract"]
    return None, []


def ca_files(target: str, pems: list[str]) -> dict[str, bytes]:
    """One ``custom_ca_cert_<i>.crt`` per PEM in ``target`` (paths relative to ``/``)."""
    return {
        f"{target.lstrip('/')}/custom_ca_cert_{i}.crt": pem.encode() + b"\n"
        for i, pem in enumerate(pems)
    }


def frp_client_files(frp_certs_dir: Path | None) -> dict[str, bytes] | None:
    """``$HP_CERTS_DIR/frp/{ca.crt,client.crt,client.key}``, all or nothing."""
    if frp_certs_dir is None:
        return None
    files: dict[str, bytes] = {}
    for file_name in FRP_CLIENT_FILES:
        try:
            files[f"{FRP_CERTS_TARGET}/{file_name}"] = (frp_certs_dir / file_name).read_bytes()
        except OSError:
            return None
    return files
