"""Reading files out of a container through the Engine archive API, stopped or not.

``install_certificates`` must put every file in place *before* a stopped ExApp container
runs for the first time (hardening hole 14): its entrypoint decides once, at start,
whether frpc uses TLS, by looking for ``/certs/frp``.  ``GET /containers/{id}/archive``
(and ``PUT``, for writing) work on stopped containers, so HaRP learns the image's OS from
``/etc/os-release`` without starting it; ``exec`` would need it running.

The engine archives a symlink as the link itself (like ``docker cp`` without ``-L``), and
``/etc/os-release`` is a link to ``../usr/lib/os-release`` on Debian and others, so a few
link hops are followed here.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from harp.docker.engines import Deadline, EngineClient

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
