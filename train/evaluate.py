"""`taxonedge evaluate`: a run (Keras, float) or a bundle (int8 through LiteRT) on a labelled image set.

Both paths read images with the shared `load_image` and score with the same `compute_metrics`, so float and
int8 numbers are comparable. Writes DIR/metrics.json, confusion.png, reliability.png, report.md and
predictions.npz (the probabilities, for image-by-image comparisons).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from taxonedge.edge.kernel.bundle import CentroidTerm
from taxonedge.edge.kernel.decode import Decoder, leaf_probabilities
from taxonedge.edge.kernel.files import atomic_write
from taxonedge.edge.kernel.taxonomy import Taxonomy

from . import data as data_mod
from . import rundir
from .calibrate import DEFAULT_THRESHOLD_RULE, THRESHOLD_RULES, check_thresholds
from .metrics import backoff, compute_metrics, confusion_matrix, depth_keys

log = logging.getLogger(__name__)


def predict_run(run_dir: Path, images: np.ndarray) -> np.ndarray:
    """Leaf probabilities of the run's model.keras (temperature already folded in)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(rundir.model_path(run_dir), compile=False)
    return np.asarray(model.predict(images.astype(np.float32), batch_size=32, verbose=0), dtype=np.float64)


def predict_bundle(classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(leaf probabilities, leaf scores) of a bundle's model through
    `taxonedge.edge.kernel.runtime.Classifier`, image by image; the scores are the logits of a v3 bundle
    (the probabilities of older ones)."""
    from tqdm import tqdm

    scores = np.stack(
        [classifier.scores(img) for img in tqdm(images, desc="int8 inference", unit="img", leave=False)]
    ).astype(np.float64)
    return leaf_probabilities(scores, classifier.model.output_kind), scores


def evaluate(
    data: str | Path,
    out: Path,
    run_dir: Path | None = None,
    bundle_path: Path | None = None,
    num_threads: int | None = None,
    fit_precision: float | None = None,
    fit_rule: str = DEFAULT_THRESHOLD_RULE,
    novel_products: bool = False,
) -> dict:
    """Evaluate exactly one of `run_dir` or `bundle_path` on `data`; write the reports; return metrics.
    `fit_precision`: also choose back-off thresholds on these images by `fit_rule` (see `fit_thresholds`).
    `novel_products`: images whose label the model does not have are products it was not trained on,
    scored as such (`score_novel`) instead of refused."""
    if (run_dir is None) == (bundle_path is None):
        raise ValueError("give exactly one of run_dir and bundle_path")
    samples = data_mod.read_samples(data)
    classifier = None
    if run_dir is not None:
        taxonomy, spec, thresholds = rundir.read_meta(Path(run_dir))
        source = {"kind": "keras", "run": str(Path(run_dir).resolve())}
    else:
        from taxonedge.edge.kernel.bundle import read_bundle
        from taxonedge.edge.kernel.runtime import Classifier

        bundle = read_bundle(bundle_path)
        classifier = Classifier(bundle, num_threads=num_threads)
        taxonomy, spec, thresholds = bundle.taxonomy, bundle.manifest.input, dict(bundle.manifest.thresholds)
        source = {
            "kind": "bundle",
            "bundle": str(Path(bundle_path).resolve()),
            **bundle.describe(),
            "quantization": bundle.manifest.quantization.mode,
        }
        if bundle.manifest.output.centroid is not None:
            source["centroid"] = bundle.manifest.output.centroid.model_dump()
    # labels as the model's leaves (by class name where the data's hierarchy differs); unknown labels fail
    # before any image is decoded
    novel: list[data_mod.Sample] | None = [] if novel_products else None
    samples = data_mod.model_leaves(taxonomy, samples, str(data), novel)
    images, kept, errors = data_mod.load_images(samples, spec, "eval images")
    y_true = data_mod.leaf_indices(taxonomy, kept, str(data))
    unfamiliar, decoder, scores = None, None, None
    if classifier is None:
        probs = predict_run(Path(run_dir), images)
    else:
        probs, scores = predict_bundle(classifier, images)
        decoder = bundle_decoder(bundle)
        if decoder.open_set_threshold is not None:
            unfamiliar = scores.max(axis=1) < decoder.open_set_threshold
    metrics = compute_metrics(taxonomy, y_true, probs, thresholds, unfamiliar)
    if unfamiliar is not None:
        right = probs.argmax(axis=1) == y_true
        metrics["open_set"] = {
            "threshold": decoder.open_set_threshold,
            "known_rejected": float(unfamiliar.mean()),
            "rejected_right": int((unfamiliar & right).sum()),
            "rejected_wrong": int((unfamiliar & ~right).sum()),
        }
    if novel:
        if decoder is None:
            raise data_mod.DataError("--novel-products needs a --bundle (the device's decision)")
        metrics["novel_products"] = score_novel(taxonomy, decoder, classifier, novel, spec)
    if fit_precision is not None:
        metrics["fitted_thresholds"] = fit_thresholds(taxonomy, y_true, probs, fit_precision, rule=fit_rule)
    metrics["source"] = {**source, "data": str(Path(data).resolve()), "skipped_images": errors}
    write_reports(out, taxonomy, metrics, y_true, probs, scores)
    return metrics


def bundle_decoder(bundle) -> Decoder:
    """The device's decoder for a bundle, with its own thresholds and open-set threshold."""
    open_set = bundle.manifest.open_set
    return Decoder(
        bundle.taxonomy,
        bundle.manifest.thresholds,
        kind=bundle.manifest.output.kind,
        open_set_threshold=open_set.threshold if open_set is not None else None,
    )


def score_novel(taxonomy: Taxonomy, decoder: Decoder, classifier, samples: list, spec) -> dict:
    """What the device publishes for products the model was not trained on. Right is `unknown`, or a
    parent on the product's own path that the taxonomy has (`Fruit/Apple` for a new apple); wrong is any
    other label, a product the item is not."""
    images, kept, errors = data_mod.load_images(samples, spec, "novel product images")
    outcomes = {"unknown": 0, "unfamiliar": 0, "correct_parent": 0, "wrong": 0}
    per_label: dict[str, dict[str, int]] = {}
    for image, sample in zip(images, kept, strict=True):
        decision = decoder.decode(classifier.scores(image))
        truth = tuple(sample.label.split("/"))
        if decision.decision == "unknown":
            outcome = "unknown"
            outcomes["unfamiliar"] += decision.reason == "unfamiliar"
        elif truth[: len(decision.path)] == decision.path and len(decision.path) < len(truth):
            outcome = "correct_parent"
        else:
            outcome = "wrong"
        outcomes[outcome] += 1
        row = per_label.setdefault(sample.label, {"unknown": 0, "correct_parent": 0, "wrong": 0})
        row[outcome] += 1
    n = len(kept)
    return {
        "n": n,
        "labels": len(per_label),
        "safe": (outcomes["unknown"] + outcomes["correct_parent"]) / n if n else None,
        "unknown": outcomes["unknown"] / n if n else None,
        "unfamiliar": outcomes["unfamiliar"] / n if n else None,
        "correct_parent": outcomes["correct_parent"] / n if n else None,
        "wrong": outcomes["wrong"] / n if n else None,
        "per_label": per_label,
        "skipped_images": errors,
    }


def fit_thresholds(
    taxonomy: Taxonomy,
    y_true: np.ndarray,
    probs: np.ndarray,
    target_precision: float,
    repeats: int = 5,
    rule: str = DEFAULT_THRESHOLD_RULE,
) -> dict:
    """Back-off thresholds chosen on these images (say, photos from the line a device will serve), with a
    two-fold check of what they are worth on new images of the same kind (`check_thresholds`).

    Thresholds reach their precision on the images they were chosen on, and not necessarily elsewhere:
    chosen on a slice of Grocery's training occasions they promise 99 % at the leaf and give 87 % on val's
    occasions. So a line recalibrates on its own photos, and the check tells whether there are enough."""
    thresholds = THRESHOLD_RULES[rule](taxonomy, probs, y_true, target_precision)
    return {
        "target_precision": target_precision,
        "rule": rule,
        "thresholds": thresholds,
        "two_fold_repeats": repeats,
        "on_these_images": backoff(taxonomy, probs, y_true, thresholds),
        "two_fold": check_thresholds(taxonomy, probs, y_true, target_precision, repeats, rule),
    }


def thresholds_toml(thresholds: dict[str, float]) -> str:
    """The device config lines that put `thresholds` in force (`[model] thresholds`)."""
    values = ", ".join(f"{key} = {value!r}" for key, value in thresholds.items())
    return f"[model]\nthresholds = {{{values}}}"


def write_reports(
    out: Path,
    taxonomy: Taxonomy,
    metrics: dict,
    y_true: np.ndarray,
    probs: np.ndarray,
    scores: np.ndarray | None = None,
) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    # the raw predictions, so two evaluations can be compared image by image (float vs int8 agreement);
    # a bundle's leaf scores too (the logits of a v3 bundle: what open-set and threshold studies need)
    arrays = {"probs": probs.astype(np.float32), "true_leaf": y_true}
    if scores is not None:
        arrays["scores"] = scores.astype(np.float32)
    np.savez_compressed(out / "predictions.npz", **arrays)
    _plot_confusion(out / "confusion.png", taxonomy, y_true, probs.argmax(axis=1))
    _plot_reliability(out / "reliability.png", metrics["calibration"])
    atomic_write(out / "report.md", markdown_report(taxonomy, metrics).encode())


def _plot_confusion(path: Path, taxonomy: Taxonomy, y_true: np.ndarray, pred: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = confusion_matrix(taxonomy.num_leaves, y_true, pred).astype(np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = min(24.0, 4.0 + 0.18 * taxonomy.num_leaves)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(taxonomy.num_leaves)
    names = [leaf.name for leaf in taxonomy.leaves]
    fontsize = max(4, min(10, int(400 / max(1, taxonomy.num_leaves))))
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted leaf")
    ax.set_ylabel("true leaf")
    ax.set_title(f"Confusion (row-normalised), leaf accuracy {metrics_accuracy(y_true, pred):.3f}")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metrics_accuracy(y_true: np.ndarray, pred: np.ndarray) -> float:
    return float((np.asarray(y_true) == np.asarray(pred)).mean())


def _plot_reliability(path: Path, calibration: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in calibration["bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.bar(centres, [b["accuracy"] for b in bins], width=0.09, alpha=0.7, label="accuracy in bin")
    ax.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o-",
        color="C1",
        label="mean confidence vs accuracy",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"Reliability (ECE {calibration['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fitted_section(taxonomy: Taxonomy, fitted: dict | None) -> list[str]:
    if not fitted:
        return []
    lines = [
        "",
        f"## Thresholds fitted on these images (target precision {fitted['target_precision']}, rule "
        f"`{fitted.get('rule', 'per_depth')}`)",
        "",
        "| depth | threshold | coverage | precision here | precision, two-fold check |",
        "|---|---|---|---|---|",
    ]
    here, check = fitted["on_these_images"], fitted["two_fold"]
    for d in range(1, taxonomy.depth + 1):
        key = f"depth_{d}"
        lines.append(
            f"| {d} | {fitted['thresholds'][key]:.3f} | {percent(here[key]['coverage'])} | "
            f"{percent(here[key]['precision'])} | {percent(check[key]['precision'])} |"
        )
    if "published" in check:
        lines.append(
            f"| published (any depth) | | {percent(1.0 - here['decisions']['unknown'])} | "
            f"{percent(here['published_precision'])} | {percent(check['published']['precision'])} |"
        )
    lines += ["", "For the device config:", "", "```toml", thresholds_toml(fitted["thresholds"]), "```"]
    return lines


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown_report(taxonomy: Taxonomy, metrics: dict) -> str:
    source = metrics.get("source", {})
    lines = [
        f"# Evaluation: {source.get('run') or source.get('bundle', '')}",
        "",
        f"Data: `{source.get('data', '')}`, {metrics['n']} images, {metrics['classes_present']} of "
        f"{metrics['num_classes']} classes present. Model: {source.get('kind', '')}"
        + (f" ({source['quantization']})" if source.get("quantization") else "")
        + ("; " + CentroidTerm.model_validate(source["centroid"]).formula() if source.get("centroid") else "")
        + ".",
        "",
        "## Accuracy per level",
        "",
        "| level | nodes | top-1 (argmax leaf) | top-1 (summed probabilities) |",
        "|---|---|---|---|",
    ]
    for key, depth in depth_keys(taxonomy):
        lines.append(
            f"| {key} | {len(taxonomy.level_nodes(depth))} | {percent(metrics['accuracy'][key])} | "
            f"{percent(metrics['accuracy_summed'][key])} |"
        )
    h = metrics["hierarchical"]
    sev = metrics["mistake_severity"]
    lines += [
        "",
        f"Top-5: {percent(metrics['top5'])}. Macro-F1 (classes present): {metrics['macro_f1']:.3f}. "
        f"Hierarchical P/R/F1: {h['precision']:.3f} / {h['recall']:.3f} / {h['f1']:.3f}. "
        f"Mistake severity: {sev['mean']:.2f} levels over {sev['mistakes']} mistakes. "
        f"NLL {metrics['nll']:.3f}, ECE {metrics['calibration']['ece']:.3f}.",
        "",
        "## Back-off (device decoding with the model's thresholds)",
        "",
        "| depth | threshold | coverage | precision |",
        "|---|---|---|---|",
    ]
    backoff = metrics["backoff"]
    for d in range(1, taxonomy.depth + 1):
        row = backoff[f"depth_{d}"]
        lines.append(
            f"| {d} | {row['threshold']:.3f} | {percent(row['coverage'])} | {percent(row['precision'])} |"
        )
    dec = backoff["decisions"]
    lines += [
        "",
        f"Decisions: accepted (leaf) {percent(dec['accepted'])}, backed off {percent(dec['backed_off'])}, "
        "unknown "
        f"{percent(dec['unknown'])}; precision of the published label "
        f"{percent(backoff['published_precision'])}.",
        *_fitted_section(taxonomy, metrics.get("fitted_thresholds")),
        "",
        "## Per class",
        "",
        "| class | support | precision | recall | F1 | most confused with |",
        "|---|---|---|---|---|---|",
    ]
    for row in metrics["per_class"]:
        if row["support"]:
            lines.append(
                f"| {row['label']} | {row['support']} | {percent(row['precision'])} | "
                f"{percent(row['recall'])} "
                f"| {row['f1']:.3f} | {row.get('most_confused_with', '')} |"
            )
    skipped = source.get("skipped_images") or []
    if skipped:
        lines += ["", f"## Skipped images ({len(skipped)})", ""] + [f"- {e}" for e in skipped]
    lines += ["", "![confusion](confusion.png) ![reliability](reliability.png)", ""]
    return "\n".join(lines)
