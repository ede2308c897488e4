"""`taxonedge evaluate --bundle B --belt CLIP`: a belt clip with per-frame truth scored as the device would
publish it, empty-belt detection included.

The truth is CLIP's stem with .json beside it (examples/demo/belt.json): `fps`, `lead_in` (the frames of
empty belt at the start) and `product` (per frame: the label path in view, or null), and optionally
`coverage` (per frame: the share of the frame the product covers, 0 for empty belt). The empty belt is
learned from the lead-in frames as learn_empty keeps them (edge/kernel/emptybelt.py, with the margin and
floor of the device's `[no_item]` config: its defaults unless given); every later frame is decoded with the
bundle's own thresholds and open set, then taken for no item when its embedding is close enough to the
empty belt, as the daemon does.

Frames after the lead-in fall in three groups, as bench/bench_no_item.py has them: between products (null),
product frames (a label; with `coverage`, at least half the frame) and partly visible products (less than
half: either answer is fair for them, so they are reported on their own).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from taxonedge.edge.kernel.emptybelt import MARGIN, MIN_FRAMES, MIN_SIMILARITY, EmptyBelt
from taxonedge.edge.kernel.files import atomic_write
from taxonedge.edge.kernel.preprocess import preprocess

from . import data as data_mod

PRODUCT_COVERAGE = 0.5  # less of the frame than this: a partly visible product
BETWEEN_GOAL = 0.01  # at most this share of frames between products published as a product
LABELLED_GOAL = 0.99  # at least this share of product frames keeps its label (not taken for no item)
TRUTH_KEYS = {"fps", "lead_in", "product", "coverage"}


class BeltError(ValueError):
    """A clip or truth file that cannot be scored; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Truth:
    fps: float
    lead_in: int
    product: list[str | None]
    coverage: list[float] | None


@dataclass(frozen=True)
class Outcome:
    """One scored frame: the model's own label, how close it is to the empty belt, what is published."""

    label: str | None  # the decoder's (accepted or backed off), before the no-item check
    path: tuple[str, ...]
    similarity: float
    no_item: bool

    @property
    def published(self) -> str | None:
        return None if self.no_item else self.label


# ---- the truth file -------------------------------------------------------------------------------
def truth_path(clip: Path) -> Path:
    return clip.with_suffix(".json")


