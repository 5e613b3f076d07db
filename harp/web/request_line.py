"""An HTTP/1.x request line, checked as twisted.web checks it, without a loop per byte.

Why: twisted.web's parser checks the method with a Python loop over its bytes and the
request-target with another (``for c in target``), ≈ 1.5 % of a small request
(docs/performance.md).  The same rules hold here, each as one C-level pass: the line is
three parts split on single spaces, the method a token (RFC 9110 §5.6.2), the target
non-empty and made of bytes 33 to 176 only (twisted.web's bound, kept so that both parsers
agree; HaRP's own target check, harp/web/target.py, is stricter anyway), the version
``HTTP/1.1`` or ``HTTP/1.0``.  The one-pass head parser uses this, the line-by-line path
twisted.web's own, and tests/unit/test_channel_fuzz.py requires both to agree.
"""

from __future__ import annotations

from typing import Final

#: The characters of a token (RFC 9110 §5.6.2).
_TCHAR: Final = (
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
#: Bytes twisted.web accepts in a request-target.
_TARGET_BYTES: Final = bytes(range(33, 177))
_VERSIONS: Final = frozenset({b"HTTP/1.1", b"HTTP/1.0"})


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """``(method, target, version)``; ValueError when malformed."""
    method, target, version = line.split(b" ")
    if not method or method.translate(None, _TCHAR):
        raise ValueError("Invalid method")
    if not target or target.translate(None, _TARGET_BYTES):
        raise ValueError("Invalid request-target")
    if version not in _VERSIONS:
        raise ValueError("Invalid version")
    return method, target, version
