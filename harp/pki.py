"""The FRP certificate authority: generated once, never overwritten.

frpc clients (ExApps and remote Docker engines) and HaRP's FRP server authenticate
each other with mutual TLS under a private CA (docs/compatibility.md#frp-certificates).  The file
names, subjects and SANs are part of the compatibility surface: ExApp images and
remote-engine setups copy ``ca.crt``/``client.crt``/``client.key`` and pin
``serverName = "harp.nc"``.

The set is generated when ``$HP_CERTS_DIR/frp`` is missing or empty (the reference
left an empty directory without certs, a pitfall).  An existing complete set is never
touched, so certificates already installed into ExApp containers stay valid across
restarts.  A partial set stops start-up: silently regenerating would break every
client that holds the old CA.

Several replicas may start together on one shared, empty directory (docs/k8s-notes).
Generation therefore happens under an exclusive ``flock`` on ``.harp-pki.lock`` in the
directory: the winner writes the whole set under temporary names in a private
sub-directory and only then renames each file into place (``ca.crt`` last); every other
replica waits for the lock and then finds the winner's complete set.  Without the lock,
two replicas interleaved their files and left a CA, certificates and keys that did not
match ("key values mismatch") — permanently, since an existing set is never replaced.
A set that is already complete is used without taking the lock, so a read-only mount of
a finished set keeps working.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME: Final = "harp.nc"
SERVER_NAME: Final = "harp.nc"
CLIENT_NAME: Final = "harp.client.nc"

# The file names of the set: part of the compatibility surface (see above), so every
# module that reads or copies one uses these constants instead of spelling it.
CA_CRT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_CRT: Final = "server.crt"
SERVER_KEY: Final = "server.key"
CLIENT_CRT: Final = "client.crt"
CLIENT_KEY: Final = "client.key"
FILES: Final = (CA_CRT, CA_KEY, SERVER_CRT, SERVER_KEY, CLIENT_CRT, CLIENT_KEY)
#: What an frpc client needs for mutual TLS (copied to ExApps and remote engines).
CLIENT_FILES: Final = (CA_CRT, CLIENT_CRT, CLIENT_KEY)
#: Our own bookkeeping in the directory; ignored when deciding whether it is empty.
LOCK_NAME: Final = ".harp-pki.lock"
STAGING_PREFIX: Final = ".harp-pki-new."
#: How long a replica waits for another one to finish generating (seconds).
LOCK_TIMEOUT: Final = 120.0


class CertificateError(Exception):
    """The certificate directory cannot be used; the message says why and how to fix it."""


def ensure_frp_certificates(directory: Path, validity_days: int) -> bool:
    """Make sure a complete FRP PKI exists in ``directory``; return True if generated."""
    if directory.exists() and not directory.is_dir():
        raise CertificateError(f"{directory} exists but is not a directory")
    if _is_complete(directory):
        return False  # the common case; needs no lock and no write access
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / LOCK_NAME):
            # Another replica may have generated the set while we waited for the lock.
            if _is_complete(directory):
                return False
            _refuse_foreign_content(directory)
            _discard_staging(directory)
            _generate(directory, validity_days)
    except OSError as exc:
        raise CertificateError(
            f"cannot write FRP certificates to {directory}: {exc.strerror or exc}"
        ) from None
    return True


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES)


def _refuse_foreign_content(directory: Path) -> None:
    """A partial set, or files we did not write, must not be silently replaced."""
    present = [name for name in FILES if (directory / name).exists()]
    others = [
        entry.name for entry in directory.iterdir()
        if entry.name != LOCK_NAME and not entry.name.startswith(STAGING_PREFIX)
    ]
    if present or others:
        missing = ", ".join(name for name in FILES if name not in present)
        raise CertificateError(
            f"{directory} holds an incomplete FRP certificate set (missing: {missing}); "
            "restore the missing files, or empty the directory to generate a new set "
            "(then re-copy the client files to remote engines and re-install ExApps)"
        )


def _discard_staging(directory: Path) -> None:
    """Remove what a replica that crashed mid-generation left (we hold the lock)."""
    for entry in directory.iterdir():
        if entry.name.startswith(STAGING_PREFIX):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def _exclusive(lock_path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created 0600, never removed).

    The file stays: removing a lock file that others may be waiting on would let two
    processes lock two different files of the same name.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise CertificateError(
                        f"{lock_path} is still locked after {timeout:g}s: another HaRP "
                        "is generating the FRP certificates or hangs; retry or remove it"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # also releases the lock


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _generate(directory: Path, days: int) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    until = now + datetime.timedelta(days=days)

    ca_key = _new_key()
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_NAME))
        .issuer_name(_name(CA_NAME))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier) -> tuple[bytes, bytes]:
        key = _new_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return _cert_pem(cert), _key_pem(key)

    server_crt, server_key = leaf(SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH)
    client_crt, client_key = leaf(CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH)
    _publish(directory, [
        (CA_KEY, _key_pem(ca_key), 0o600),
        (SERVER_KEY, server_key, 0o600),
        (CLIENT_KEY, client_key, 0o600),
        (SERVER_CRT, server_crt, 0o644),
        (CLIENT_CRT, client_crt, 0o644),
        (CA_CRT, _cert_pem(ca_cert), 0o644),
    ])


def _publish(directory: Path, files: list[tuple[str, bytes, int]]) -> None:
    """Write every file to a staging folder first, then rename them into ``directory``.

    Keys first and the CA certificate last: a crash mid-way leaves a set that is
    reported as incomplete rather than one that looks whole but does not match.
    """
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        for name, data, mode in files:
            write_atomic(staging / name, data, mode)
        for name, _, _ in files:
            os.replace(staging / name, directory / name)
        _fsync_directory(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_directory(directory: Path) -> None:
    """Make the renames durable before other replicas rely on them."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the renames stand anyway
    finally:
        os.close(fd)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or the whole file.

    The temporary file is created with ``mode`` from the start, so a private key is
    never readable by others, not even for an instant.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
