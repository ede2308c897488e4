"""`taxonedge train` end to end on tiny real data, and the model builder the converter relies on."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from taxonedge.edge.kernel.preprocess import InputSpec, load_image
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.train.metrics import compute_metrics

from .conftest import TINY_LABELS, run_cli
from .fixtures_train import tiny_run  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
pytestmark = pytest.mark.slow

TINY_CONFIG = {"backbone": "mobilenet_v2", "alpha": 0.35, "input_size": 64, "weights": "none", "dropout": 0.2}


def _val_arrays(run: Path, val_tree: Path):
    tax = Taxonomy.from_dict(json.loads((run / "taxonomy.json").read_text()))
    spec = InputSpec.model_validate(json.loads((run / "input_spec.json").read_text()))
    paths = sorted(val_tree.rglob("*.jpg"))
    x = np.stack([load_image(p, spec) for p in paths])
    y = np.array([tax.leaf_index("/".join(p.parent.relative_to(val_tree).parts)) for p in paths])
    return tax, x, y


def test_run_directory_contract(tiny_run: Path, tiny_tree: Path, tiny_val_tree: Path) -> None:
    for name in (
        "model.keras",
        "taxonomy.json",
        "input_spec.json",
        "config.json",
        "calibration.json",
        "splits.json",
        "metrics.json",
    ):
        assert (tiny_run / name).is_file(), name
    assert any((tiny_run / "logs").rglob("*tfevents*")), "TensorBoard logs"
    assert (tiny_run / "checkpoints" / "best.weights.h5").is_file()
    tax = Taxonomy.from_dict(json.loads((tiny_run / "taxonomy.json").read_text()))
    assert tax.leaf_labels == sorted(TINY_LABELS)
    assert tax.name == "tiny-goods"  # --taxonomy-name, not the data folder's name
    spec = InputSpec.model_validate(json.loads((tiny_run / "input_spec.json").read_text()))
    assert (spec.height, spec.width, spec.dtype) == (64, 64, "uint8")
    config = json.loads((tiny_run / "config.json").read_text())
    assert {k: config[k] for k in TINY_CONFIG} == TINY_CONFIG and config["seed"] == 1
    assert config["taxonomy_name"] == "tiny-goods"
    calibration = json.loads((tiny_run / "calibration.json").read_text())
    assert set(calibration["thresholds"]) == {"depth_1", "depth_2", "depth_3"}
    assert calibration["temperature"] > 0 and calibration["target_precision"] == 0.98
    assert calibration["rule"] == "published"  # what they give on new images:
    assert set(calibration["two_fold_check"]) == {*calibration["thresholds"], "published"}
    splits = json.loads((tiny_run / "splits.json").read_text())
    assert splits["val_source"] == "separate"
    assert len(splits["train"]) == 64 and len(splits["val"]) == 24
    path, label = splits["train"][0]
    assert Path(path).is_absolute() and Path(path).parent == tiny_tree / label
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert list(metrics["accuracy"]) == ["depth_1", "depth_2", "leaf"]
    assert (
        metrics["n"] == 24
        and metrics["backoff"]["depth_1"]["threshold"] == calibration["thresholds"]["depth_1"]
    )


def test_the_epoch_kept_is_the_one_with_the_lowest_validation_loss(tiny_run: Path) -> None:
    # accuracy on a slice of the training occasions saturates and ties; the loss still ranks the epochs
    source = json.loads((tiny_run / "metrics.json").read_text())["source"]
    val_loss = source["history"]["val_loss"]
    assert len(val_loss) == 2  # --epochs 2, patience 5: both ran
    assert source["best_epoch"] == 1 + int(np.argmin(val_loss))


def test_saturated_accuracy_does_not_cut_fine_tuning_short() -> None:
    """The validation history of Grocery's recipe trained on train alone (its slice of the training
    occasions validates): accuracy tops out at epoch 5 and ties; kept on accuracy, early stopping (patience
    5) ended the run at epoch 10 with epoch 5's weights. On the loss the run goes on and keeps its best."""
    import keras
    from taxonedge.train.trainer import epoch_stopper

    accuracy = [
        0.9593,
        0.9669,
        0.9746,
        0.9822,
        0.9924,
        0.9924,
        0.9924,
        0.9924,
        0.9898,
        0.9873,
        0.9924,
        0.9898,
    ]
    loss = [1.2875, 1.2276, 1.2123, 1.1865, 1.1539, 1.1515, 1.1348, 1.1177, 1.1165, 1.1155, 1.1160, 1.1171]
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    stopper = epoch_stopper(keras, patience=5)
    stopper.set_model(model)
    model.stop_training = False  # what fit() sets before the first epoch
    stopper.on_train_begin()
    for epoch, (acc, val_loss) in enumerate(zip(accuracy, loss, strict=True)):
        model.layers[0].kernel.assign(np.full((2, 1), float(epoch)))  # weights that name their epoch
        stopper.on_epoch_end(epoch, {"val_leaf_probs_accuracy": acc, "val_loss": val_loss})
        assert not model.stop_training, f"stopped after epoch {epoch + 1}"
    stopper.on_train_end()
    assert stopper.best_epoch + 1 == 10  # the lowest loss, not the first epoch at the top accuracy (5)
    assert float(model.layers[0].kernel.numpy()[0, 0]) == 9.0  # and its weights are the ones kept


