"""VGG16 converts to full int8 too, and the report says why it is a poor Edge TPU choice."""

from __future__ import annotations

import pytest
from taxonedge.edge.kernel.bundle import read_bundle

from .conftest import run_cli
from .fixtures_train import tiny_run  # noqa: F401
from .test_convert import write_run

pytestmark = pytest.mark.slow


def test_vgg16_converts_with_an_edgetpu_warning(tmp_path, tiny_tree, tiny_val_tree):
    from taxonedge.convert.edgetpu import check_model
    from taxonedge.train.model import build_classifier

    config = {"backbone": "vgg16", "input_size": 32, "dropout": 0.0, "weights": "none", "seed": 0}
    run = write_run(
        tmp_path / "run", tiny_tree, tiny_val_tree, config=config, epochs=1, build=build_classifier
    )
    out = tmp_path / "vgg.tebundle"
    # --force: one epoch from random weights; the gate has its own tests.
    proc = run_cli(
        "convert",
        "--run",
        str(run),
        "--out",
        str(out),
        "--calibration-images",
        "8",
        "--force",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "warning: VGG16" in proc.stdout and "8 MB on-chip memory" in proc.stdout
    bundle = read_bundle(out)
    assert bundle.manifest.model.backbone == "vgg16" and bundle.manifest.quantization.mode == "int8"
    assert any("VGG16" in w for w in bundle.manifest.edgetpu["warnings"])
    static = check_model(bundle.model_bytes())
    assert static["float_tensors"] == 0 and static["compatible"]
    assert len(bundle.model_bytes()) > 14_000_000  # 14.7 M int8 weights: nearly twice the on-chip memory
    shown = run_cli("inspect", str(out)).stdout
    assert "warning  VGG16" in shown


def test_a_run_written_by_taxonedge_train_converts(tiny_run, tmp_path):
    """The run-directory contract with the trainer: everything the manifest takes from the run arrives."""
    import json

    from taxonedge.edge.kernel.taxonomy import Taxonomy

    out = tmp_path / "trained.tebundle"
    # A 2-epoch model on 24 val images: one image is 4.2 points, so the gate is loosened, and no depth-1
    # threshold reaches the run's precision (--force); both have their own tests.
    run_cli(
        *("convert", "--run", str(tiny_run), "--out", str(out), "--calibration-images", "32"),
        *("--max-drop", "25", "--force"),
    )
    m = read_bundle(out).manifest
    calibration = json.loads((tiny_run / "calibration.json").read_text())
    assert m.metrics["thresholds"]["float_calibration"] == pytest.approx(calibration["thresholds"])
    assert m.metrics["thresholds"]["target_precision"] == calibration["target_precision"]
    assert m.temperature == pytest.approx(calibration["temperature"])
    assert m.taxonomy_hash == Taxonomy.from_dict(json.loads((tiny_run / "taxonomy.json").read_text())).hash
    assert (m.input.height, m.input.width, m.input.dtype, m.input.scale) == (64, 64, "uint8", 1.0)
    assert m.model.backbone == "mobilenet_v2" and m.output.name == "leaf_logits" and m.embedding is not None
