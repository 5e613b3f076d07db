"""FRP PKI generation under concurrency (docs/security.md#pki) and its bookkeeping files."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from harp.pki import FILES, LOCK_NAME, STAGING_PREFIX, CertificateError, ensure_frp_certificates


def _generate_after(barrier: object, directory: str, results: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        generated = ensure_frp_certificates(Path(directory), 1)
        results.put(("ok", generated))  # type: ignore[attr-defined]
    except CertificateError as exc:
        results.put(("error", str(exc)))  # type: ignore[attr-defined]


def _verify_set(frp: Path) -> None:
    ca = x509.load_pem_x509_certificate((frp / "ca.crt").read_bytes())
    for stem in ("ca", "server", "client"):
        cert = x509.load_pem_x509_certificate((frp / f"{stem}.crt").read_bytes())
        key = serialization.load_pem_private_key((frp / f"{stem}.key").read_bytes(), None)
        assert key.public_key().public_numbers() == (  # type: ignore[union-attr]
            cert.public_key().public_numbers()  # type: ignore[union-attr]
        ), f"{stem}.key does not match {stem}.crt"
        cert.verify_directly_issued_by(ca)


def test_replicas_racing_on_an_empty_directory_share_one_set(tmp_path: Path) -> None:
    """Eight processes released at once: one generates, the others use its set."""
    frp = tmp_path / "frp"
    ctx = multiprocessing.get_context("fork")
    count = 8
    barrier = ctx.Barrier(count)
    results = ctx.Queue()
    procs = [ctx.Process(target=_generate_after, args=(barrier, str(frp), results))
             for _ in range(count)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert [kind for kind, _ in outcomes] == ["ok"] * count, outcomes
    assert sum(1 for _, generated in outcomes if generated) == 1, outcomes
    _verify_set(frp)
    assert not [n for n in os.listdir(frp) if n.startswith(STAGING_PREFIX)]


def test_lock_file_and_stale_staging_do_not_make_it_non_empty(tmp_path: Path) -> None:
    frp = tmp_path / "frp"
    frp.mkdir()
    (frp / LOCK_NAME).touch()
    stale = frp / f"{STAGING_PREFIX}crashed"
    stale.mkdir()
    (stale / "ca.key").write_bytes(b"half")
    assert ensure_frp_certificates(frp, 1) is True
    _verify_set(frp)
    assert sorted(os.listdir(frp)) == sorted([*FILES, LOCK_NAME])
    assert (frp / "ca.key").stat().st_mode & 0o777 == 0o600
    assert ensure_frp_certificates(frp, 1) is False


def test_partial_set_still_refused(tmp_path: Path) -> None:
    frp = tmp_path / "frp"
    ensure_frp_certificates(frp, 1)
    (frp / "server.key").unlink()
    with pytest.raises(CertificateError, match=r"missing: server\.key"):
        ensure_frp_certificates(frp, 1)


def test_foreign_file_still_refused(tmp_path: Path) -> None:
    frp = tmp_path / "frp"
    frp.mkdir()
    (frp / "notes.txt").write_text("x")
    with pytest.raises(CertificateError, match="incomplete"):
        ensure_frp_certificates(frp, 1)


def test_complete_set_needs_no_lock_file(tmp_path: Path) -> None:
    frp = tmp_path / "frp"
    ensure_frp_certificates(frp, 1)
    (frp / LOCK_NAME).unlink()
    assert ensure_frp_certificates(frp, 1) is False
    assert not (frp / LOCK_NAME).exists()
