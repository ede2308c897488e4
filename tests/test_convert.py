"""`taxonedge convert` on tiny real run directories: post-training int8, the accuracy gate, bad input,
Edge TPU paths, golden set and signing. Every model here is really trained and converted (seconds)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import GOLDEN, MODEL, MODEL_EDGETPU, read_bundle
from taxonedge.edge.kernel.preprocess import InputSpec
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.edge.kernel.signing import generate_keypair, load_public_key
from taxonedge.edge.kernel.taxonomy import Taxonomy

from .conftest import TINY_LABELS, run_cli

pytestmark = pytest.mark.slow
SIZE = 32
DATA = Path(__file__).parent / "data"


def write_run(
    run: Path, train_tree: Path, val_tree: Path, config: dict | None = None, epochs: int = 15, build=None
) -> Path:
    """A run directory in exactly the layout `taxonedge train` writes, with a small real Keras 3 model."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from taxonedge.edge.kernel.preprocess import load_image

    keras.utils.set_random_seed(0)
    taxonomy = Taxonomy.from_paths(TINY_LABELS, name="tiny")
    spec = InputSpec(height=SIZE, width=SIZE)
    splits = {}
    for key, tree in (("train", train_tree), ("val", val_tree)):
        splits[key] = [
            [str(p.resolve()), str(p.parent.relative_to(tree))] for p in sorted(tree.rglob("*.jpg"))
        ]
    x = np.stack([load_image(p, spec) for p, _ in splits["train"]]).astype("float32")
    y = np.array([taxonomy.leaf_index(label) for _, label in splits["train"]])
    config = config or {"backbone": "tiny-cnn", "input_size": SIZE, "seed": 0}
    if build is None:
        inp = keras.Input((SIZE, SIZE, 3))
        h = keras.layers.Rescaling(1 / 127.5, -1)(inp)
        h = keras.layers.Conv2D(8, 3, activation="relu")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Dense(taxonomy.num_leaves)(h)))
        lr = 0.05
    else:
        model, lr = build(config, taxonomy.num_leaves, keras), 0.01
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    run.mkdir(parents=True, exist_ok=True)
    model.save(run / "model.keras")
    (run / "taxonomy.json").write_text(json.dumps(taxonomy.to_dict()))
    (run / "input_spec.json").write_text(spec.model_dump_json())
    (run / "config.json").write_text(json.dumps(config))
    (run / "calibration.json").write_text(
        json.dumps({"temperature": 1.0, "thresholds": {"depth_1": 0.5}, "target_precision": 0.98})
    )
    (run / "splits.json").write_text(json.dumps({**splits, "val_source": "separate"}))
    (run / "metrics.json").write_text("{}")
    return run