def read_truth(path: Path) -> Truth:
    """The truth file, checked; BeltError names the first thing wrong with it."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise BeltError(f"{path}: no truth file (per-frame truth, as examples/demo/belt.json)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BeltError(f"{path}: not a readable JSON truth file ({exc})") from None
    if not isinstance(raw, dict):
        raise BeltError(f"{path}: the truth must be a JSON object with fps, lead_in and product")
    _check_keys(path, raw)
    fps, lead_in, product = raw["fps"], raw["lead_in"], raw["product"]
    if not _number(fps) or fps <= 0:
        raise BeltError(f"{path}: fps must be a positive number, not {fps!r}")
    if isinstance(lead_in, bool) or not isinstance(lead_in, int) or lead_in < MIN_FRAMES:
        raise BeltError(
            f"{path}: lead_in must be a whole number of frames, at least {MIN_FRAMES} (what learn_empty "
            f"needs to learn the empty belt), not {lead_in!r}"
        )
    _check_product(path, product, lead_in)
    coverage = raw.get("coverage")
    if coverage is not None:
        _check_coverage(path, coverage, product)
    return Truth(float(fps), lead_in, product, coverage)


def _check_keys(path: Path, raw: dict) -> None:
    unknown = sorted(set(raw) - TRUTH_KEYS)
    if unknown:
        raise BeltError(
            f"{path}: unknown key(s) {', '.join(unknown)} (a truth file has fps, lead_in, product and "
            "optionally coverage)"
        )
    missing = [key for key in ("fps", "lead_in", "product") if key not in raw]
    if missing:
        raise BeltError(f"{path}: no {', '.join(missing)}")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_product(path: Path, product: object, lead_in: int) -> None:
    if not isinstance(product, list):
        raise BeltError(f"{path}: product must be a list with one entry per frame: a label path or null")
    if len(product) <= lead_in:
        raise BeltError(f"{path}: lead_in is {lead_in} frames, product has {len(product)}: nothing to score")
    for i, label in enumerate(product):
        if label is not None and (not isinstance(label, str) or not label.strip("/ ")):
            raise BeltError(f"{path}: product[{i}] must be a label path or null, not {label!r}")
        if label is not None and i < lead_in:
            raise BeltError(
                f"{path}: product[{i}] is {label!r}, inside the lead-in (its first {lead_in} frames must "
                "show the empty belt)"
            )


def _check_coverage(path: Path, coverage: object, product: list) -> None:
    if not isinstance(coverage, list) or len(coverage) != len(product):
        raise BeltError(f"{path}: coverage must be a list as long as product ({len(product)} frames)")
    for i, (share, label) in enumerate(zip(coverage, product, strict=True)):
        if not _number(share) or not 0 <= share <= 1:
            raise BeltError(f"{path}: coverage[{i}] must be a share between 0 and 1, not {share!r}")
        if (share == 0) != (label is None):
            raise BeltError(
                f"{path}: frame {i} has product {label!r} and coverage {share}: coverage is 0 exactly on the "
                "empty belt"
            )


def groups(truth: Truth) -> dict[str, list[int]]:
    """Frame indices per group, the lead-in left out."""
    rest = range(truth.lead_in, len(truth.product))
    cover = truth.coverage or [0.0 if p is None else 1.0 for p in truth.product]
    return {
        "between_products": [i for i in rest if truth.product[i] is None],
        "product": [i for i in rest if truth.product[i] is not None and cover[i] >= PRODUCT_COVERAGE],
        "partly_visible": [i for i in rest if truth.product[i] is not None and cover[i] < PRODUCT_COVERAGE],
    }


def as_model_leaves(truth: Truth, taxonomy, where: Path) -> Truth:
    """The truth's labels as the model's leaves (by class name where the hierarchy differs, as --data);
    a product the model does not have is refused."""
    labels = sorted({p for p in truth.product if p is not None})
    samples = [data_mod.Sample(str(where), label) for label in labels]
    leaves = dict(
        zip(labels, (s.label for s in data_mod.model_leaves(taxonomy, samples, str(where))), strict=True)
    )
    product = [None if p is None else leaves[p] for p in truth.product]
    return Truth(truth.fps, truth.lead_in, product, truth.coverage)


# ---- the clip -------------------------------------------------------------------------------------
def check_clip(clip: Path, truth: Truth, where: Path) -> None:
    """Before any frame is classified: BeltError when the clip cannot be read, or its frame rate or count is
    not the truth's (counted by grabbing frames, without decoding them)."""
    import cv2

    cap = cv2.VideoCapture(str(clip))
    try:
        if not cap.isOpened():
            raise BeltError(f"{clip}: not a readable video")
        rate = cap.get(cv2.CAP_PROP_FPS)
        if rate > 0 and abs(rate - truth.fps) > 0.01 * truth.fps:
            raise BeltError(f"{clip} runs at {rate:g} fps, its truth {where} says {truth.fps:g}")
        count = 0
        while cap.grab():
            count += 1
    finally:
        cap.release()
    if count != len(truth.product):
        raise BeltError(f"{clip} has {count} frames, its truth {where} describes {len(truth.product)}")


def read_frames(clip: Path) -> Iterator[np.ndarray]:
    """The clip's frames, BGR, as the device's video source reads them."""
    import cv2

    cap = cv2.VideoCapture(str(clip))
    try:
        while (got := cap.read())[0]:
            yield got[1]
    finally:
        cap.release()


def score_frames(
    classifier, decoder, frames: Iterator[np.ndarray], truth: Truth, spec, learn: Callable[[list], EmptyBelt]
) -> tuple[EmptyBelt, np.ndarray, list[Outcome]]:
    """The empty belt learned (`learn`) from the lead-in, the lead-in's similarities to it, and an outcome
    for every later frame."""
    from tqdm import tqdm

    lead: list[np.ndarray] = []
    belt: EmptyBelt | None = None
    outcomes: list[Outcome] = []
    for i, frame in enumerate(tqdm(frames, total=len(truth.product), desc="belt frames", leave=False)):
        scores, embedding = classifier.outputs(preprocess(frame, spec))
        if i < truth.lead_in:
            lead.append(embedding)
            continue
        if belt is None:
            belt = learn(lead)
        decision = decoder.decode(scores)
        similarity = belt.similarity(embedding)
        outcomes.append(Outcome(decision.label, decision.path, similarity, similarity >= belt.threshold))
    assert belt is not None  # read_truth: at least one frame after the lead-in
    return belt, np.array([belt.similarity(e) for e in lead]), outcomes