def test_saved_model_is_single_output_with_temperature_folded(tiny_run: Path, tiny_val_tree: Path) -> None:
    import keras

    model = keras.models.load_model(tiny_run / "model.keras", compile=False)
    assert len(model.inputs) == 1 and tuple(model.inputs[0].shape) == (None, 64, 64, 3)
    assert len(model.outputs) == 1 and tuple(model.outputs[0].shape) == (None, 4)
    tax, x, y = _val_arrays(tiny_run, tiny_val_tree)
    probs = model.predict(x.astype("float32"), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # the run's metrics were computed as softmax(logits / T) before folding: the saved model reproduces them
    recorded = json.loads((tiny_run / "metrics.json").read_text())
    again = compute_metrics(tax, y, probs)
    assert again["nll"] == pytest.approx(recorded["nll"], abs=1e-4)
    assert again["accuracy"] == recorded["accuracy"]
    assert again["accuracy"]["leaf"] > 0.4  # chance is 0.25: the pipeline learns the colours


def test_build_classifier_rebuilds_in_tf_keras_and_takes_the_weights(
    tiny_run: Path, tiny_val_tree: Path
) -> None:
    import keras
    import tf_keras
    from taxonedge.train.model import build_classifier

    trained = keras.models.load_model(tiny_run / "model.keras", compile=False)
    config = json.loads((tiny_run / "config.json").read_text())
    legacy = build_classifier(config, 4, tf_keras)
    rebuilt = build_classifier(config, 4, keras)
    for target in (legacy, rebuilt):
        copied = 0
        for layer in trained.layers:
            if layer.weights:
                target_layer = target.get_layer(layer.name)
                if hasattr(layer, "layers"):  # the backbone: copy its layers one by one
                    for inner in (inner for inner in layer.layers if inner.weights):
                        target_layer.get_layer(inner.name).set_weights(inner.get_weights())
                        copied += 1
                else:
                    target_layer.set_weights(layer.get_weights())
                    copied += 1
        assert copied > 50
    _, x, _ = _val_arrays(tiny_run, tiny_val_tree)
    expected = trained.predict(x.astype("float32"), verbose=0)
    np.testing.assert_allclose(rebuilt.predict(x.astype("float32"), verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(legacy.predict(x.astype("float32"), verbose=0), expected, atol=1e-4)


def test_unfreeze_keeps_batchnorm_statistics_fixed() -> None:
    import keras
    from taxonedge.train.model import backbone_of, build_classifier, unfreeze_top

    model = build_classifier(TINY_CONFIG, 3, keras)
    backbone = backbone_of(model)
    n_trainable = unfreeze_top(backbone, 20)
    bns = [layer for layer in backbone.layers if layer.__class__.__name__ == "BatchNormalization"]
    assert bns and not any(bn.trainable for bn in bns)
    top_conv = [layer for layer in backbone.layers[-20:] if layer.__class__.__name__ == "Conv2D"][-1]
    low_conv = [layer for layer in backbone.layers[:-20] if layer.__class__.__name__ == "Conv2D"][0]
    assert top_conv.trainable and not low_conv.trainable and n_trainable > 0
    before = {id(w): w.numpy().copy() for layer in (top_conv, low_conv, *bns) for w in layer.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    model.fit(
        rng.uniform(0, 255, (16, 64, 64, 3)).astype("float32"),
        rng.integers(0, 3, 16),
        epochs=1,
        batch_size=8,
        verbose=0,
    )
    for bn in bns:  # moving mean/variance and gamma/beta untouched by training
        for w in bn.weights:
            np.testing.assert_array_equal(w.numpy(), before[id(w)])
    assert not np.array_equal(top_conv.kernel.numpy(), before[id(top_conv.kernel)])
    np.testing.assert_array_equal(low_conv.kernel.numpy(), before[id(low_conv.kernel)])


def test_weights_from_a_file_and_other_backbones(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import keras
    from taxonedge.train.model import backbone_of, build_classifier

    source = backbone_of(build_classifier(TINY_CONFIG, 3, keras))
    weights_file = tmp_path / "backbone.weights.h5"
    source.save_weights(weights_file)
    loaded = backbone_of(
        build_classifier({**TINY_CONFIG, "weights": str(weights_file)}, 3, keras, pretrained=True)
    )
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with caplog.at_level(logging.WARNING):
        v3 = build_classifier({**TINY_CONFIG, "backbone": "mobilenet_v3_small", "input_size": 32}, 3, keras)
    assert "hard-swish" in caplog.text and tuple(v3.outputs[0].shape) == (None, 3)
    vgg = build_classifier({**TINY_CONFIG, "backbone": "vgg16", "input_size": 32}, 5, keras)
    assert tuple(vgg.outputs[0].shape) == (None, 5) and vgg.get_layer("input_scaling") is not None
    with pytest.raises(ValueError, match="unknown backbone"):
        build_classifier({**TINY_CONFIG, "backbone": "resnet"}, 3, keras)


def test_holdout_validation_and_corrupt_images(
    tiny_tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from taxonedge.train.trainer import TrainConfig, train

    data = shutil.copytree(tiny_tree, tmp_path / "data")
    broken = data / TINY_LABELS[0] / "broken.jpg"
    broken.write_bytes(b"not an image")
    config = TrainConfig(
        data=str(data),
        holdout=0.25,
        head_epochs=3,
        epochs=1,
        unfreeze=10,
        batch_size=16,
        mixup=0.3,
        **TINY_CONFIG,
    )
    with caplog.at_level(logging.WARNING):
        metrics = train(config, tmp_path / "run")
    assert "may be optimistic" in caplog.text and str(broken) in caplog.text
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert (
        splits["val_source"] == "holdout"
        and len(splits["skipped"]) == 1
        and str(broken) in splits["skipped"][0]
    )
    train_paths = {p for p, _ in splits["train"]}
    val_paths = {p for p, _ in splits["val"]}
    assert not train_paths & val_paths and len(train_paths) + len(val_paths) == 64
    assert {label for _, label in splits["val"]} == set(TINY_LABELS)
    assert metrics["n"] == len(val_paths) == 16


def test_train_on_val_moves_part_of_val_and_evaluate_reads_the_runs_split(
    tiny_tree: Path, tiny_val_tree: Path, tmp_path: Path
) -> None:
    from taxonedge.train.trainer import TrainConfig, train

    config = TrainConfig(
        data=str(tiny_tree),
        val=str(tiny_val_tree),
        train_on_val=0.5,
        head_epochs=3,
        epochs=0,
        batch_size=16,
        **TINY_CONFIG,
    )
    metrics = train(config, tmp_path / "run")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    train_paths = {p for p, _ in splits["train"]}
    val_paths = {p for p, _ in splits["val"]}
    moved = {p for p in train_paths if Path(p).is_relative_to(tiny_val_tree)}
    assert len(moved) == 12 and len(val_paths) == 12 and len(train_paths) == 64 + 12  # 6 per class: 3 and 3
    assert not train_paths & val_paths and moved | val_paths == {str(p) for p in tiny_val_tree.rglob("*.jpg")}
    assert {label for _, label in splits["val"]} == set(TINY_LABELS)  # every class still validates
    assert "moved to training" in splits["val_source"] and metrics["n"] == 12
    out = tmp_path / "eval"
    run_cli(
        "evaluate",
        "--model",
        str(tmp_path / "run"),
        "--data",
        str(tmp_path / "run" / "splits.json"),
        "--out",
        str(out),
    )
    again = json.loads((out / "metrics.json").read_text())
    assert again["n"] == 12 and again["accuracy"] == metrics["accuracy"]


def test_cli_errors_are_one_line(tmp_path: Path, tiny_tree: Path) -> None:
    proc = run_cli(
        "train",
        "--data",
        str(tiny_tree),
        "--out",
        str(tmp_path / "r"),
        "--weights",
        str(tmp_path / "nope.h5"),
        check=False,
    )
    assert proc.returncode == 2 and "nope.h5: no such file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "no such folder or list file" in proc.stderr
    proc = run_cli(
        "train", "--data", str(tiny_tree), "--out", str(tmp_path / "r"), "--holdout", "1.5", check=False
    )
    assert proc.returncode == 2 and "--holdout" in proc.stderr
    proc = run_cli(
        "train", "--data", str(tiny_tree), "--out", str(tmp_path / "r"), "--train-on-val", "0.5", check=False
    )
    assert proc.returncode == 2 and "pass --val too" in proc.stderr


def test_train_help_shows_real_defaults_only():
    out = " ".join(run_cli("train", "--help").stdout.split())  # argparse wraps lines
    assert "(default: None)" not in out  # options without a default say what happens instead
    assert "--no-flip no horizontal flips (default" not in out  # a flag's stored default misleads
    assert "--holdout HOLDOUT share of each class held out when no --val (default: 0.15)" in out
    assert "--unfreeze UNFREEZE backbone layers unfrozen in phase 2 (default: 48)" in out