@pytest.fixture(scope="session")
def tiny_convert_run(tmp_path_factory, tiny_tree, tiny_val_tree) -> Path:
    return write_run(tmp_path_factory.mktemp("convert") / "run", tiny_tree, tiny_val_tree)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_convert_run) -> tuple[Path, Path, object]:
    """One signed int8 bundle made through the CLI: (bundle, public key, CompletedProcess)."""
    tmp = tmp_path_factory.mktemp("converted")
    generate_keypair(tmp / "k.key", tmp / "k.pub")
    bundle = tmp / "tiny.tebundle"
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(bundle),
        "--sign-key",
        str(tmp / "k.key"),
        "--calibration-images",
        "32",
        "--version",
        "7",
        env={"PATH": "/usr/bin:/bin"},
    )
    return bundle, tmp / "k.pub", proc


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_ptq_int8_bundle_is_complete_and_runs_like_the_float_model(converted, tiny_convert_run):
    bundle_path, pub, proc = converted
    bundle = read_bundle(bundle_path, public_key=load_public_key(pub))
    m = bundle.manifest
    assert bundle.signature_status == "valid"
    assert m.model.version == "7" and m.model.backbone == "tiny-cnn"
    assert (
        m.quantization.mode == "int8" and not m.quantization.qat and m.quantization.calibration_images == 32
    )
    # Input spec from the converted tensor: raw uint8 pixels (scale 1, zero point 0), as the device feeds
    # them.
    assert (m.input.dtype, m.input.scale, m.input.zero_point) == ("uint8", 1.0, 0)
    # Format v3: leaf logits (the device takes the softmax in float) and the embedding, one invoke.
    assert m.format_version == 3
    assert (m.output.name, m.output.kind, m.output.dtype) == ("leaf_logits", "leaf_logits", "uint8")
    assert m.embedding is not None and (m.embedding.name, m.embedding.size) == ("embedding", 8)
    # The open-set threshold lets the asked share of the known validation images through.
    assert m.open_set is not None and m.open_set.known_pass_rate == 0.98
    assert m.metrics["open_set"]["known_rejected"] <= 0.02 + 1 / 24
    assert m.temperature == 1.0
    # Back-off thresholds are re-chosen on the int8 outputs (what the device decides on); the float
    # calibration is kept for the record, and the labels as published reach the target precision on val.
    chosen = m.metrics["thresholds"]
    assert chosen["float_calibration"] == {"depth_1": 0.5} and chosen["deployed"] == m.thresholds
    # with what they are worth on new images of the same kind (calibrate.check_thresholds, tested there)
    assert set(chosen["two_fold_check"]) == {*m.thresholds, "published"} and chosen["rule"] == "published"
    assert all(
        row["precision"] is None or 0.0 <= row["precision"] <= 1.0
        for row in chosen["two_fold_check"].values()
    )
    assert set(m.thresholds) == {"depth_1", "depth_2", "depth_3"}
    deployed = m.metrics["backoff_deployed"]
    assert deployed["published_precision"] >= chosen["target_precision"] or m.thresholds["depth_1"] == 1.0
    levels = m.metrics["per_level"]
    assert set(levels) == {"depth_1", "depth_2", "leaf"}  # the deepest level is "leaf"
    for values in levels.values():
        assert values["drop_points"] <= 1.0
        assert values["float"] > 0.9  # the tiny classes are easy: a broken pipeline would not get here
    assert m.metrics["agreement"] >= 0.95 and m.metrics["gate"]["passed"]
    assert m.edgetpu["status"] == "compiler not found" and "not on PATH" in m.edgetpu["summary"]
    assert m.edgetpu["static"]["compatible"], m.edgetpu["static"]
    assert MODEL_EDGETPU not in bundle.files and "not on PATH" in proc.stdout
    assert f"signed by {m.signing_key_id}" in proc.stdout and m.signing_key_id
    # The private key is in no file of the bundle and in no output.
    secret = (pub.parent / "k.key").read_text().splitlines()[1]
    assert secret.encode() not in bundle_path.read_bytes() and secret not in proc.stdout + proc.stderr
    # The golden set: 8 calibration images and exactly what the CPU interpreter gives for them.
    inputs, outputs = bundle.golden()
    assert m.golden == {"file": GOLDEN, "count": 8, "tolerance": 0, "unit": "quantized steps"}
    assert inputs.shape == (8, SIZE, SIZE, 3) and inputs.dtype == np.uint8 and outputs.dtype == np.uint8
    classifier = Classifier(bundle)
    embeddings = bundle.golden_embeddings()
    assert embeddings is not None and embeddings.shape == (8, 8)
    # per trained leaf, the unit mean embedding of its calibration images (what enrolled products must beat)
    centroids = bundle.centroids()
    assert centroids is not None and centroids.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-2)
    # ... and the whitening enrolled products are matched in (rank capped by the 8 features), with the
    # centroids again in it: each calibration image of a leaf is nearer its own leaf's centroid there
    space = bundle.embedding_space()
    assert space is not None and space.whitening is not None and space.whitening.basis.shape == (8, 8)
    assert space.centroids is not None and space.centroids.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(space.centroids, axis=1), 1.0, atol=1e-2)
    for image, expected, embedding in zip(inputs, outputs, embeddings, strict=True):
        np.testing.assert_array_equal(classifier.raw(image), expected)
        np.testing.assert_array_equal(classifier.raw_embedding(), embedding)
    # The device decodes and classifies a validation image correctly with this bundle.
    from taxonedge.edge.kernel.preprocess import load_image

    splits = json.loads((tiny_convert_run / "splits.json").read_text())
    correct = [
        bundle.taxonomy.leaf_labels[int(classifier.probabilities(load_image(p, m.input)).argmax())] == label
        for p, label in splits["val"]
    ]
    assert np.mean(correct) > 0.9


