"""Can a logistics system trust the labels? Published precision and coverage on new occasions, products
the model was never trained on, and what the decision costs per frame, for a format v3 bundle.

Thresholds are chosen on `--calibration` images only (say the run's own holdout slice of train,
`RUN/splits.json`), by each rule of `train/calibrate.py` side by side, and scored on `--data` (say
Grocery's val list, other occasions): the question is whether thresholds hold where the model has not
been. `--target` may be given several times; a stricter target on the calibration images is the margin
that new occasions need. Images in `--data` whose label the model lacks are novel products (right:
unknown, or a correct parent that exists).

`--compare` adds a bundle of the same model with a uint8 probability output (`convert --outputs
probabilities`): at equal precision, how much coverage the float softmax of the logits buys, with each
model's thresholds chosen on the scored images themselves (an oracle for both, so only the ranking
differs).

`--frontier` asks what any thresholds could give this model: all depths' thresholds together over a grid,
chosen on the scored images themselves (an oracle), and the coverage pairs (reach depth 2, a leaf) that
no other grid point beats at each target precision of the published labels.

    .venv/bin/python bench/bench_trust.py --bundle B.tebundle --calibration RUN/splits.json \
        --data ../shared/data/grocery/dataset/val.txt [--compare B_v2.tebundle] [--target 0.98 ...] \
        [--shift 0 --shift 1.5 ...] [--views 8] [--frontier]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from taxonedge.convert.converter import fit_open_set
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.decode import Decoder
from taxonedge.edge.kernel.prototypes import centroid_scores
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.train import data as data_mod
from taxonedge.train.calibrate import DEFAULT_VIEWS, THRESHOLD_RULES, choose_thresholds, occasion_views
from taxonedge.train.evaluate import predict_bundle, score_novel
from taxonedge.train.metrics import backoff


def load(
    bundle, source: str, novel: list | None = None, shift: float = 0.0, views: int = DEFAULT_VIEWS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probabilities, leaf scores, true leaf) of `source`'s images of known products; with `shift`, of
    `views` views of each as other occasions would show them (what `convert --calibration-shift` and
    `--calibration-views` use)."""
    samples = data_mod.model_leaves(bundle.taxonomy, data_mod.read_samples(source), source, novel)
    images, kept, _ = data_mod.load_images(samples, bundle.manifest.input, Path(source).name)
    y = data_mod.leaf_indices(bundle.taxonomy, kept, source)
    if shift > 0:
        images, y = occasion_views(images, shift, views), np.repeat(y, views)
    probs, scores = predict_bundle(Classifier(bundle), images)
    return probs, scores, y


def published(taxonomy, probs, y, thresholds, unfamiliar=None) -> str:
    row = backoff(taxonomy, probs, y, thresholds, unfamiliar)
    depths = " / ".join(f"{100 * row[f'depth_{d}']['coverage']:5.1f}" for d in range(1, taxonomy.depth + 1))
    precision = row["published_precision"]
    return (
        f"right {100 * precision:5.1f} % | reach d1/d2/d3 {depths} % | "
        f"leaf {100 * row['decisions']['accepted']:5.1f} % | "
        f"unknown {100 * row['decisions']['unknown']:5.1f} %"
        if precision is not None
        else "nothing published"
    )


def ranking(taxonomy, probs, y, target: float) -> str:
    """Coverage at `target` precision with thresholds chosen on these very images (the best any threshold
    can do: it compares how well two outputs rank their answers, not how thresholds transfer)."""
    return published(
        taxonomy, probs, y, choose_thresholds(taxonomy, probs, y, target, min_count=1, warn=False)
    )


FRONTIER_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)


def frontier(taxonomy, probs, y, target: float) -> list[tuple[float, float, float, tuple[float, ...]]]:
    """(reach depth 2, a leaf, published precision, thresholds) of the grid points whose published labels
    are right at least `target` of the time and that no other such point beats on both coverages."""
    points = []
    for thresholds in itertools.product(FRONTIER_GRID, repeat=taxonomy.depth):
        row = backoff(taxonomy, probs, y, {f"depth_{d + 1}": t for d, t in enumerate(thresholds)})
        precision = row["published_precision"]
        if precision is not None and precision >= target:
            points.append((row["depth_2"]["coverage"], row["decisions"]["accepted"], precision, thresholds))
    best = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in points)]
    return sorted({p[:2]: p for p in best}.values(), reverse=True)


