"""`taxonedge convert`: a trained run directory -> a checked, optionally signed, model bundle.

Steps: check the run -> load calibration and validation images (shared preprocessing) -> float predictions
-> quantize (post-training; quantization-aware in a separate process when asked or when the gate fails
with --qat auto) -> accuracy gate -> Edge TPU checks -> golden self-test set -> write the bundle atomically.
Any failure before the last step leaves no file behind.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from taxonedge.edge.kernel.bundle import (
    CENTROIDS,
    GOLDEN,
    MODEL,
    CentroidTerm,
    EmbeddingSpec,
    ModelInfo,
    OpenSet,
    Quantization,
    build_manifest,
    utc_now,
    whitened_space,
    write_bundle,
)
from taxonedge.edge.kernel.decode import leaf_probabilities
from taxonedge.edge.kernel.preprocess import InputSpec
from taxonedge.edge.kernel.prototypes import EmbeddingSpace, centroid_scores
from taxonedge.edge.kernel.runtime import dequantize
from taxonedge.edge.kernel.thresholds import threshold_key
from taxonedge.train.backbones import find_backbone
from taxonedge.train.calibrate import (
    DEFAULT_THRESHOLD_RULE,
    DEFAULT_VIEWS,
    choose_and_check_thresholds,
    fit_temperature,
    occasion_views,
)
from taxonedge.train.metrics import agreement, backoff, compute_metrics
from taxonedge.train.model import export_model
from taxonedge.train.rundir import Run, RunDirError, load_run

from .qat import QatError

log = logging.getLogger(__name__)
GOLDEN_COUNT = 8


class GateError(RuntimeError):
    """The bundle would not serve: int8 lost more accuracy than allowed (the message has the numbers per
    level), or no threshold lets a label through at depth 1."""


@dataclass
class Options:
    run: Path
    out: Path
    mode: str = "int8"
    qat: str = "no"  # no | yes | auto
    calibration_images: int = 300
    # training images behind the bundle's centroids and whitening (centroids.npz): a few per class leave
    # the centroids too noisy for enrolled products (docs/benchmarks.md "Enrolled products")
    centroid_images: int = 2000
    max_drop: float = 1.0  # percentage points, per level
    target_precision: float | None = None  # for the deployed thresholds; None: the run's
    threshold_rule: str = DEFAULT_THRESHOLD_RULE  # what the target applies to (train/calibrate.py)
    force: bool = False
    edgetpu: str = "auto"  # auto | require | skip
    name: str | None = None
    version: str | None = None
    sign_key: Path | None = None
    qat_epochs: int = 1
    qat_images: int = 1000
    seed: int = 0
    compiler: str | None = None
    outputs: str = "logits"  # logits: leaf logits + embedding (format v3) | probabilities (v2, older daemons)
    open_set_pass_rate: float | None = 0.98  # known images the open-set threshold lets through; None: off
    calibration_shift: float = 2.0  # thresholds chosen on views of val as other occasions show them; 0: off
    calibration_views: int = DEFAULT_VIEWS  # views of each validation image, with calibration_shift
    # leaf scores = logits + this x the cosine to each leaf's whitened centroid (docs/trust.md); 0: off
    centroid_weight: float = 0.0


@dataclass
class Result:
    path: Path
    manifest: Any
    gate: dict[str, Any]
    edgetpu: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def convert(opts: Options) -> Result:
    from taxonedge.edge.kernel.signing import load_private_key

    from . import edgetpu as tpu
    from .quantize import io_details, run_tflite, stratified, to_tflite
    from .targets import TARGETS

    timings: dict[str, float] = {}
    started = time.perf_counter()
    if opts.mode != "int8" and opts.edgetpu == "require":
        raise tpu.EdgeTpuError(f"--mode {opts.mode} cannot run on the Edge TPU (it needs full int8)")
    if opts.mode != "int8" and opts.qat == "yes":
        raise ValueError("--qat yes makes a full-int8 model: it cannot be combined with --mode " + opts.mode)
    if opts.calibration_views < 1:
        raise ValueError(f"--calibration-views {opts.calibration_views}: must be 1 or more")
    if opts.centroid_weight < 0 or not np.isfinite(opts.centroid_weight):
        raise ValueError(f"--centroid-weight {opts.centroid_weight}: must be 0 (off) or positive")
    if opts.centroid_weight and opts.outputs != "logits":
        raise ValueError("--centroid-weight adds to the leaf logits: it needs --outputs logits")
    sign_key = load_private_key(opts.sign_key) if opts.sign_key else None  # fail fast, before hours of work
    run = load_run(opts.run)
    calib_items = stratified(run.train, opts.calibration_images, opts.seed)
    calib, calib_y = _load(calib_items, run.input_spec, "calibration images")
    val_x, val_y = _load(run.val, run.input_spec, "validation images")
    timings["load_images_s"] = time.perf_counter() - started

    t = time.perf_counter()
    model, keras = _load_keras_model(run)
    float_probs = _predict(model, val_x)
    timings["float_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    qat_used = opts.qat == "yes"
    if qat_used:
        tflite = _qat(run, model, opts, calib)
    else:
        exported = export_model(model, keras) if opts.outputs == "logits" else model
        tflite = to_tflite(exported, keras, opts.mode, calib if opts.mode == "int8" else None)
    timings["convert_s"] = time.perf_counter() - t
    _check_integer(tflite, opts.mode)
    t = time.perf_counter()
    info = io_details(tflite)
    quant_outputs = run_tflite(tflite, val_x, f"evaluating {opts.mode}")
    quant_scores = _scores(quant_outputs, info)
    quant_probs = leaf_probabilities(quant_scores, info["output_kind"])
    gate = accuracy_gate(run, val_y, float_probs, quant_probs, opts.max_drop, opts.mode)
    timings["quant_eval_s"] = time.perf_counter() - t
    if not gate["passed"] and opts.qat == "auto" and opts.mode == "int8":
        log.warning(
            "post-training int8 misses the gate (%s); trying quantization-aware training", gate["message"]
        )
        t = time.perf_counter()
        try:
            qat_tflite = _qat(run, model, opts, calib)
        except QatError as exc:  # keep the numbers the user needs, and say why QAT did not help
            gate["message"] += f"; --qat auto could not run quantization-aware training: {exc}"
        else:
            tflite, qat_used = qat_tflite, True
            _check_integer(tflite, opts.mode)
            info = io_details(tflite)
            quant_outputs = run_tflite(tflite, val_x, "evaluating QAT int8")
            quant_scores = _scores(quant_outputs, info)
            quant_probs = leaf_probabilities(quant_scores, info["output_kind"])
            ptq_gate = gate
            gate = accuracy_gate(run, val_y, float_probs, quant_probs, opts.max_drop, opts.mode)
            gate["post_training"] = {k: ptq_gate[k] for k in ("drop_points", "passed")}
        timings["qat_s"] = time.perf_counter() - t
    gate["forced"] = bool(not gate["passed"] and opts.force)
    if not gate["passed"] and not opts.force:
        raise GateError(
            gate["message"]
            + " (pass --force to write the bundle anyway, or raise --max-drop"
            + (", or try --qat auto" if opts.mode == "int8" and opts.qat == "no" else "")
            + ")"
        )
    if not gate["passed"]:
        log.warning("writing the bundle despite the gate (--force): %s", gate["message"])

    # The device decides on the quantized model's outputs: choose its back-off thresholds on those, so the
    # published labels reach the target precision as deployed, not only in float.
    # ... and on views of the validation images as other occasions would show them (`occasion_shift`): the
    # validation images share the training images' occasions more than a line's camera does.
    target = opts.target_precision or run.target_precision
    cal_outputs, cal_y, views = quant_outputs, val_y, 1
    if opts.calibration_shift > 0:
        views = opts.calibration_views
        shifted = occasion_views(val_x, opts.calibration_shift, views, opts.seed)
        cal_outputs = run_tflite(tflite, shifted, "calibrating on shifted views", len(val_x) * views)
        cal_y = np.repeat(val_y, views)
    # The centroids come from the quantized model too; with --centroid-weight the scores add their term,
    # its temperature fitted on the same views as the thresholds.
    centroids = _embedding_space(tflite, info, run, opts) if info["embedding"] is not None else None
    term, space = _centroid_term(centroids, opts.centroid_weight, cal_outputs, cal_y, info)
    quant_scores = _scores(quant_outputs, info, term, space)
    quant_probs = leaf_probabilities(quant_scores, info["output_kind"])
    cal_scores = _scores(cal_outputs, info, term, space)
    cal_probs = leaf_probabilities(cal_scores, info["output_kind"])
    thresholds, check = choose_and_check_thresholds(
        run.taxonomy, cal_probs, cal_y, target, opts.threshold_rule, views
    )
    if thresholds[threshold_key(1)] >= 1.0:
        useless = (
            f"no depth-1 back-off threshold reaches precision {target:.3f} on the {len(cal_y)} calibration "
            "views: the device would publish `unknown` for every product"
        )
        if not opts.force:
            raise GateError(
                useless + " (lower --target-precision, validate the run on more images, or pass --force)"
            )
        log.warning("writing the bundle anyway (--force): %s", useless)
    gate["metrics"]["thresholds"] = {
        "float_calibration": run.thresholds,
        "deployed": thresholds,
        "target_precision": target,
        "rule": opts.threshold_rule,
        "occasion_shift": opts.calibration_shift,
        "occasion_views": views if opts.calibration_shift > 0 else 0,
        "centroid": term.model_dump() if term is not None else None,
        "deployed_leaf_accuracy": float(np.mean(quant_probs.argmax(axis=1) == val_y)),
        "calibration_images": int(len(cal_y)),
        "two_fold_check": check,
    }
    open_set = None
    if info["output_kind"] == "leaf_logits" and opts.open_set_pass_rate is not None:
        open_set = fit_open_set(cal_scores, opts.open_set_pass_rate)
        gate["metrics"]["open_set"] = open_set_report(open_set, quant_scores, quant_probs, val_y)
    unfamiliar = quant_scores.max(axis=1) < open_set.threshold if open_set is not None else None
    gate["metrics"]["backoff_deployed"] = backoff(run.taxonomy, quant_probs, val_y, thresholds, unfamiliar)

    t = time.perf_counter()
    reports, compiled = {}, {}
    for target in TARGETS.values():  # convert/targets.py: one per accelerator backend
        reports[target.name], artifact = target.build(
            tflite, opts.mode, run.backbone, opts.edgetpu, opts.compiler
        )
        if artifact is not None:
            compiled[target.artifact] = artifact
        for warning in reports[target.name].get("warnings", []):
            log.warning("%s: %s", target.name, warning)
        log.info("%s: %s", target.name, reports[target.name]["summary"])
    timings["edgetpu_s"] = time.perf_counter() - t
    report = reports["edgetpu"]

    golden_inputs = calib[:GOLDEN_COUNT]
    golden_outputs = run_tflite(tflite, golden_inputs)
    golden_arrays = {
        "inputs": golden_inputs.astype(info["input_dtype"]),
        "outputs": golden_outputs[info["output_name"]],
    }
    if info["embedding"] is not None:
        golden_arrays["embeddings"] = golden_outputs[info["embedding"]["name"]]
    files = {MODEL: tflite, GOLDEN: _npz(**golden_arrays)}
    if centroids is not None:
        files[CENTROIDS] = _npz(**centroids)
    files.update(compiled)
    spec = run.input_spec.model_copy(
        update={
            "dtype": info["input_dtype"],
            "scale": info["input_scale"],
            "zero_point": info["input_zero_point"],
        }
    )
    output = {
        "name": info["output_name"],
        "kind": info["output_kind"],
        "dtype": info["output_dtype"],
        "scale": info["output_scale"],
        "zero_point": info["output_zero_point"],
        "centroid": term,
    }
    integer = info["output_dtype"] in ("uint8", "int8")
    manifest = build_manifest(
        model=ModelInfo(
            name=opts.name or _default_name(run),
            version=opts.version or _default_version(),
            created_at=utc_now(),
            backbone=run.backbone,
            description=f"converted from {run.path.resolve().name} ({opts.mode}"
            + (", quantization-aware" if qat_used else "")
            + ")",
        ),
        taxonomy=run.taxonomy,
        input_spec=InputSpec.model_validate(spec.model_dump()),
        output=output,
        files=files,
        quantization=Quantization(mode=opts.mode, qat=qat_used, calibration_images=len(calib)),
        thresholds=thresholds,
        temperature=run.temperature,
        embedding=EmbeddingSpec(**info["embedding"]) if info["embedding"] is not None else None,
        open_set=open_set,
        metrics=gate["metrics"],
        edgetpu=report,
        golden={
            "file": GOLDEN,
            "count": int(len(golden_inputs)),
            # CPU interpreters must reproduce integer outputs exactly; float outputs within rounding.
            "tolerance": 0 if integer else 1e-4,
            "unit": "quantized steps" if integer else "probability",
        },
    )
    if sign_key is not None:  # write_bundle records the key id in what it writes; say it here too
        from taxonedge.edge.kernel.signing import key_id

        manifest = manifest.model_copy(update={"signing_key_id": key_id(sign_key.public_key())})
    write_bundle(opts.out, manifest, files, sign_key=sign_key)
    timings["total_s"] = time.perf_counter() - started
    return Result(Path(opts.out), manifest, gate, report, timings)


def accuracy_gate(
    run: Run,
    true_leaf: np.ndarray,
    float_probs: np.ndarray,
    quant_probs: np.ndarray,
    max_drop: float,
    mode: str,
) -> dict[str, Any]:
    """Float vs quantized per-level accuracy with the metrics code of `taxonedge evaluate`."""
    if not np.all(np.isfinite(quant_probs)):
        raise GateError(f"the {mode} model gives NaN or infinite outputs on validation images")
    slim = ("n", "accuracy", "accuracy_summed", "top5", "macro_f1", "hierarchical", "mistake_severity", "nll")
    m_float = compute_metrics(run.taxonomy, true_leaf, float_probs, run.thresholds)
    m_quant = compute_metrics(run.taxonomy, true_leaf, quant_probs, run.thresholds)
    levels = {}
    for key, acc in m_float["accuracy"].items():
        q = m_quant["accuracy"][key]
        levels[key] = {"float": acc, mode: q, "drop_points": round((acc - q) * 100, 3)}
    worst = max(levels, key=lambda k: levels[k]["drop_points"])
    passed = all(v["drop_points"] <= max_drop for v in levels.values())
    agree = agreement(float_probs, quant_probs)
    message = (
        f"{mode} accuracy drop per level (points, max allowed {max_drop:g}): "
        + ", ".join(
            f"{k} {v['float'] * 100:.1f} -> {v[mode] * 100:.1f} ({v['drop_points']:+.1f})"
            for k, v in levels.items()
        )
        + f"; top-1 agreement {agree * 100:.1f}% on {len(true_leaf)} val images"
    )
    if not passed:
        message = f"accuracy gate failed at {worst}: " + message
    metrics = {
        "float": {k: m_float[k] for k in slim},
        mode: {k: m_quant[k] for k in slim},
        "agreement": agree,
        "per_level": levels,
        "gate": {"max_drop_points": max_drop, "passed": passed},
    }
    return {
        "passed": passed,
        "message": message,
        "drop_points": {k: v["drop_points"] for k, v in levels.items()},
        "agreement": agree,
        "metrics": metrics,
    }


def _load(items: list[tuple[str, int]], spec: InputSpec, desc: str) -> tuple[np.ndarray, np.ndarray]:
    from taxonedge.train.data import DataError, Sample, load_images

    index = {path: leaf for path, leaf in items}
    try:
        images, kept, errors = load_images([Sample(path, "") for path, _ in items], spec, desc)
    except DataError as exc:
        raise RunDirError(f"no usable {desc}: {exc}") from None
    if errors:
        log.warning(
            "%d of %d %s could not be read and were skipped (first: %s)",
            len(errors),
            len(items),
            desc,
            errors[0],
        )
    return images, np.array([index[s.path] for s in kept], dtype=np.int64)


def _load_keras_model(run: Run) -> tuple[Any, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    try:
        model = keras.saving.load_model(run.model_path, compile=False)
    except Exception as exc:  # Keras raises many types for a damaged or foreign file
        raise RunDirError(f"{run.model_path}: cannot load the Keras model: {str(exc)[:300]}") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise RunDirError(
            f"{run.model_path}: the model has {len(model.inputs)} inputs and {len(model.outputs)} "
            "outputs; a classifier run has exactly one of each"
        )
    expected = (run.input_spec.height, run.input_spec.width, 3)
    if tuple(model.input_shape[1:]) != expected:
        raise RunDirError(
            f"{run.model_path}: input shape {tuple(model.input_shape[1:])} does not match "
            f"input_spec.json {expected}"
        )
    classes = model.output_shape[-1]
    if len(model.output_shape) != 2 or classes != run.taxonomy.num_leaves:
        raise RunDirError(
            f"{run.model_path}: the model outputs {classes} classes but taxonomy.json has "
            f"{run.taxonomy.num_leaves} leaves: the taxonomy does not belong to this model"
        )
    return model, keras


def _predict(model: Any, images: np.ndarray, batch: int = 32) -> np.ndarray:
    from tqdm import tqdm

    out = [
        model.predict_on_batch(images[i : i + batch].astype(np.float32))
        for i in tqdm(range(0, len(images), batch), desc="evaluating float", unit="batch", leave=False)
    ]
    return np.concatenate([np.asarray(o) for o in out])


def _qat(run: Run, model: Any, opts: Options, calib: np.ndarray) -> bytes:
    from .qat import run_qat
    from .quantize import stratified

    entry = find_backbone(run.backbone)
    if entry is not None and entry.qat_note:
        log.warning("quantization-aware training of %s: %s", entry.name, entry.qat_note)
    items = stratified(run.train, opts.qat_images, opts.seed + 1)
    images, labels = _load(items, run.input_spec, "QAT training images")
    return run_qat(
        run, model, images, labels, calib, epochs=opts.qat_epochs, seed=opts.seed, outputs=opts.outputs
    )


def _check_integer(tflite: bytes, mode: str) -> None:
    """The converter can leave float ops in an "int8" model (it did for sparsemax); refuse such a model."""
    from .edgetpu import check_model
    from .quantize import QuantizationError

    if mode != "int8":
        return
    static = check_model(tflite)
    if static["float_tensors"]:
        raise QuantizationError(
            f"the model is not fully integer: {static['float_tensors']} float tensors, used by "
            f"{', '.join(static['float_ops'])} (ops without an int8 kernel; replace them, or use --mode "
            "dynamic "
            "for a CPU-only model)"
        )


def _scores(
    outputs: dict[str, np.ndarray],
    info: dict[str, Any],
    term: CentroidTerm | None = None,
    space: EmbeddingSpace | None = None,
) -> np.ndarray:
    """The leaf output of `run_tflite`'s outputs, dequantized: logits or probabilities; with a centroid
    term, the scores the device decides on (`centroid_scores`)."""
    scores = dequantize(outputs[info["output_name"]], info["output_scale"], info["output_zero_point"])
    if term is None:
        return scores
    emb = info["embedding"]
    embeddings = dequantize(outputs[emb["name"]], emb["scale"], emb["zero_point"])
    return centroid_scores(scores, embeddings, term.weight, space, term.temperature)


def _centroid_term(
    centroids: dict[str, np.ndarray] | None,
    weight: float,
    cal_outputs: dict[str, np.ndarray],
    cal_y: np.ndarray,
    info: dict[str, Any],
) -> tuple[CentroidTerm | None, EmbeddingSpace | None]:
    """The centroid term of `weight` (None when 0) with its temperature fitted on the calibration images,
    and the whitened space it is computed in, as the device will read it."""
    if not weight:
        return None, None
    if centroids is None or "whitened_centroids" not in centroids:
        raise ValueError(
            "--centroid-weight needs the model's embedding output and a whitening of it (training images "
            "with at least two per class; see --centroid-images): use --centroid-weight 0"
        )
    space = whitened_space(centroids)
    summed = _scores(cal_outputs, info, CentroidTerm(weight=weight), space)
    return CentroidTerm(weight=weight, temperature=round(fit_temperature(summed, cal_y), 6)), space


def _embedding_space(tflite: bytes, info: dict[str, Any], run: Run, opts: Options) -> dict[str, np.ndarray]:
    """centroids.npz from `opts.centroid_images` training images, drawn stratified, embedded in chunks
    (2000 decoded images at once would take gigabytes)."""
    from .quantize import stratified

    items = stratified(run.train, opts.centroid_images, opts.seed + 1)
    vectors, labels = [], []
    for start in range(0, len(items), 250):
        images, y = _load(items[start : start + 250], run.input_spec, "centroid images")
        vectors.append(embed_images(tflite, info, images))
        labels.append(y)
    return centroid_arrays(np.concatenate(vectors), np.concatenate(labels), run.taxonomy.num_leaves)


def embed_images(tflite: bytes, info: dict[str, Any], images: np.ndarray) -> np.ndarray:
    """The int8 model's embedding output for these images, dequantized (N x D)."""
    from .quantize import run_tflite

    emb = info["embedding"]
    raw = run_tflite(tflite, images, "embedding images")[emb["name"]]
    return dequantize(raw, emb["scale"], emb["zero_point"])