def test_probability_output_makes_a_v2_bundle_for_older_daemons(tiny_convert_run, tmp_path):
    out = tmp_path / "v2.tebundle"
    args = ("convert", "--run", str(tiny_convert_run), "--out", str(out), "--calibration-images", "32")
    # This tiny model's uint8 probabilities reach no 0.98-precise depth-1 threshold on 2 views of each
    # validation image: a bundle that would call every product `unknown` is refused, and --force writes it
    # all the same.
    args += ("--calibration-views", "2")
    refused = run_cli(*args, "--outputs", "probabilities", check=False)
    assert refused.returncode == 1 and not out.exists()
    assert "no depth-1 back-off threshold reaches precision 0.980" in refused.stderr
    assert "publish `unknown` for every product" in refused.stderr and "--force" in refused.stderr
    run_cli(*args, "--outputs", "probabilities", "--force")
    bundle = read_bundle(out)
    m = bundle.manifest
    assert m.format_version == 2 and m.embedding is None and m.open_set is None
    assert m.output.kind == "leaf_probabilities" and m.output.scale == pytest.approx(1 / 256)
    inputs, _ = bundle.golden()
    probs = Classifier(bundle).probabilities(inputs[0])
    assert probs.sum() == pytest.approx(1.0, abs=0.02)


def test_gate_refuses_and_writes_nothing(tiny_convert_run, tmp_path):
    out = tmp_path / "refused.tebundle"
    # A negative allowance demands that int8 beat float by 50 points at every level: impossible.
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--max-drop",
        "-50",
        "--calibration-images",
        "16",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "accuracy gate failed" in proc.stderr
        and "depth_1" in proc.stderr
        and "no bundle written" in proc.stderr
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp file left either
    forced = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--max-drop",
        "-50",
        "--calibration-images",
        "16",
        "--force",
        "--edgetpu",
        "skip",
    )
    assert "FORCED" in forced.stdout
    m = read_bundle(out).manifest
    assert m.metrics["gate"]["passed"] is False and m.edgetpu["status"] == "skipped"


def test_gate_refuses_a_model_that_loses_accuracy_in_int8(tmp_path, tiny_convert_run):
    """A real int8 loss, not a flag: the trained features are concatenated with a constant channel of 5000
    that the classifier ignores. Float predictions are unchanged, but int8 shares one scale over the
    concatenation (a step of about 20), which rounds the informative features to zero."""
    import keras
    from taxonedge.convert.converter import GateError, Options, convert

    run = copy_run(tiny_convert_run, tmp_path / "run")
    trained = keras.saving.load_model(run / "model.keras")
    dense = trained.layers[-2]
    features = trained.layers[-3].output
    big = keras.layers.Dense(
        1, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(5000.0)
    )
    joined = keras.layers.Concatenate()([features, big(features)])
    head = keras.layers.Dense(dense.units)
    lossy = keras.Model(trained.inputs, keras.layers.Softmax()(head(joined)))
    kernel, bias = dense.get_weights()
    head.set_weights([np.concatenate([kernel, np.zeros((1, dense.units), "float32")]), bias])
    lossy.save(run / "model.keras")
    with pytest.raises(GateError, match="accuracy gate failed") as err:
        convert(Options(run=run, out=tmp_path / "b.tebundle", calibration_images=16, edgetpu="skip"))
    assert "agreement" in str(err.value)
    assert not (tmp_path / "b.tebundle").exists()