def decision_cost(bundle, scores: np.ndarray, runs: int) -> tuple[float, float]:
    """(median ms of one frame's decision: the centroid term when the bundle has one, then the decode with
    the open-set check; median invoke ms), side by side."""
    classifier = Classifier(bundle, num_threads=1)
    image = np.zeros((bundle.manifest.input.height, bundle.manifest.input.width, 3), np.uint8)
    term, space = bundle.manifest.output.centroid, bundle.embedding_space()
    _, embedding = classifier.outputs(image)
    open_set = bundle.manifest.open_set
    decoder = Decoder(
        bundle.taxonomy,
        bundle.manifest.thresholds,
        kind=bundle.manifest.output.kind,
        open_set_threshold=open_set.threshold if open_set else None,
    )
    invoke, decode = [], []
    for i in range(runs):
        t = time.perf_counter()
        classifier.raw(image)
        invoke.append(time.perf_counter() - t)
        t = time.perf_counter()
        frame = scores[i % len(scores)]
        if term is not None:  # the scores are already the bundle's; this times the sum the device adds
            frame = centroid_scores(frame, embedding, term.weight, space, term.temperature)
        decoder.decode(frame)
        decode.append(time.perf_counter() - t)
    return 1e3 * statistics.median(decode), 1e3 * statistics.median(invoke)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True, help="a format v3 bundle (leaf logits)")
    parser.add_argument("--calibration", required=True, help="images the thresholds are chosen on")
    parser.add_argument("--data", required=True, help="images of other occasions, to score")
    parser.add_argument("--compare", help="the same model as a v2 bundle (uint8 probabilities)")
    parser.add_argument("--target", type=float, action="append", help="precision targets (default 0.98)")
    parser.add_argument("--shift", type=float, action="append", help="occasion-shift strengths (default 0)")
    parser.add_argument(
        "--views", type=int, default=DEFAULT_VIEWS, help="views of each calibration image at each strength"
    )
    parser.add_argument(
        "--pass-rate", type=float, default=None, help="open-set pass rate (default: the bundle's)"
    )
    parser.add_argument("--runs", type=int, default=200, help="frames timed for the per-frame cost")
    parser.add_argument(
        "--frontier",
        action="store_true",
        help="the best coverage any thresholds give at each target, chosen on --data itself (oracle)",
    )
    args = parser.parse_args()

    bundle = read_bundle(args.bundle)
    taxonomy = bundle.taxonomy
    if bundle.manifest.output.kind != "leaf_logits":
        sys.exit(f"{args.bundle}: not a format v3 bundle with leaf logits")
    novel: list = []
    probs, scores, y = load(bundle, args.data, novel)
    print(
        f"bundle {bundle.name} {bundle.version}; calibration {args.calibration}; scored {len(y)} known + "
        f"{len(novel)} novel-product images ({args.data})"
    )
    print(f"top-1 on the scored images: leaf {100 * np.mean(probs.argmax(1) == y):.1f} %")
    print(
        "\n## New occasions: thresholds chosen on the calibration images (or shifted views of them), "
        "scored on the data"
    )
    pass_rate = args.pass_rate or (
        bundle.manifest.open_set.known_pass_rate if bundle.manifest.open_set else 0.98
    )
    for shift in args.shift or [0.0]:
        # images of products the model lacks cannot calibrate it (a leave-out model's val has them)
        unusable: list = []
        cal_probs, cal_scores, cal_y = load(bundle, args.calibration, unusable, shift, args.views)
        if unusable:
            print(f"shift {shift:g}: {len(unusable)} calibration images of products the model lacks left out")
        open_set = fit_open_set(cal_scores, pass_rate)
        unfamiliar = scores.max(axis=1) < open_set.threshold
        print(
            f"shift {shift:g}: open set max logit >= {open_set.threshold:.3f} "
            f"({100 * unfamiliar.mean():.1f} % of the scored known images rejected)"
        )
        for target, rule in itertools.product(args.target or [0.98], THRESHOLD_RULES):
            thresholds = THRESHOLD_RULES[rule](taxonomy, cal_probs, cal_y, target, warn=False)
            print(
                f"  target {target}, rule {rule}: thresholds "
                + ", ".join(f"{k} {v:.5f}" for k, v in thresholds.items())
            )
            print(f"    on the calibration views: {published(taxonomy, cal_probs, cal_y, thresholds)}")
            print(f"    without open set: {published(taxonomy, probs, y, thresholds)}")
            print(f"    with open set:    {published(taxonomy, probs, y, thresholds, unfamiliar)}")
            if novel:
                client = Classifier(bundle)
                for name, threshold in (("without open set", None), ("with open set", open_set.threshold)):
                    decoder = Decoder(taxonomy, thresholds, kind="leaf_logits", open_set_threshold=threshold)
                    n = score_novel(taxonomy, decoder, client, novel, bundle.manifest.input)
                    print(
                        f"    novel products, {name}: {100 * n['safe']:5.1f} % unknown or a correct parent "
                        f"({100 * n['unknown']:.1f} % unknown, {100 * n['correct_parent']:.1f} % parent), "
                        f"{100 * n['wrong']:.1f} % wrong"
                    )

    if args.compare:
        other = read_bundle(args.compare)
        o_probs, _, o_y = load(other, args.data)
        print("\n## Ranking: coverage at equal precision, thresholds chosen on the scored images (oracle)")
        for target in (0.98, 0.99):
            print(f"target {target}: logits (v3)       {ranking(taxonomy, probs, y, target)}")
            print(f"target {target}: uint8 probs (v2)  {ranking(other.taxonomy, o_probs, o_y, target)}")

    if args.frontier and taxonomy.depth >= 2:
        print(
            f"\n## Frontier: thresholds of all {taxonomy.depth} depths over a grid of {len(FRONTIER_GRID)} "
            "values each, chosen on the scored images (oracle), without the open-set check"
        )
        for target in args.target or [0.98]:
            for d2, leaf, precision, thresholds in frontier(taxonomy, probs, y, target):
                print(
                    f"target {target}: reach depth 2 {100 * d2:5.1f} % | leaf {100 * leaf:5.1f} % | "
                    f"right {100 * precision:5.1f} % | thresholds {thresholds}"
                )

    decode_ms, invoke_ms = decision_cost(bundle, scores, args.runs)
    print(
        "\n## Per-frame cost: decision (centroid term, decode with the open-set check) "
        f"{decode_ms:.3f} ms, invoke {invoke_ms:.2f} ms (1 thread): "
        f"{100 * decode_ms / invoke_ms:.1f} % of the invoke (medians of {args.runs})"
    )


if __name__ == "__main__":
    main()