# ---- figures --------------------------------------------------------------------------------------
def share(count: int, total: int) -> float | None:
    return count / total if total else None


def figures(truth: Truth, outcomes: list[Outcome]) -> dict:
    """Per group: what was published. Right for a product frame: its leaf, or a parent on its path."""
    at = {truth.lead_in + k: o for k, o in enumerate(outcomes)}
    group = groups(truth)
    between = [at[i] for i in group["between_products"]]
    products = [(at[i], tuple(truth.product[i].split("/"))) for i in group["product"]]
    partly = [at[i] for i in group["partly_visible"]]
    right = sum(o.published is not None and o.path == path[: len(o.path)] for o, path in products)
    n = len(products)
    return {
        "between_products": {
            "frames": len(between),
            "published_as_product": share(sum(o.published is not None for o in between), len(between)),
        },
        "product": {
            "frames": n,
            "still_labelled": share(sum(not o.no_item for o, _ in products), n),
            "with_a_label": share(sum(o.published is not None for o, _ in products), n),
            "labelled_right": share(right, n),
        },
        "partly_visible": {
            "frames": len(partly),
            "as_product": share(sum(o.published is not None for o in partly), len(partly)),
            "no_item": share(sum(o.no_item for o in partly), len(partly)),
        },
    }


def goals(figs: dict) -> dict:
    published = figs["between_products"]["published_as_product"]
    labelled = figs["product"]["still_labelled"]
    return {
        "between_products_published_max": BETWEEN_GOAL,
        "product_still_labelled_min": LABELLED_GOAL,
        "met": (published is None or published <= BETWEEN_GOAL)
        and (labelled is None or labelled >= LABELLED_GOAL),
    }


def learned(belt: EmptyBelt, lead: np.ndarray) -> dict:
    """What learn_empty would answer about the empty belt it learned."""
    return {
        "frames": len(lead),
        "threshold": round(belt.threshold, 4),
        "similarity": {
            "min": round(float(lead.min()), 4),
            "median": round(float(np.median(lead)), 4),
            "max": round(float(lead.max()), 4),
        },
    }


def headroom(truth: Truth, outcomes: list[Outcome]) -> dict:
    """The similarities nearest the threshold on either side (every similarity at or above it is no item)."""
    group = groups(truth)

    def extreme(name: str, pick) -> float | None:
        sims = [outcomes[i - truth.lead_in].similarity for i in group[name]]
        return round(float(pick(sims)), 4) if sims else None

    return {
        "between_products_lowest": extreme("between_products", min),
        "product_highest": extreme("product", max),
        "partly_visible_highest": extreme("partly_visible", max),
    }


# ---- the command ----------------------------------------------------------------------------------
def evaluate_belt(
    clip: Path,
    out: Path,
    bundle_path: Path,
    num_threads: int | None = None,
    margin: float = MARGIN,
    min_similarity: float = MIN_SIMILARITY,
) -> dict:
    """Score `clip` against its truth with the bundle's model, the empty belt learned with `margin` and
    `min_similarity` (the device config's `[no_item]`); write OUT/metrics.json, report.md and frames.csv;
    return the metrics."""
    from taxonedge.edge.kernel.bundle import read_bundle
    from taxonedge.edge.kernel.runtime import Classifier

    from .evaluate import bundle_decoder

    bundle = read_bundle(bundle_path)
    if bundle.manifest.embedding is None:
        raise BeltError(
            f"--belt: bundle {bundle_path} has no embedding output, so the empty belt cannot be learned "
            "(convert with --outputs logits for a v3 bundle)"
        )
    where = truth_path(clip)
    truth = as_model_leaves(read_truth(where), bundle.taxonomy, where)
    check_clip(clip, truth, where)
    classifier = Classifier(bundle, num_threads=num_threads)
    frames = read_frames(clip)
    learn = functools.partial(EmptyBelt.learned, margin=margin, min_similarity=min_similarity)
    belt, lead, outcomes = score_frames(
        classifier, bundle_decoder(bundle), frames, truth, bundle.manifest.input, learn
    )
    figs = figures(truth, outcomes)
    metrics = {
        "belt": {
            "clip": str(clip.resolve()),
            "truth": str(where.resolve()),
            "frames": len(truth.product),
            "fps": truth.fps,
            "lead_in": truth.lead_in,
            "learned": {**learned(belt, lead), "margin": margin, "min_similarity": min_similarity},
            **figs,
            "headroom": headroom(truth, outcomes),
            "goals": goals(figs),
        },
        "source": {"kind": "bundle", "bundle": str(Path(bundle_path).resolve()), **bundle.describe()},
    }
    write_belt_reports(Path(out), metrics, truth, outcomes)
    return metrics


