"""Chunked transfer coding with a bound on the chunk size, for both directions.

Why: twisted.web's decoder accepts any chunk size, however absurd.  A size past a
signed 64-bit offset (nginx's limit too) is a framing attack, not a body: in a request
it is how a smuggled second request hides, and from an upstream it announces a body no
client could ever take whole.  :class:`BoundedChunkedDecoder` refuses it with the same
error as any malformed chunk size, so each caller's existing handling applies: the
request is dropped (docs/security.md, request framing), the upstream's answer is a bad
response.
"""

from __future__ import annotations

from typing import Final

from twisted.web.http import _ChunkedTransferDecoder, _MalformedChunkedDataError

#: Largest chunk size accepted (as nginx: a signed 64-bit offset).
MAX_CHUNK: Final = (1 << 63) - 1


class BoundedChunkedDecoder(_ChunkedTransferDecoder):
    """Twisted's chunked decoder, refusing chunk sizes above :data:`MAX_CHUNK`."""

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        done: bool = super()._dataReceived_CHUNK_LENGTH()
        if done and self.length > MAX_CHUNK:
            raise _MalformedChunkedDataError("chunk size too large")
        return done