@pytest.mark.parametrize("mode", ["float16", "dynamic"])
def test_cpu_modes_are_labelled_and_refused_for_the_edgetpu(tiny_convert_run, tmp_path, mode):
    out = tmp_path / f"{mode}.tebundle"
    refused = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--mode",
        mode,
        "--edgetpu",
        "require",
        check=False,
    )
    assert refused.returncode == 1 and "needs full int8" in refused.stderr and not out.exists()
    run_cli("convert", "--run", str(tiny_convert_run), "--out", str(out), "--mode", mode)
    bundle = read_bundle(out)
    m = bundle.manifest
    assert m.quantization.mode == mode and m.input.dtype == "float32" and m.output.dtype == "float32"
    assert m.edgetpu["status"] == "not applicable"
    inputs, outputs = bundle.golden()
    np.testing.assert_allclose(Classifier(bundle).raw(inputs[0]), outputs[0], atol=m.golden["tolerance"])


def test_absent_compiler_with_require_fails_cleanly(tiny_convert_run, tmp_path):
    out = tmp_path / "b.tebundle"
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--edgetpu",
        "require",
        "--calibration-images",
        "16",
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert proc.returncode == 1 and "edgetpu_compiler is not on PATH" in proc.stderr and not out.exists()


def _fake_compiler(folder: Path, log_name: str, exit_code: int = 0) -> Path:
    """A stand-in for Coral's edgetpu_compiler (which cannot be installed here): it prints a recorded real
    log and writes the outputs where the real one does (-o DIR), so our subprocess, parsing and bundling
    code runs for real up to the tool boundary."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "edgetpu_compiler"
    exe.write_text(
        "#!/bin/sh\n"
        '# args: -s -o OUTDIR MODEL\nout="$3"; model="$4"\n'
        f'cat "{DATA / log_name}"\n'
        f'[ {exit_code} -eq 0 ] && cp "$model" "$out/model_edgetpu.tflite" && echo "# compiled" >> '
        '"$out/model_edgetpu.log"\n'
        f"exit {exit_code}\n"
    )
    exe.chmod(0o755)
    return folder


def test_compiler_on_path_adds_the_edgetpu_model(tiny_convert_run, tmp_path):
    bin_dir = _fake_compiler(tmp_path / "bin", "edgetpu_compiler_all_mapped.log")
    out = tmp_path / "tpu.tebundle"
    run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--edgetpu",
        "require",
        "--calibration-images",
        "16",
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    bundle = read_bundle(out)
    report = bundle.manifest.edgetpu
    assert report["status"] == "compiled" and report["compiler"]["all_mapped"]
    assert (
        report["compiler"]["edgetpu_ops"] == 67 and report["compiler"]["compiler_version"] == "16.0.384591198"
    )
    assert bundle.files[MODEL_EDGETPU] == bundle.files[MODEL]  # what the (stand-in) compiler wrote


def test_compiler_that_maps_only_part_fails_require(tiny_convert_run, tmp_path):
    bin_dir = _fake_compiler(tmp_path / "bin", "edgetpu_compiler_partial.log")
    out = tmp_path / "tpu.tebundle"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--edgetpu",
        "require",
        "--calibration-images",
        "16",
        env=env,
        check=False,
    )
    assert proc.returncode == 1 and "125 ops run on the CPU" in proc.stderr and "HARD_SWISH" in proc.stderr
    assert not out.exists()
    # auto: shipped, with the partial report and the compiled model (it still runs, partly on the CPU).
    run_cli(
        "convert", "--run", str(tiny_convert_run), "--out", str(out), "--calibration-images", "16", env=env
    )
    assert read_bundle(out).manifest.edgetpu["status"] == "partially mapped"


def test_compiler_failure_ships_cpu_model_in_auto_mode(tiny_convert_run, tmp_path):
    bin_dir = _fake_compiler(tmp_path / "bin", "edgetpu_compiler_op_version.log", exit_code=1)
    out = tmp_path / "b.tebundle"
    run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--calibration-images",
        "16",
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
    )
    bundle = read_bundle(out)
    assert bundle.manifest.edgetpu["status"] == "compile failed"
    assert "FULLY_CONNECTED' version '12'" in bundle.manifest.edgetpu["summary"]
    assert MODEL_EDGETPU not in bundle.files


# ---- bad input ------------------------------------------------------------------------------------
def _convert_fails(run: Path, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "never.tebundle"
    proc = run_cli(
        "convert", "--run", str(run), "--out", str(out), "--calibration-images", "8", *extra, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "no bundle written" in proc.stderr
    assert not out.exists()
    return proc.stderr


def test_incomplete_run_dir(tiny_convert_run, tmp_path):
    run = copy_run(tiny_convert_run, tmp_path / "run")
    (run / "splits.json").unlink()
    (run / "calibration.json").unlink()
    err = _convert_fails(run, tmp_path)
    assert "missing calibration.json, splits.json" in err


def test_corrupt_files_in_run_dir(tiny_convert_run, tmp_path):
    run = copy_run(tiny_convert_run, tmp_path / "run")
    (run / "input_spec.json").write_text('{"height": 32,\n "width": }')
    assert "input_spec.json: not valid JSON at line 2" in _convert_fails(run, tmp_path)
    shutil.copy(tiny_convert_run / "input_spec.json", run / "input_spec.json")
    (run / "model.keras").write_bytes(b"PK\x03\x04 truncated")
    assert "model.keras: cannot load the Keras model" in _convert_fails(run, tmp_path)


def test_taxonomy_that_does_not_match_the_model(tiny_convert_run, tmp_path):
    run = copy_run(tiny_convert_run, tmp_path / "run")
    bigger = Taxonomy.from_paths([*TINY_LABELS, "Vegetables/Leek"], name="tiny")
    (run / "taxonomy.json").write_text(json.dumps(bigger.to_dict()))
    err = _convert_fails(run, tmp_path)
    assert "outputs 4 classes but taxonomy.json has 5 leaves" in err


def test_model_with_ops_that_cannot_be_integer(tiny_convert_run, tmp_path):
    import keras

    run = copy_run(tiny_convert_run, tmp_path / "run")
    trained = keras.saving.load_model(run / "model.keras")
    # sparsemax lowers to CUMSUM, TOPK_V2, DIV...: the converter leaves them float even in int8-only mode.
    sparse = keras.layers.Activation("sparsemax")(trained.layers[-2].output)
    keras.Model(trained.inputs, sparse).save(run / "model.keras")
    # with the default logits output the converter refuses the model before converting: no softmax to drop
    assert "does not end in a softmax" in _convert_fails(run, tmp_path)
    err = _convert_fails(run, tmp_path, "--outputs", "probabilities")
    assert "not fully integer" in err and "CUMSUM" in err and "--mode dynamic" in err


def test_split_label_not_in_taxonomy(tiny_convert_run, tmp_path):
    run = copy_run(tiny_convert_run, tmp_path / "run")
    splits = json.loads((run / "splits.json").read_text())
    splits["val"][3][1] = "Fruit/Durian"
    (run / "splits.json").write_text(json.dumps(splits))
    assert "val[3] has label 'Fruit/Durian'" in _convert_fails(run, tmp_path)


def test_unreadable_calibration_set(tiny_convert_run, tmp_path):
    run = copy_run(tiny_convert_run, tmp_path / "run")
    broken = tmp_path / "broken"
    broken.mkdir()
    splits = json.loads((run / "splits.json").read_text())
    for i, item in enumerate(splits["train"]):
        bad = broken / f"{i}.jpg"
        bad.write_bytes(b"\xff\xd8 not really a jpeg")
        item[0] = str(bad)
    (run / "splits.json").write_text(json.dumps(splits))
    err = _convert_fails(run, tmp_path)
    assert "no usable calibration images" in err and "not a decodable image" in err


def test_empty_calibration_set(tiny_convert_run, tmp_path):
    run = copy_run(tiny_convert_run, tmp_path / "run")
    splits = json.loads((run / "splits.json").read_text())
    (run / "splits.json").write_text(json.dumps({**splits, "train": []}))
    assert "the train list is empty" in _convert_fails(run, tmp_path)


def test_bad_sign_key_fails_before_any_work(tiny_convert_run, tmp_path):
    (tmp_path / "not.key").write_text("hello")
    assert "not a readable unencrypted PEM private key" in _convert_fails(
        tiny_convert_run, tmp_path, "--sign-key", str(tmp_path / "not.key")
    )


def test_qat_for_a_backbone_the_trainer_cannot_rebuild(tiny_convert_run, tmp_path):
    out = tmp_path / "never.tebundle"
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--qat",
        "yes",
        "--calibration-images",
        "8",
        "--qat-images",
        "8",
        check=False,
    )
    assert proc.returncode == 1 and "quantization-aware training failed" in proc.stderr
    assert "unknown backbone 'tiny-cnn'" in proc.stderr and not out.exists()
    # --qat auto: the gate's numbers stay in the message, with the reason QAT could not help.
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--qat",
        "auto",
        "--max-drop",
        "-50",
        "--calibration-images",
        "8",
        "--qat-images",
        "8",
        check=False,
    )
    assert proc.returncode == 1 and "accuracy gate failed" in proc.stderr and "leaf" in proc.stderr
    assert "--qat auto could not run quantization-aware training" in proc.stderr and not out.exists()


def test_target_precision_overrides_the_runs_for_the_deployed_thresholds(
    converted, tiny_convert_run, tmp_path
):
    default = read_bundle(converted[0]).manifest
    out = tmp_path / "strict.tebundle"
    run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(out),
        "--calibration-images",
        "32",
        "--edgetpu",
        "skip",
        "--target-precision",
        "1.0",
    )
    strict = read_bundle(out).manifest
    assert strict.metrics["thresholds"]["target_precision"] == 1.0
    assert default.metrics["thresholds"]["target_precision"] == 0.98  # the run's, when not given
    for depth, row in strict.metrics["backoff_deployed"].items():
        if depth.startswith("depth_") and row["count"]:
            assert row["precision"] == 1.0 or strict.thresholds[depth] == 1.0, (depth, row)
    # same int8 model and validation outputs: a stricter target never lowers a threshold
    assert all(strict.thresholds[d] >= default.thresholds[d] for d in default.thresholds)
    proc = run_cli(
        "convert",
        "--run",
        str(tiny_convert_run),
        "--out",
        str(tmp_path / "x.tebundle"),
        "--target-precision",
        "0",
        check=False,
    )
    assert (
        proc.returncode == 2 and "between 0 and 1" in proc.stderr and not (tmp_path / "x.tebundle").exists()
    )


def test_calibration_views_set_how_many_views_of_each_validation_image_choose_the_thresholds(
    converted, tiny_convert_run, tmp_path
):
    from taxonedge.train.calibrate import DEFAULT_VIEWS, occasion_shift, occasion_views

    from taxonedge.cli import build_parser

    n_val = len(json.loads((tiny_convert_run / "splits.json").read_text())["val"])
    default = read_bundle(converted[0]).manifest.metrics["thresholds"]
    assert (
        default["occasion_views"] == DEFAULT_VIEWS and default["calibration_images"] == DEFAULT_VIEWS * n_val
    )
    args = build_parser().parse_args(["convert", "--run", "r", "--out", "o"])
    assert args.calibration_views == DEFAULT_VIEWS  # the CLI's default is the library's
    out = tmp_path / "three.tebundle"
    run_cli(
        "convert", "--run", str(tiny_convert_run), "--out", str(out), "--edgetpu", "skip",
        "--calibration-shift", "1", "--calibration-views", "3",
    )  # fmt: skip
    three = read_bundle(out).manifest.metrics["thresholds"]
    assert (three["occasion_shift"], three["occasion_views"], three["calibration_images"]) == (
        1.0,
        3,
        3 * n_val,
    )
    proc = run_cli("convert", "--run", str(tiny_convert_run), "--out", str(tmp_path / "x.tebundle"),
                   "--calibration-views", "0", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--calibration-views" in proc.stderr
    assert not (tmp_path / "x.tebundle").exists()
    # the views are made a chunk of images at a time, image by image, with the draw of occasion_shift
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    views = np.stack(list(occasion_views(images, 1.5, 3, seed=4, chunk=2)))
    assert views.shape == (15, 16, 16, 3)
    assert np.array_equal(views[:6], occasion_shift(images[:2], 1.5, 3, seed=4))
    assert np.array_equal(views[12:], occasion_shift(images[4:], 1.5, 3, seed=8))
    whole = np.stack(list(occasion_views(images, 1.5, 3, seed=4, chunk=5)))
    assert np.array_equal(whole, occasion_shift(images, 1.5, 3, seed=4))


def test_centroid_weight_adds_the_whitened_centroid_vote_to_the_scores_the_device_decides_on(
    converted, tiny_convert_run, tmp_path
):
    """--centroid-weight W: the device decides on (logits + W x the cosine of the frame's embedding to each
    leaf's whitened centroid) / T, T fitted on the calibration views; convert chooses the thresholds and the
    open set on exactly those scores, and a bundle without the term leaves the field out (older daemons
    refuse unknown manifest keys)."""
    import io
    import pickle

    from taxonedge.edge.kernel.bundle import (
        CENTROIDS,
        BundleError,
        FileEntry,
        sha256_hex,
        write_bundle,
    )
    from taxonedge.edge.kernel.decode import leaf_probabilities
    from taxonedge.edge.kernel.preprocess import load_image
    from taxonedge.edge.kernel.runtime import InterpreterModel
    from taxonedge.train.metrics import backoff

    out = tmp_path / "centroid.tebundle"
    args = ("convert", "--run", str(tiny_convert_run), "--calibration-images", "32", "--edgetpu", "skip")
    run_cli(*args, "--out", str(out), "--centroid-weight", "3", "--force")
    bundle = read_bundle(out)
    m = bundle.manifest
    term = m.output.centroid
    assert term is not None and term.weight == 3.0 and 0.05 <= term.temperature <= 20.0
    assert m.metrics["thresholds"]["centroid"] == term.model_dump()
    assert json.loads(bundle.manifest_bytes)["output"]["centroid"] == term.model_dump()
    assert "centroid" not in json.loads(read_bundle(converted[0]).manifest_bytes)["output"]
    shown = run_cli("inspect", str(out)).stdout
    assert f"centroid   scores = (logits + 3 x whitened centroid cosine) / {term.temperature:g}" in shown
    report = tmp_path / "eval"
    run_cli(
        "evaluate",
        "--bundle",
        str(out),
        "--data",
        str(tiny_convert_run / "splits.json"),
        "--out",
        str(report),
    )
    assert (
        f"scores = (logits + 3 x whitened centroid cosine) / {term.temperature:g}"
        in (report / "report.md").read_text()
    )
    assert json.loads((report / "metrics.json").read_text())["source"]["centroid"] == term.model_dump()

    # The scores, by hand from one invoke's two raw outputs, in the worker's copy of the model as well.
    space = bundle.embedding_space()
    classifier = Classifier(bundle)
    worker = Classifier(pickle.loads(pickle.dumps(InterpreterModel.of(bundle))))
    out_spec, emb_spec = m.output, m.embedding
    inputs, _ = bundle.golden()
    moved = 0.0
    for image in inputs:
        logits = out_spec.scale * (classifier.raw(image).astype(np.float32) - out_spec.zero_point)
        embedding = emb_spec.scale * (classifier.raw_embedding().astype(np.float32) - emb_spec.zero_point)
        whitened = space.whitening.apply(embedding)
        cosines = np.array([whitened @ c / np.linalg.norm(c) for c in space.centroids])
        expected = (logits + 3.0 * cosines) / term.temperature
        np.testing.assert_allclose(classifier.scores(image), expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(worker.scores(image), expected, rtol=1e-4, atol=1e-4)
        moved = max(moved, float(np.abs(expected - logits).max()))
    assert moved > 0.1  # the term changes the scores

    # What convert reports for the deployed thresholds is what the device's scores give on the val images.
    splits = json.loads((tiny_convert_run / "splits.json").read_text())
    scores = np.stack([classifier.scores(load_image(p, m.input)) for p, _ in splits["val"]])
    y = np.array([bundle.taxonomy.leaf_index(label) for _, label in splits["val"]])
    unfamiliar = scores.max(axis=1) < m.open_set.threshold
    row = backoff(bundle.taxonomy, leaf_probabilities(scores, "leaf_logits"), y, m.thresholds, unfamiliar)
    reported = m.metrics["backoff_deployed"]
    for depth in ("depth_1", "depth_2"):
        assert row[depth]["coverage"] == pytest.approx(reported[depth]["coverage"]), depth
    assert m.metrics["thresholds"]["deployed_leaf_accuracy"] == pytest.approx(
        np.mean(scores.argmax(axis=1) == y)
    )

    # A bundle that sets the term without the whitened centroids is refused by name.
    with np.load(io.BytesIO(bundle.files[CENTROIDS])) as data:
        raw_only = io.BytesIO()
        np.savez(raw_only, centroids=data["centroids"])
    files = {**bundle.files, CENTROIDS: raw_only.getvalue()}
    entries = {
        **m.files,
        CENTROIDS: FileEntry(sha256=sha256_hex(files[CENTROIDS]), size=len(files[CENTROIDS])),
    }
    write_bundle(tmp_path / "broken.tebundle", m.model_copy(update={"files": entries}), files)
    with pytest.raises(BundleError, match="output.centroid is set but centroids.npz has no whitened"):
        read_bundle(tmp_path / "broken.tebundle")
    files[CENTROIDS] = b"PK\x03\x04 not an npz"
    entries[CENTROIDS] = FileEntry(sha256=sha256_hex(files[CENTROIDS]), size=len(files[CENTROIDS]))
    write_bundle(tmp_path / "garbage.tebundle", m.model_copy(update={"files": entries}), files)
    with pytest.raises(BundleError, match="centroids.npz cannot be read"):
        read_bundle(tmp_path / "garbage.tebundle")

    # Bad values fail before any work, with nothing written.
    for extra, message in (
        (("--centroid-weight", "-1"), "not 0 or a positive number"),
        (("--centroid-weight", "3", "--outputs", "probabilities"), "needs --outputs logits"),
    ):
        proc = run_cli(*args, "--out", str(tmp_path / "x.tebundle"), *extra, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "x.tebundle").exists()


def test_help_lists_the_options():
    out = run_cli("convert", "--help").stdout
    for option in (
        "--run",
        "--out",
        "--mode",
        "--qat",
        "--calibration-images",
        "--max-drop",
        "--force",
        "--sign-key",
        "--edgetpu",
        "--name",
        "--version",
        "--centroid-weight",
        "--calibration-views",
    ):
        assert option in out
