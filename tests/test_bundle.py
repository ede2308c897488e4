"""Bundle v1: written atomically, read with every hash verified, damage and tampering rejected."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import (
    MODEL,
    BundleError,
    ModelInfo,
    build_manifest,
    read_bundle,
    utc_now,
    write_bundle,
)
from taxonedge.edge.kernel.preprocess import InputSpec
from taxonedge.edge.kernel.signing import generate_keypair, load_private_key, load_public_key
from taxonedge.edge.kernel.taxonomy import Taxonomy

from .conftest import TINY_LABELS, run_cli

MODEL_BYTES = b"TFL3" + bytes(range(256)) * 20  # content is opaque to the bundle layer


def make_bundle(path, sign_key=None, model=MODEL_BYTES):
    tax = Taxonomy.from_paths(TINY_LABELS, name="tiny")
    files = {MODEL: model}
    manifest = build_manifest(
        model=ModelInfo(name="m", version="3", created_at=utc_now()),
        taxonomy=tax,
        input_spec=InputSpec(),
        files=files,
        thresholds={"depth_1": 0.7},
    )
    return write_bundle(path, manifest, files, sign_key=sign_key)


@pytest.fixture
def keys(tmp_path):
    generate_keypair(tmp_path / "k.key", tmp_path / "k.pub")
    generate_keypair(tmp_path / "other.key", tmp_path / "other.pub")
    return tmp_path


def test_roundtrip(tmp_path):
    path = make_bundle(tmp_path / "m.tebundle")
    bundle = read_bundle(path)
    assert bundle.model_bytes() == MODEL_BYTES
    assert bundle.manifest.model.version == "3"
    assert bundle.taxonomy.leaf_labels == sorted(TINY_LABELS)
    assert bundle.manifest.output.leaf_order == bundle.taxonomy.leaf_labels
    assert bundle.signature_status == "unsigned"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"
    # identical content gives identical bytes (reproducible builds, idempotent deployments)
    again = make_bundle(tmp_path / "again.tebundle")
    assert read_bundle(again).manifest.files == bundle.manifest.files


@pytest.mark.parametrize("position", [0.01, 0.2, 0.5, 0.8, 0.999])
def test_every_flipped_byte_is_rejected(tmp_path, position):
    path = make_bundle(tmp_path / "m.tebundle")
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * position)] ^= 0x01
    with pytest.raises(BundleError):
        read_bundle(bytes(raw))


def test_flipped_byte_in_model_names_file_and_expectation(tmp_path):
    path = make_bundle(tmp_path / "m.tebundle")
    raw = path.read_bytes()
    at = raw.index(MODEL_BYTES) + 100
    damaged = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    with pytest.raises(BundleError, match=r"sha256 of 'model.tflite' is [0-9a-f]{64}, the manifest expects"):
        read_bundle(damaged)


def test_truncated_and_foreign_files(tmp_path):
    raw = make_bundle(tmp_path / "m.tebundle").read_bytes()
    with pytest.raises(BundleError):
        read_bundle(raw[: len(raw) // 2])
    with pytest.raises(BundleError, match="not a readable bundle|empty"):
        read_bundle(b"this is not a tar file at all" * 40)
    with pytest.raises(BundleError, match="cannot read"):
        read_bundle(tmp_path / "missing.tebundle")


def test_extra_member_is_rejected(tmp_path):
    raw = make_bundle(tmp_path / "m.tebundle").read_bytes()
    members = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for info in tar:
            members[info.name] = tar.extractfile(info).read()
    members["evil.sh"] = b"rm -rf /"
    from taxonedge.edge.kernel.bundle import _tar_bytes

    with pytest.raises(BundleError, match="'evil.sh' is in the bundle but not listed"):
        read_bundle(_tar_bytes(members))


def test_manifest_edit_is_caught_without_and_with_signature(tmp_path, keys):
    path = make_bundle(tmp_path / "m.tebundle", sign_key=load_private_key(keys / "k.key"))
    with tarfile.open(path) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar}
    manifest = json.loads(members["manifest.json"])
    manifest["thresholds"]["depth_1"] = 0.01
    members["manifest.json"] = json.dumps(manifest, indent=2).encode()
    from taxonedge.edge.kernel.bundle import _tar_bytes

    with pytest.raises(BundleError, match="manifest.json' does not match its sha256"):
        read_bundle(_tar_bytes(members))
    # an attacker who also fixes SHA256SUMS still cannot forge the signature
    import hashlib

    sums = "".join(
        f"{hashlib.sha256(members[n]).hexdigest()}  {n}\n" for n in ("manifest.json", "manifest.sig")
    )
    members["SHA256SUMS"] = sums.encode()
    with pytest.raises(BundleError, match="does not verify"):
        read_bundle(_tar_bytes(members), public_key=load_public_key(keys / "k.pub"))


def test_signatures(tmp_path, keys):
    signed = make_bundle(tmp_path / "s.tebundle", sign_key=load_private_key(keys / "k.key"))
    unsigned = make_bundle(tmp_path / "u.tebundle")
    good = read_bundle(signed, public_key=load_public_key(keys / "k.pub"))
    assert good.signature_status == "valid"
    assert read_bundle(signed).signature_status == "not checked"
    with pytest.raises(BundleError, match="does not verify against key"):
        read_bundle(signed, public_key=load_public_key(keys / "other.pub"))
    with pytest.raises(BundleError, match="unsigned but a signature is required"):
        read_bundle(unsigned, public_key=load_public_key(keys / "k.pub"))
    assert b"PRIVATE" not in signed.read_bytes()


def test_unsupported_format_version(tmp_path):
    v4 = _rewritten(make_bundle(tmp_path / "m.tebundle"), lambda m: m.update(format_version=4))
    with pytest.raises(BundleError, match="format_version 4 is not supported"):
        read_bundle(v4)


def test_format_v2_lists_each_backends_artifact_and_v1_bundles_still_read(tmp_path):
    """v2 names the file each backend runs; a v1 bundle (the demo model up to 1.3.1 was one) is read with
    its artifacts derived from its file names."""
    from taxonedge.edge.kernel.bundle import MODEL_EDGETPU, build_manifest, write_bundle
    from taxonedge.edge.kernel.preprocess import InputSpec
    from taxonedge.edge.kernel.taxonomy import Taxonomy

    taxonomy = Taxonomy.from_paths(["A/x", "A/y", "B"])
    files = {MODEL: MODEL_BYTES, MODEL_EDGETPU: b"compiled", "model_toy.bin": b"toy"}
    manifest = build_manifest(
        model={"name": "m", "version": "1", "created_at": utc_now()},
        taxonomy=taxonomy,
        input_spec=InputSpec(height=8, width=8),
        files=files,
    )
    bundle = read_bundle(write_bundle(tmp_path / "v2.tebundle", manifest, files))
    assert bundle.manifest.format_version == 2
    assert bundle.manifest.artifacts == {"cpu": MODEL, "edgetpu": MODEL_EDGETPU, "toy": "model_toy.bin"}
    assert bundle.artifacts()["toy"] == b"toy" and bundle.has_artifact("edgetpu")
    v1 = read_bundle(_rewritten(make_bundle(tmp_path / "m.tebundle"), _as_v1))
    assert v1.manifest.format_version == 1 and v1.manifest.artifacts == {}
    assert set(v1.artifacts()) == {"cpu"} and not v1.has_edgetpu_model
    extra = _with_member(tmp_path / "v2.tebundle")  # a listed file no backend names
    with pytest.raises(BundleError, match="neither a backend's artifact"):
        read_bundle(extra)


def _as_v1(manifest: dict) -> None:
    manifest["format_version"] = 1
    del manifest["artifacts"]


def _rewritten(path, edit, extra: dict[str, bytes] | None = None) -> bytes:
    """The bundle at `path` with its manifest edited in place by `edit` and `extra` members added (the
    checksums rebuilt, unsigned): what a writer would refuse to make."""
    import hashlib

    from taxonedge.edge.kernel.bundle import _tar_bytes

    with tarfile.open(path) as tar:
        members = {i.name: tar.extractfile(i).read() for i in tar if i.name != "signature"}
    manifest = json.loads(members["manifest.json"])
    edit(manifest)
    members["manifest.json"] = json.dumps(manifest).encode()
    members.update(extra or {})
    members["SHA256SUMS"] = (
        f"{hashlib.sha256(members['manifest.json']).hexdigest()}  manifest.json\n".encode()
    )
    return _tar_bytes(members)


def _with_member(path):
    """The bundle at `path` with an extra tar member listed in a rebuilt manifest (a writer refuses it)."""
    import hashlib

    def listed(manifest: dict) -> None:
        manifest["files"]["notes.txt"] = {"sha256": hashlib.sha256(b"x").hexdigest(), "size": 1}

    return _rewritten(path, listed, {"notes.txt": b"x"})


def test_inspect_cli_prints_manifest_and_rejects_flipped_byte(tmp_path, keys):
    from .tinymodels import tiny_bundle_bytes

    data = tiny_bundle_bytes(sign_key=load_private_key(keys / "k.key"))
    path = tmp_path / "tiny.tebundle"
    path.write_bytes(data)
    out = run_cli("inspect", str(path), "--pubkey", str(keys / "k.pub")).stdout
    assert "signature  valid" in out
    assert "tiny 1" in out and "4 leaves" in out and "fully integer" in out
    info = json.loads(run_cli("inspect", str(path), "--json").stdout)
    assert info["manifest"]["output"]["leaf_order"] == sorted(TINY_LABELS)
    damaged = bytearray(data)
    damaged[len(damaged) // 2] ^= 0x10
    (tmp_path / "bad.tebundle").write_bytes(bytes(damaged))
    proc = run_cli("inspect", str(tmp_path / "bad.tebundle"), check=False)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    wrong = run_cli("inspect", str(path), "--pubkey", str(keys / "other.pub"), check=False)
    assert wrong.returncode == 1 and "does not verify" in wrong.stderr


def test_golden_roundtrip(tmp_path):
    from .tinymodels import tiny_bundle_bytes

    bundle = read_bundle(tiny_bundle_bytes())
    inputs, outputs = bundle.golden()
    assert inputs.dtype == np.uint8 and inputs.shape[1:] == (32, 32, 3)
    assert outputs.shape == (inputs.shape[0], 4)
