"""`taxonedge inspect` on a bundle made by `taxonedge convert`: readable and JSON output, signature
status, and refusal of tampered bundles (one flipped byte, an edited manifest)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from taxonedge.edge.kernel.bundle import read_bundle

from .conftest import run_cli
from .test_convert import converted, tiny_convert_run  # noqa: F401  (session fixtures)

pytestmark = pytest.mark.slow


def test_readable_output_shows_everything_a_person_checks(converted):
    bundle, pub, _ = converted
    out = run_cli("inspect", str(bundle), "--pubkey", str(pub)).stdout
    assert "signature  valid (key " in out
    assert "quantized  int8, 32 calibration images" in out
    assert "tiny: 4 leaves, max depth 3" in out
    assert "input      32x32x3 RGB uint8 (scale 1, zero point 0" in out
    assert "output     'leaf_logits' leaf_logits x4 uint8" in out
    assert "embedding  'embedding' x8 uint8" in out
    assert "open set   max_logit below " in out and "98.0 % of known validation images through" in out
    thresholds = read_bundle(bundle).manifest.thresholds  # chosen by convert on the int8 outputs
    assert "thresholds " + ", ".join(f"{k} {v:.3f}" for k, v in thresholds.items()) in out
    check = dict(read_bundle(bundle).manifest.metrics["thresholds"]["two_fold_check"])
    published = check.pop("published")["precision"]
    assert (
        "(for 0.98 precision, published; two-fold check "
        + " / ".join("-" if r["precision"] is None else f"{100 * r['precision']:.1f}" for r in check.values())
        + " %"
        + ("" if published is None else f", published {100 * published:.1f} %")
        + ")"
        in out
    )
    assert (
        "edge tpu   compiler not found - edgetpu_compiler not on PATH" in out
        and "no Edge TPU model (CPU only)" in out
    )
    assert "golden     8 self-test images, tolerance 0 quantized steps" in out
    ops_line = next(line for line in out.splitlines() if line.startswith("ops "))
    assert "CONV_2D x1" in ops_line and "FULLY_CONNECTED x1" in ops_line and "DELEGATE" not in ops_line
    assert "(fully integer)" in out
    assert "top-1 agreement" in out and "gate passed" in out
    for level in ("depth_1", "depth_2", "leaf"):
        assert any(line.split()[:1] == [level] for line in out.splitlines())
    unchecked = run_cli("inspect", str(bundle)).stdout
    assert "present, not checked" in unchecked and "--pubkey" in unchecked


def test_json_output(converted):
    bundle, pub, _ = converted
    info = json.loads(run_cli("inspect", str(bundle), "--json", "--pubkey", str(pub)).stdout)
    assert info["signature"] == "valid"
    assert info["edgetpu"] == {
        "status": "compiler not found",
        "text": info["edgetpu"]["text"],
        "has_model": False,
        "warnings": [],
    }
    assert info["model"]["fully_integer"] and info["model"]["tensor_dtypes"].keys() <= {
        "uint8",
        "int8",
        "int32",
    }
    assert info["manifest"]["metrics"]["gate"]["passed"] is True
    assert info["file_sizes"]["model.tflite"] == info["manifest"]["files"]["model.tflite"]["size"]
    assert info["bundle_size"] == bundle.stat().st_size


def test_one_flipped_byte_anywhere_is_refused(converted, tmp_path):
    bundle, pub, _ = converted
    data = bundle.read_bytes()
    model_start = data.index(b"TFL3") - 4  # inside model.tflite
    for offset in (model_start + 500, len(data) // 3, 100):  # the model, somewhere, a tar header
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        path = tmp_path / f"bad{offset}.tebundle"
        path.write_bytes(bytes(damaged))
        proc = run_cli("inspect", str(path), check=False)
        assert proc.returncode == 1 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("inspect", str(tmp_path / f"bad{model_start + 500}.tebundle"), check=False)
    assert "model.tflite" in proc.stderr


def test_edited_manifest_fails_the_signature(converted, tmp_path):
    """An attacker lowers a threshold and fixes SHA256SUMS so that the bundle is self-consistent: only the
    signature can catch it."""
    from taxonedge.edge.kernel.bundle import _tar_bytes

    bundle, pub, _ = converted
    with tarfile.open(fileobj=io.BytesIO(bundle.read_bytes())) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    manifest = json.loads(members["manifest.json"])
    manifest["thresholds"]["depth_1"] = 0.01
    members["manifest.json"] = json.dumps(manifest, indent=2).encode()
    members["SHA256SUMS"] = "".join(
        f"{hashlib.sha256(members[n]).hexdigest()}  {n}\n" for n in ("manifest.json", "manifest.sig")
    ).encode()
    path = tmp_path / "edited.tebundle"
    path.write_bytes(_tar_bytes(members))
    assert "present, not checked" in run_cli("inspect", str(path)).stdout  # consistent, but...
    proc = run_cli("inspect", str(path), "--pubkey", str(pub), check=False)
    assert proc.returncode == 1 and "does not verify" in proc.stderr
