"""FRP's token-derived keys: the login auth key and the AES-128-CFB stream cipher.

Control stream encryption (docs/compatibility.md#frp-encryption).  Everything on the control stream
after ``Login`` (client to server) and after ``LoginResp`` (server to client) is
encrypted; the same scheme optionally protects a work connection's tunnelled
bytes when its proxy has ``use_encryption``.

* Key: ``PBKDF2-HMAC-SHA1(password=token, salt=b"frp", iterations=64,
  length=16)``.  The salt is ``"frp"`` because frpc/frps override golib's
  default (``"crypto"``).  HaRP runs with no ``auth.token``, so in practice the
  key is derived from the empty string -- the cipher gives frp compatibility,
  not secrecy; TLS is what protects HaRP's tunnels.
* Each direction is an independent stream: the writer sends 16 random IV bytes
  in clear just before its first ciphertext byte, then one CFB-128 state runs
  across all later writes -- no per-message IV, MAC or padding.  The reader
  takes the first 16 bytes it sees as the peer's IV.  Hence
  :class:`StreamEncryptor` and :class:`StreamDecryptor` are stateful objects fed
  arbitrary chunks, and a client that never sends anything on its control
  stream never sends its IV either (the decryptor must not be waited on).

Not supported: **snappy compression** (``use_compression`` on a work
connection, layered *inside* the AES stream).  HaRP's clients never enable it;
the control logic is expected to reject a ``NewProxy`` with
``use_compression`` rather than tunnel bytes it cannot frame.

The CFB mode moved to ``cryptography.hazmat.decrepit`` (it is deprecated for
new designs); we import it from there when available, because the wire format
is fixed by frp, not chosen by us.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - cryptography < 43
    from cryptography.hazmat.primitives.ciphers.modes import CFB

__all__ = [
    "IV_LEN",
    "KEY_LEN",
    "PBKDF2_ITERATIONS",
    "PBKDF2_SALT",
    "StreamDecryptor",
    "StreamEncryptor",
    "auth_key",
    "derive_key",
    "verify_auth_key",
]

PBKDF2_SALT: Final = b"frp"
PBKDF2_ITERATIONS: Final = 64
KEY_LEN: Final = 16
"""AES-128."""
IV_LEN: Final = 16
"""One AES block, sent in clear at the start of each direction."""


def _token_bytes(token: str | bytes) -> bytes:
    return token.encode("utf-8") if isinstance(token, str) else token


def derive_key(token: str | bytes) -> bytes:
    """The 16-byte AES key frp derives from ``auth.token`` (``""`` for HaRP).

    Deterministic and cheap (64 iterations), but callers should still derive
    once per server and share the result rather than per connection.
    """
    kdf = PBKDF2HMAC(
        algorithm=hashes.SHA1(),  # noqa: S303 - fixed by the frp wire format
        length=KEY_LEN,
        salt=PBKDF2_SALT,
        iterations=PBKDF2_ITERATIONS,
    )
    return kdf.derive(_token_bytes(token))


def auth_key(token: str | bytes, timestamp: int) -> str:
    """``privilege_key`` of Login/NewWorkConn/Ping: hex MD5 of token + decimal timestamp.

    Not a secure MAC (MD5, no freshness check in frps), but it is what frpc
    computes; with HaRP's empty token it only proves the client speaks frp.
    """
    digest = hashlib.md5(  # fixed by the frp wire format; not a security use
        _token_bytes(token) + str(timestamp).encode("ascii"), usedforsecurity=False
    )
    return digest.hexdigest()


def verify_auth_key(token: str | bytes, timestamp: int, privilege_key: str) -> bool:
    """Constant-time check of a client's ``privilege_key``, as frps does."""
    expected = auth_key(token, timestamp).encode("ascii")
    return hmac.compare_digest(expected, privilege_key.encode("utf-8", "replace"))


class StreamEncryptor:
    """Writer side of one direction: plaintext chunks in, wire bytes out.

    The first non-empty :meth:`encrypt` output starts with the IV, mirroring
    frp's lazy IV write (an empty call emits nothing, so nothing reaches the
    wire until there is something to say).  Chunk boundaries do not matter:
    ``encrypt(a) + encrypt(b) == encrypt(a + b)``.
    """

    def __init__(self, key: bytes, iv: bytes | None = None) -> None:
        """*iv* defaults to 16 random bytes; pass one only for test vectors."""
        if len(key) != KEY_LEN:
            raise ValueError(f"key must be {KEY_LEN} bytes")
        if iv is None:
            iv = os.urandom(IV_LEN)
        elif len(iv) != IV_LEN:
            raise ValueError(f"iv must be {IV_LEN} bytes")
        self._pending_iv: bytes | None = iv
        self._ctx = Cipher(algorithms.AES(key), CFB(iv)).encryptor()

    @property
    def iv_sent(self) -> bool:
        """Whether the IV has already been emitted."""
        return self._pending_iv is None

    def encrypt(self, data: bytes) -> bytes:
        """Encrypt the next chunk of this direction's plaintext."""
        if not data:
            return b""
        out = self._ctx.update(data)
        if self._pending_iv is not None:
            out = self._pending_iv + out
            self._pending_iv = None
        return out


class StreamDecryptor:
    """Reader side of one direction: wire chunks in, plaintext out.

    Buffers until the peer's 16-byte IV is complete (it may arrive split, or
    glued to the first ciphertext), then decrypts everything after it with one
    continuing CFB state, so any chunking of the wire bytes yields the same
    plaintext.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"key must be {KEY_LEN} bytes")
        self._key = key
        self._iv_buffer = b""
        self._decryptor: CipherContext | None = None  # set once the IV is known

    @property
    def iv_received(self) -> bool:
        """Whether the peer's IV has been fully received."""
        return self._decryptor is not None

    def decrypt(self, data: bytes) -> bytes:
        """Decrypt the next chunk of wire bytes (IV first, then ciphertext)."""
        if self._decryptor is None:
            self._iv_buffer += data
            if len(self._iv_buffer) < IV_LEN:
                return b""
            iv, data = self._iv_buffer[:IV_LEN], self._iv_buffer[IV_LEN:]
            self._iv_buffer = b""
            self._decryptor = Cipher(algorithms.AES(self._key), CFB(iv)).decryptor()
        if not data:
            return b""
        return self._decryptor.update(data)
