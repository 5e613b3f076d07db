"""Fixtures for every suite: the real ``twistd harp`` process under test, frpc, certificates.

The peers themselves (HaRP included) live in ``tests/peers/``; this file only turns them
into pytest fixtures and says what to do when one is missing.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.peers.base import REPO, free_port
from tests.peers.harp import HarpProcess, base_env, new_key, run_harp_once

REQUIRE_PEERS = os.environ.get("HARP_REQUIRE_PEERS") == "1"

# Re-exported: test modules import the HaRP peer from here (``from tests.conftest import
# HarpProcess, base_env``); its home is tests/peers/harp.py.
__all__ = [
    "REPO", "REQUIRE_PEERS", "HarpProcess", "base_env", "free_port", "new_key", "peer_missing",
    "run_harp_once", "self_signed_pem",
]


def peer_missing(what: str) -> None:
    """A peer program is not available: fail in CI (HARP_REQUIRE_PEERS=1), else skip."""
    if REQUIRE_PEERS:
        pytest.fail(f"required test peer missing: {what}")
    pytest.skip(f"test peer missing: {what}")


@pytest.fixture
def harp_env(tmp_path: Path) -> dict[str, str]:
    """A minimal valid environment on free loopback ports, certs under tmp_path."""
    return base_env(tmp_path)


@pytest.fixture(scope="session")
def frpc_binary() -> str:
    """The real frpc 0.65 (tools/get-frpc); missing -> skip locally, fail in CI."""
    from tests.peers.frpc import FrpcUnavailable, find_frpc

    try:
        return find_frpc()
    except FrpcUnavailable as exc:
        peer_missing(f"frpc: {exc}")
        raise AssertionError("unreachable") from exc


@pytest.fixture
def harp_factory(tmp_path: Path) -> Iterator[type[HarpProcess]]:
    """Start HaRP processes; all are stopped at the end of the test."""
    started: list[HarpProcess] = []

    class Factory(HarpProcess):
        def __init__(self, env: Mapping[str, str]) -> None:
            super().__init__(env, tmp_path)
            started.append(self)

    yield Factory
    for proc in started:
        proc.stop()


def self_signed_pem(path: Path, common_name: str, days: float = 1) -> int:
    """Write a self-signed cert + key PEM (like an operator's cert.pem), valid for
    ``days``; its serial."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(serial)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return serial