def write_belt_reports(out: Path, metrics: dict, truth: Truth, outcomes: list[Outcome]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2, ensure_ascii=False) + "\n").encode())
    atomic_write(out / "report.md", belt_report(metrics).encode())
    buf = io.StringIO()
    table = csv.writer(buf, lineterminator="\n")
    table.writerow(["frame", "truth", "model_label", "similarity", "no_item", "published"])
    for k, o in enumerate(outcomes):
        i = truth.lead_in + k
        table.writerow(
            [
                i,
                truth.product[i] or "",
                o.label or "",
                f"{o.similarity:.4f}",
                int(o.no_item),
                o.published or "",
            ]
        )
    atomic_write(out / "frames.csv", buf.getvalue().encode())


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def summary_lines(belt: dict) -> list[str]:
    """The figures in a few lines (the command's output, and report.md's opening)."""
    between, product, partly = belt["between_products"], belt["product"], belt["partly_visible"]
    goal = belt["goals"]
    lines = [
        f"belt clip ({belt['frames']} frames, empty belt learned from the first {belt['lead_in']}: threshold "
        f"{belt['learned']['threshold']}):",
        f"between products ({between['frames']} frames): {percent(between['published_as_product'])} "
        f"published as a product (goal <= {percent(goal['between_products_published_max'])})",
        f"product frames ({product['frames']}): {percent(product['still_labelled'])} still labelled (goal >= "
        f"{percent(goal['product_still_labelled_min'])}), {percent(product['with_a_label'])} with a product "
        f"label, {percent(product['labelled_right'])} labelled right (leaf or correct parent)",
    ]
    if partly["frames"]:
        lines.append(
            f"partly visible products ({partly['frames']}): {percent(partly['as_product'])} as a product, "
            f"{percent(partly['no_item'])} no item"
        )
    lines.append("empty-belt goals " + ("met" if goal["met"] else "NOT met"))
    return lines


def belt_report(metrics: dict) -> str:
    belt, source = metrics["belt"], metrics["source"]
    sims, room = belt["learned"]["similarity"], belt["headroom"]
    lines = [
        f"# Belt evaluation: {source['bundle']}",
        "",
        f"Clip `{belt['clip']}`, truth `{belt['truth']}`, {belt['fps']:g} fps. Frames are decoded with the "
        "bundle's thresholds and open set; a frame whose embedding is at least the threshold similar to the "
        "empty belt learned from the lead-in is no item and publishes no product, as on the device.",
        "",
        *[f"- {line}" for line in summary_lines(belt)],
        "",
        "## Empty belt",
        "",
        f"Learned from {belt['learned']['frames']} lead-in frames (margin {belt['learned']['margin']}, floor "
        f"{belt['learned']['min_similarity']}): similarity to their mean min {sims['min']}, median "
        f"{sims['median']}, max {sims['max']}; threshold {belt['learned']['threshold']}.",
        "",
        "| nearest the threshold | similarity |",
        "|---|---|",
        *[
            f"| {name.replace('_', ' ')} | {value if value is not None else 'n/a'} |"
            for name, value in room.items()
        ],
        "",
        "Per frame: frames.csv.",
        "",
    ]
    return "\n".join(lines)
