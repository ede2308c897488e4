"""`taxonedge evaluate` on a real trained run (Keras) and on its real int8 bundle (LiteRT)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import TINY_LABELS, run_cli, write_image_tree
from .fixtures_train import tiny_run  # noqa: F401

pytestmark = pytest.mark.slow


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_evaluate_run_writes_metrics_and_reports(tiny_run: Path, tiny_val_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--model", str(tiny_run), "--data", str(tiny_val_tree), "--out", str(out))
    assert "leaf" in proc.stdout and str(out) in proc.stdout
    metrics = _metrics(out)
    assert list(metrics["accuracy"]) == ["depth_1", "depth_2", "leaf"]
    assert metrics["accuracy"] == _metrics(tiny_run)["accuracy"]  # the run was scored on the same val tree
    for key in (
        "top5",
        "macro_f1",
        "hierarchical",
        "mistake_severity",
        "backoff",
        "per_class",
        "accuracy_summed",
    ):
        assert key in metrics
    calibration = json.loads((tiny_run / "calibration.json").read_text())
    assert {f"depth_{d}": metrics["backoff"][f"depth_{d}"]["threshold"] for d in (1, 2, 3)} == calibration[
        "thresholds"
    ]
    for png in ("confusion.png", "reliability.png"):
        image = cv2.imread(str(out / png))
        assert image is not None and image.shape[0] > 200, png
    report = (out / "report.md").read_text()
    assert "| depth_1 | 2 |" in report and "| leaf | 4 |" in report
    assert all(f"| {label} | 6 |" in report for label in TINY_LABELS)


def test_evaluate_int8_bundle_through_litert(tiny_run: Path, tiny_val_tree: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny.tebundle"
    run_cli("convert", "--run", str(tiny_run), "--out", str(bundle), "--edgetpu", "skip", "--force")
    out = tmp_path / "eval_int8"
    run_cli("evaluate", "--bundle", str(bundle), "--data", str(tiny_val_tree), "--out", str(out))
    metrics, float_metrics = _metrics(out), _metrics(tiny_run)
    assert metrics["source"]["kind"] == "bundle" and metrics["source"]["quantization"] == "int8"
    assert metrics["n"] == 24
    # int8 output steps are 1/256: the accuracy may move by an image or two, not more
    for key, value in float_metrics["accuracy"].items():
        assert abs(metrics["accuracy"][key] - value) <= 2 / 24 + 1e-9, key


def test_evaluate_skips_corrupt_images_and_rejects_unknown_labels(
    tiny_run: Path,
    tiny_val_tree: Path,
    tmp_path: Path,
) -> None:
    data = shutil.copytree(tiny_val_tree, tmp_path / "val")
    broken = data / TINY_LABELS[1] / "zz-broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "eval"
    run_cli("evaluate", "--model", str(tiny_run), "--data", str(data), "--out", str(out))
    metrics = _metrics(out)
    assert metrics["n"] == 24 and any(str(broken) in e for e in metrics["source"]["skipped_images"])
    assert str(broken) in (out / "report.md").read_text()

    unknown = write_image_tree(tmp_path / "other", ["Fruit/Kiwi"], per_class=2)
    proc = run_cli(
        "evaluate", "--model", str(tiny_run), "--data", str(unknown), "--out", str(out), check=False
    )
    assert proc.returncode == 2 and "Fruit/Kiwi" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("evaluate", "--model", str(tmp_path), "--data", str(data), "--out", str(out), check=False)
    assert proc.returncode == 2 and "no model.keras" in proc.stderr
    proc = run_cli("evaluate", "--bundle", str(broken), "--data", str(data), "--out", str(out), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_evaluate_a_list_file_whose_hierarchy_differs_from_the_model(
    tiny_run: Path, tiny_val_tree: Path, tmp_path: Path
) -> None:
    """The dataset's own list names Avocado `Fruit/Green/Avocado` (classes.csv), the model has
    `Fruit/Avocado`: evaluated as the model's leaf by its class name, with the same result as the folder
    tree."""
    root = tmp_path / "dataset"
    shutil.copytree(tiny_val_tree, root / "val")
    hierarchy = [
        "Fruit/Apple/Granny-Smith",
        "Fruit/Apple/Pink-Lady",
        "Fruit/Green/Avocado",
        "Vegetables/Carrot",
    ]
    rows, lines = [], []
    for fine_id, (folder, label) in enumerate(zip(TINY_LABELS, hierarchy, strict=True)):
        fine, coarse = label.split("/")[-1], label.split("/")[-2]
        rows.append(f"{fine},{fine_id},{coarse},0,/iconic-images-and-descriptions/{label}/{fine}_Iconic.jpg,")
        lines += [
            f"val/{folder}/{p.name}, {fine_id}, 0" for p in sorted((root / "val" / folder).glob("*.jpg"))
        ]
    (root / "classes.csv").write_text(
        "name,id,coarse,coarse id,iconic,description\n" + "\n".join(rows) + "\n"
    )
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    proc = run_cli("evaluate", "--model", str(tiny_run), "--data", str(root / "val.txt"), "--out", str(out))
    assert "'Fruit/Green/Avocado' evaluated as the model's 'Fruit/Avocado' (same class name)" in proc.stderr
    metrics = _metrics(out)
    assert metrics["n"] == 24 and metrics["accuracy"] == _metrics(tiny_run)["accuracy"]


def test_evaluate_fits_thresholds_for_the_device_config(
    tiny_run: Path, tiny_val_tree: Path, tmp_path: Path
) -> None:
    import numpy as np
    from taxonedge.edge.kernel.taxonomy import Taxonomy
    from taxonedge.edge.service.config import ModelConfig, tomllib
    from taxonedge.train.calibrate import choose_published_thresholds

    out = tmp_path / "eval"
    proc = run_cli(
        "evaluate",
        "--model",
        str(tiny_run),
        "--data",
        str(tiny_val_tree),
        "--out",
        str(out),
        "--fit-thresholds",
        "0.9",
    )
    fitted = _metrics(out)["fitted_thresholds"]
    assert fitted["target_precision"] == 0.9 and list(fitted["thresholds"]) == [
        "depth_1",
        "depth_2",
        "depth_3",
    ]
    # the same rule as training and convert, on the probabilities evaluate saw
    saved = np.load(out / "predictions.npz")
    taxonomy = Taxonomy.from_dict(json.loads((tiny_run / "taxonomy.json").read_text()))
    assert fitted["rule"] == "published" and fitted["thresholds"] == choose_published_thresholds(
        taxonomy, saved["probs"].astype(np.float64), saved["true_leaf"], 0.9
    )
    here = fitted["on_these_images"]
    # the labels as published reach the target here, or nothing is published
    assert here["published_precision"] >= 0.9 or fitted["thresholds"]["depth_1"] == 1.0
    for key in [*fitted["thresholds"], "published"]:
        check = fitted["two_fold"][key]
        assert 0.0 <= check["coverage"] <= 1.0 and (
            check["precision"] is None or 0.0 <= check["precision"] <= 1.0
        )
    # what it prints is a device config fragment that puts exactly these thresholds in force
    fragment = proc.stdout[proc.stdout.index("[model]") :]
    model = ModelConfig(**tomllib.loads(fragment)["model"], require_signature=False)
    assert model.thresholds == fitted["thresholds"]
    report = (out / "report.md").read_text()
    assert "Thresholds fitted on these images (target precision 0.9, rule `published`)" in report
    assert "| published (any depth) |" in report

    proc = run_cli(
        "evaluate",
        "--model",
        str(tiny_run),
        "--data",
        str(tiny_val_tree),
        "--out",
        str(out),
        "--fit-thresholds",
        "1.5",
        check=False,
    )
    assert proc.returncode == 2 and "between 0 and 1" in proc.stderr


def test_evaluate_a_v3_bundle_reports_the_open_set_and_scores_novel_products(
    tiny_run: Path, tiny_val_tree: Path, tmp_path: Path
) -> None:
    """Products the model was not trained on: right is unknown or a parent on their own path; `evaluate
    --novel-products` counts what the device's own decoder publishes for them."""
    from taxonedge.edge.kernel.bundle import read_bundle
    from taxonedge.edge.kernel.decode import Decoder
    from taxonedge.edge.kernel.runtime import Classifier
    from taxonedge.train.data import Sample
    from taxonedge.train.evaluate import score_novel

    bundle_path = tmp_path / "tiny.tebundle"
    run_cli("convert", "--run", str(tiny_run), "--out", str(bundle_path), "--edgetpu", "skip", "--force")
    data = shutil.copytree(tiny_val_tree, tmp_path / "val")
    # a new apple, drawn unlike any trained class (palette index 5)
    write_image_tree(data, ["x", "x", "x", "x", "x", "Fruit/Apple/Red-Delicious"], per_class=5, seed=9)
    shutil.rmtree(data / "x")
    out = tmp_path / "eval"
    proc = run_cli(
        "evaluate", "--bundle", str(bundle_path), "--data", str(data), "--out", str(out), "--novel-products"
    )
    metrics = _metrics(out)
    assert metrics["n"] == 24  # the known images only
    assert (
        0.0 <= metrics["open_set"]["known_rejected"] <= 1.0 and metrics["open_set"]["threshold"] is not None
    )
    novel = metrics["novel_products"]
    assert novel["n"] == 5 and novel["labels"] == 1
    assert novel["unknown"] + novel["correct_parent"] + novel["wrong"] == pytest.approx(1.0)
    assert novel["safe"] == pytest.approx(novel["unknown"] + novel["correct_parent"])
    assert "novel products (5 images, 1 labels)" in proc.stdout
    with np.load(out / "predictions.npz") as predictions:
        assert predictions["scores"].shape == predictions["probs"].shape == (24, 4)

    # The accounting, with decoders whose outcome is known: nothing familiar -> all unknown (unfamiliar);
    # no thresholds and no open set -> every novel apple gets a trained leaf, a product it is not.
    bundle = read_bundle(bundle_path)
    samples = [
        Sample(str(p), "Fruit/Apple/Red-Delicious")
        for p in sorted((data / "Fruit/Apple/Red-Delicious").iterdir())
    ]
    classifier = Classifier(bundle)
    strict = Decoder(bundle.taxonomy, kind="leaf_logits", open_set_threshold=1e9)
    scored = score_novel(bundle.taxonomy, strict, classifier, samples, bundle.manifest.input)
    assert scored["unknown"] == scored["unfamiliar"] == scored["safe"] == 1.0
    lax = Decoder(bundle.taxonomy, kind="leaf_logits")
    scored = score_novel(bundle.taxonomy, lax, classifier, samples, bundle.manifest.input)
    assert scored["wrong"] == 1.0 and scored["safe"] == 0.0
