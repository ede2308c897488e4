"""`taxonedge keygen` and bundle signatures: keys on disk, accept/reject, and private keys never leaking."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from taxonedge.edge.kernel.bundle import BundleError, read_bundle
from taxonedge.edge.kernel.signing import (
    SigningKeyError,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify,
)

from .conftest import run_cli
from .tinymodels import tiny_bundle_bytes


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path):
    proc = run_cli("keygen", "--out", str(tmp_path / "build"))
    private, public = tmp_path / "build.key", tmp_path / "build.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert key_id(load_public_key(public)) == key_id(key.public_key())
    assert key_id(key.public_key()) in proc.stdout
    assert b"PRIVATE" not in public.read_bytes()
    # The private key is never printed.
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert raw.hex() not in proc.stdout and "PRIVATE KEY" not in proc.stdout + proc.stderr


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    run_cli("keygen", "--out", str(tmp_path / "k"))
    before = (tmp_path / "k.key").read_bytes()
    proc = run_cli("keygen", "--out", str(tmp_path / "k"), check=False)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert (tmp_path / "k.key").read_bytes() == before
    run_cli("keygen", "--out", str(tmp_path / "k"), "--force")
    assert (tmp_path / "k.key").read_bytes() != before


def test_sign_and_verify_reject_other_keys_and_other_data(tmp_path):
    run_cli("keygen", "--out", str(tmp_path / "a"))
    run_cli("keygen", "--out", str(tmp_path / "b"))
    a, b = load_private_key(tmp_path / "a.key"), load_public_key(tmp_path / "b.pub")
    signature = sign(a, b"manifest bytes")
    assert verify(a.public_key(), signature, b"manifest bytes")
    assert not verify(a.public_key(), signature, b"manifest byteS")
    assert not verify(b, signature, b"manifest bytes")


def test_wrong_key_files_are_named(tmp_path):
    (tmp_path / "junk.pub").write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(SigningKeyError, match="junk.pub"):
        load_public_key(tmp_path / "junk.pub")
    run_cli("keygen", "--out", str(tmp_path / "k"))
    with pytest.raises(SigningKeyError, match="not a readable unencrypted PEM private key"):
        load_private_key(tmp_path / "k.pub")  # a public key where the private one is expected


def test_signed_bundle_accepts_its_key_and_rejects_another(tmp_path):
    run_cli("keygen", "--out", str(tmp_path / "good"))
    run_cli("keygen", "--out", str(tmp_path / "evil"))
    good = load_private_key(tmp_path / "good.key")
    data = tiny_bundle_bytes(sign_key=good)
    bundle = read_bundle(data, public_key=load_public_key(tmp_path / "good.pub"))
    assert bundle.signature_status == "valid" and bundle.manifest.signing_key_id == key_id(good.public_key())
    with pytest.raises(BundleError, match="does not verify"):
        read_bundle(data, public_key=load_public_key(tmp_path / "evil.pub"))
    # A device that requires signatures refuses an unsigned bundle.
    with pytest.raises(BundleError, match="unsigned"):
        read_bundle(tiny_bundle_bytes(), public_key=load_public_key(tmp_path / "good.pub"))
    # The private key is in no file of the bundle.
    raw = good.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem = (tmp_path / "good.key").read_bytes()
    assert raw not in data and pem.splitlines()[1] not in data
