"""Files in and out of a container through the Engine archive API, stopped or not.

``install_certificates`` must put every file in place *before* a stopped ExApp container
runs for the first time: its entrypoint decides once, at start,
whether frpc uses TLS, by looking for ``/certs/frp``.  ``GET /containers/{id}/archive``
(and ``PUT``, for writing) work on stopped containers, so HaRP learns the image's OS from
``/etc/os-release`` without starting it; ``exec`` would need it running.

The engine archives a symlink as the link itself (like ``docker cp`` without ``-L``), and
``/etc/os-release`` is a link to ``../usr/lib/os-release`` on Debian and others, so a few
link hops are followed here.  Files go in as one uncompressed tar (:func:`tar_of`).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from harp.docker.client import Deadline, EngineClient, unexpected_status
from harp.logs import HarpLogger

log = HarpLogger("harp.docker")

MAX_LINK_HOPS: Final = 4
#: Largest archive read back (os-release is a few hundred bytes).
READ_LIMIT: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class TarEntry:
    """The first entry of an archive: a regular file's bytes or a symlink's target."""

    data: bytes | None = None
    link: str | None = None


def first_entry(archive: bytes) -> TarEntry | None:
    """What the engine's archive of one path holds (None: no file, or not a tar)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            member = tar.next()
            if member is None:
                return None
            if member.issym():
                return TarEntry(link=member.linkname)
            if not member.isfile():
                return None
            handle = tar.extractfile(member)
            return None if handle is None else TarEntry(data=handle.read())
    except (tarfile.TarError, OSError):
        return None


def resolve_link(path: str, link: str) -> str:
    """The absolute path a symlink at ``path`` pointing to ``link`` names."""
    target = link if link.startswith("/") else posixpath.join(posixpath.dirname(path), link)
    return posixpath.normpath(target)


def tar_of(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar of ``files`` (paths relative to ``/``), mode 0644, owner root.

    0644 as in the reference: ExApps that run as a non-root user must read the FRP
    client key to connect back to HaRP.  The engine creates missing parent folders.
    """
    out = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = now
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def read_file(
    engine: EngineClient, container: str, path: str, deadline: Deadline
) -> bytes | None:
    """The bytes of ``path`` in ``container`` (running or not), or None if unreadable."""
    for _ in range(MAX_LINK_HOPS + 1):
        reply = await engine.call(
            b"GET", f"/containers/{container}/archive", deadline,
            query=b"path=" + quote(path, safe="").encode("ascii"), limit=READ_LIMIT,
        )
        if reply.status != 200:
            return None
        entry = first_entry(reply.body)
        if entry is None:
            return None
        if entry.link is None:
            return entry.data
        path = resolve_link(path, entry.link)
    return None


async def write_files(
    engine: EngineClient, container: str, files: dict[str, bytes], deadline: Deadline
) -> None:
    """Put ``files`` (paths relative to ``/``) into ``container``, running or not."""
    reply = await engine.call(
        b"PUT", f"/containers/{container}/archive", deadline, query=b"path=%2F",
        data=tar_of(files), content_type=b"application/x-tar",
    )
    if reply.status != 200:
        log.warn("{name}: archive upload failed: {status} {error}", name=container,
                 status=reply.status, error=reply.text())
        raise unexpected_status("Failed to upload archive", reply.status)