def centroid_arrays(vectors: np.ndarray, labels: np.ndarray, num_leaves: int) -> dict[str, np.ndarray]:
    """The arrays of centroids.npz: per leaf, the unit mean of the unit embeddings of its images (zeros
    for a leaf without one), what an enrolled product has to beat to override the model's own class; and,
    when the images measure a within-class spread, the whitening enrolled products are matched in
    (edge/kernel/prototypes.py) with the centroids again in that space. float16 for the matrices."""
    from taxonedge.edge.kernel.prototypes import EmbeddingSpace, Whitening, fit_whitening

    def centroids(space: EmbeddingSpace) -> np.ndarray:
        out = np.zeros((num_leaves, vectors.shape[1]), np.float32)
        for leaf in np.unique(labels):
            out[leaf] = space.prototype(vectors[labels == leaf])
        return out.astype(np.float16)

    arrays = {"centroids": centroids(EmbeddingSpace())}
    whitening = fit_whitening(vectors, labels)
    if whitening is not None:
        basis = whitening.basis.astype(np.float16)
        # the whitened centroids from the basis as the device will read it
        stored = Whitening(whitening.mean, basis.astype(np.float32), whitening.scales, whitening.residual)
        arrays |= {
            "whiten_mean": whitening.mean,
            "whiten_basis": basis,
            "whiten_scales": whitening.scales,
            "whiten_residual": np.float32(whitening.residual),
            "whitened_centroids": centroids(EmbeddingSpace(stored)),
        }
    return arrays


def fit_open_set(scores: np.ndarray, pass_rate: float) -> OpenSet:
    """The max-logit threshold that lets `pass_rate` of these images of known products through."""
    max_logit = np.asarray(scores, dtype=np.float64).max(axis=1)
    threshold = float(np.quantile(max_logit, 1.0 - pass_rate, method="lower"))
    return OpenSet(threshold=round(threshold, 6), known_pass_rate=pass_rate)


def open_set_report(open_set: OpenSet, scores: np.ndarray, probs: np.ndarray, y: np.ndarray) -> dict:
    """What the open-set threshold costs on known products: the share rejected, and how many of them the
    model had right (rejecting a wrong answer costs nothing)."""
    rejected = scores.max(axis=1) < open_set.threshold
    right = probs.argmax(axis=1) == y
    return {
        **open_set.model_dump(),
        "known_rejected": float(rejected.mean()),
        "rejected_right": int((rejected & right).sum()),
        "rejected_wrong": int((rejected & ~right).sum()),
    }


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # camera images compress well; the bundle travels over MQTT
    return buf.getvalue()


def _default_name(run: Run) -> str:
    name = run.config.get("name") or run.taxonomy.name or run.path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "model"


def _default_version() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d.%H%M%S")
