"""The head of a relayed response, as the bytes to send (HTTP/1.x).

Pure, no I/O: the request's first ``write`` (:meth:`harp.web.site.HarpRequest.write`)
hands over what twisted.web's ``Request`` knows and sends the result in one write,
together with the first piece of the body.  A module of its own so that it is compiled
(harp/compiled.py): it runs once per proxied response, and the request it serves is a
twisted.web subclass that stays interpreted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from harp.web.headers import http_date


def relayed_head(
    version: bytes,
    code: int,
    message: bytes,
    lines: bytes,
    names: frozenset[bytes],
    own: Iterable[tuple[bytes, Sequence[bytes]]],
    cookies: Sequence[bytes],
    bodiless: bool,
    data: bytes,
) -> tuple[bytes, bool]:
    """(the head followed by ``data`` as it goes on the wire, whether the body is chunked).

    ``lines``/``names``: the upstream's end-to-end header lines and their lower-case names
    (harp/web/response_head.py already refused bad names and values).  ``own``: HaRP's
    own response headers (``Connection: close``...), left out where the upstream sent the
    same name; a ``Date`` is added only when the upstream sent none.  ``bodiless`` (a
    ``HEAD`` request, 204, 304): the head alone, ``data`` is dropped as twisted.web does.
    Without a length an HTTP/1.1 answer is chunked, so that the connection stays usable.
    """
    head = [version, b" %d " % code, message, b"\r\n"]
    if b"date" not in names:
        head += (b"Date: ", http_date(), b"\r\n")
    own_length = False
    for name, values in own:
        lower = name.lower()
        if lower in names:
            continue
        if lower == b"content-length":
            own_length = True
        for value in values:
            head += (name, b": ", value, b"\r\n")
    head.append(lines)
    for cookie in cookies:
        head += (b"Set-Cookie: ", cookie, b"\r\n")
    if bodiless:
        head.append(b"\r\n")
        return b"".join(head), False
    chunked = version == b"HTTP/1.1" and b"content-length" not in names and not own_length
    if chunked:
        head.append(b"transfer-encoding: chunked\r\n\r\n")
        if data:
            head += (b"%x\r\n" % len(data), data, b"\r\n")
    else:
        head += (b"\r\n", data)
    return b"".join(head), chunked
