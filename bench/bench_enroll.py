"""Enrolling products the model was never trained on, from k photos each: leave-classes-out.

`--bundle` is a format v3 bundle trained without some classes (their labels are missing from its
taxonomy); `--enroll-from` lists photos of every class (Grocery's train.txt), `--data` the images to score
(val.txt: other occasions). Each missing class is enrolled from k of its photos (k = 1: the dataset's
iconic catalogue image, from classes.csv beside the list), through the device's own code
(`edge/kernel/prototypes.py`, in the bundle's embedding space; `--raw`: raw cosine), k > 1 drawn
`--seeds` times: then, on `--data`, the enrolled classes' leaf top-1, and the trained classes' leaf
accuracy before and after, averaged over the draws. Last, the per-frame cost of the prototype match
with 10 and 500 enrolled products, side by side with the invoke.

    .venv/bin/python bench/bench_enroll.py --bundle B.tebundle \
        --enroll-from ../shared/data/grocery/dataset/train.txt --data ../shared/data/grocery/dataset/val.txt
"""

from __future__ import annotations

import argparse
import csv
import itertools
import statistics
import time
from pathlib import Path

import numpy as np
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.decode import Decision, Decoder
from taxonedge.edge.kernel.prototypes import RIVALS, EmbeddingSpace, PrototypeIndex, normalise
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.train import data as data_mod


def embed(classifier: Classifier, spec, samples: list) -> tuple[np.ndarray, np.ndarray, list]:
    """(leaf scores, embeddings, the samples that loaded) through the device's interpreter."""
    images, kept, _ = data_mod.load_images(samples, spec, "embedding")
    outs = [classifier.outputs(image) for image in images]
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs]), kept


def said(
    index: PrototypeIndex, embedding: np.ndarray, scores: np.ndarray, model: Decision
) -> tuple[tuple[str, ...] | None, str | None]:
    """(the label path the device publishes for a frame, None for unknown; the enrolled product that
    decided it, or None): an enrolled product's label when its prototype matches (as
    `edge/service/enrollment.py` decides), else the model's decision."""
    match = index.match(embedding, scores)
    if match is not None:
        return tuple(match.label.split("/")), match.label
    return published(model), None


def published(model: Decision) -> tuple[str, ...] | None:
    """The label path the device publishes for the model's decision, None for unknown."""
    return None if model.decision == "unknown" else tuple(model.path)


def share_right(paths: list[tuple[str, ...] | None], truths: list[tuple[str, ...]]) -> float:
    """The share of published labels (None is unknown, not a label) that are right: a leaf or a correct
    parent of the truth."""
    pairs = [(path, t) for path, t in zip(paths, truths, strict=True) if path]
    return float(np.mean([t[: len(path)] == path for path, t in pairs]))


def iconic_images(list_file: Path) -> dict[str, str]:
    """Class name -> its iconic catalogue image (classes.csv beside the list file)."""
    root = list_file.parent
    with open(root / "classes.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    return {row[0]: str(root / row[4].lstrip("/")) for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--enroll-from", required=True, help="a list file with photos of every class")
    parser.add_argument("--data", required=True, help="images to score")
    parser.add_argument("--k", type=int, action="append", help="photos per product (default 1, 5, 10)")
    parser.add_argument("--min-similarity", type=float, action="append")
    parser.add_argument("--margin", type=float, action="append")
    parser.add_argument(
        "--rivals", type=int, action="append", help="the model's top trained classes to beat (default 5)"
    )
    parser.add_argument("--seeds", type=int, default=5, help="draws of the k photos to average (default 5)")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument(
        "--raw", action="store_true", help="match by raw cosine, as bundles without a whitening do"
    )
    args = parser.parse_args()

    bundle = read_bundle(args.bundle)
    taxonomy, spec = bundle.taxonomy, bundle.manifest.input
    space = EmbeddingSpace(None, bundle.centroids()) if args.raw else bundle.embedding_space()
    classifier = Classifier(bundle, num_threads=1)
    pool: list = []
    data_mod.model_leaves(taxonomy, data_mod.read_samples(args.enroll_from), args.enroll_from, pool)
    novel_val: list = []
    known_val = data_mod.model_leaves(taxonomy, data_mod.read_samples(args.data), args.data, novel_val)
    new_labels = sorted({s.label for s in pool})
    if not new_labels:
        raise SystemExit("every class of --enroll-from is in the bundle's taxonomy: nothing to enroll")
    known_scores, known_emb, known_kept = embed(classifier, spec, known_val)
    known_y = data_mod.leaf_indices(taxonomy, known_kept, args.data)
    novel_scores, novel_emb, novel_kept = embed(classifier, spec, novel_val)
    novel_truth = [s.label for s in novel_kept]
    base_known = float(np.mean(known_scores.argmax(1) == known_y))
    # what the device publishes without enrolled products: the bundle's thresholds and open set
    open_set = bundle.manifest.open_set
    decoder = Decoder(
        taxonomy,
        bundle.manifest.thresholds,
        kind=bundle.manifest.output.kind,
        open_set_threshold=open_set.threshold if open_set else None,
    )
    known_model = [decoder.decode(s) for s in known_scores]
    novel_model = [decoder.decode(s) for s in novel_scores]
    truths = [tuple(t.split("/")) for t in novel_truth] + [
        tuple(taxonomy.leaf_labels[y].split("/")) for y in known_y
    ]
    kind = "raw cosine" if space is None or space.whitening is None else "the bundle's whitened space"
    print(
        f"{bundle.name} {bundle.version}: {len(new_labels)} products not in the model, "
        f"{len(novel_kept)} of their images and {len(known_kept)} of trained products scored; "
        f"trained leaf top-1 {100 * base_known:.1f} % before enrolling; matched in {kind}, centroids "
        + ("from the bundle" if space is not None and space.centroids is not None else "absent")
    )
    model_paths = [published(d) for d in novel_model + known_model]
    trained_truths = truths[len(novel_model) :]
    print(
        f"published labels right before enrolling: {100 * share_right(model_paths, truths):.1f} % "
        f"of every scored image's, {100 * share_right(model_paths[len(novel_model) :], trained_truths):.1f} "
        f"% of the trained classes' images'"
    )
    icons = iconic_images(Path(args.enroll_from))
    pool_emb = {}  # every photo of each product, embedded once; each draw picks k of them
    for label in new_labels:
        pool_emb[label] = embed(classifier, spec, [s for s in pool if s.label == label])[1]
    icon_emb = {
        label: embed(classifier, spec, [data_mod.Sample(icons[label.rsplit("/", 1)[-1]], label)])[1]
        for label in new_labels
    }

    print(
        f"\nk | min sim | margin | rivals | enrolled leaf top-1 | trained leaf top-1 (change) | "
        f"published labels right (a leaf or a correct parent; the bundle's thresholds and open set; "
        f"every scored image) | "
        f"the same on the trained classes' images | enrolled labels right; mean of {args.seeds} draws"
    )
    for k in args.k or [1, 5, 10]:
        draws = []  # per draw, the prototypes, made as the device makes them
        for seed in range(1 if k == 1 else args.seeds):
            rng = np.random.default_rng(seed)
            chosen = {
                label: icon_emb[label]
                if k == 1
                else pool_emb[label][rng.permutation(len(pool_emb[label]))[:k]]
                for label in new_labels
            }
            draws.append(
                np.stack([(space or EmbeddingSpace()).prototype(chosen[label]) for label in new_labels])
            )
        for min_sim, margin, rivals in itertools.product(
            args.min_similarity or [0.2, 0.3], args.margin or [0.0, 0.02, 0.05], args.rivals or [RIVALS]
        ):
            novel, known, right, known_right, enrolled_right = [], [], [], [], []
            for protos in draws:
                index = PrototypeIndex(new_labels, protos, space, min_sim, margin, rivals)
                novel_said = [
                    said(index, *frame) for frame in zip(novel_emb, novel_scores, novel_model, strict=True)
                ]
                known_said = [
                    said(index, *frame) for frame in zip(known_emb, known_scores, known_model, strict=True)
                ]
                novel.append(np.mean([m == t for (_, m), t in zip(novel_said, novel_truth, strict=True)]))
                known.append(
                    np.mean(
                        [
                            m is None and int(s.argmax()) == y
                            for (_, m), s, y in zip(known_said, known_scores, known_y, strict=True)
                        ]
                    )
                )
                right.append(share_right([path for path, _ in novel_said + known_said], truths))
                known_right.append(share_right([path for path, _ in known_said], trained_truths))
                named = [(m, t) for (_, m), t in zip(novel_said + known_said, truths, strict=True) if m]
                enrolled_right.append(
                    np.mean([tuple(m.split("/")) == t for m, t in named]) if named else np.nan
                )
            after = float(np.mean(known))
            print(
                f"{k:2d} | {min_sim:.2f} | {margin:+.2f} | {rivals:2d} | {100 * np.mean(novel):5.1f} % | "
                f"{100 * after:5.1f} % ({100 * (after - base_known):+.1f} points) | "
                f"{100 * np.mean(right):5.1f} % | {100 * np.mean(known_right):5.1f} % | "
                f"{100 * np.nanmean(enrolled_right):5.1f} %"
            )

    invoke = []
    image = np.zeros((spec.height, spec.width, 3), np.uint8)
    for _ in range(args.runs // 3):
        t = time.perf_counter()
        classifier.outputs(image)
        invoke.append(time.perf_counter() - t)
    invoke_ms = 1e3 * statistics.median(invoke)
    dim = known_emb.shape[1]
    for n in (10, 500):
        protos = normalise(np.random.default_rng(n).normal(size=(n, dim)))
        index = PrototypeIndex([f"p{i}" for i in range(n)], protos, space)
        times = []
        for i in range(args.runs):
            t = time.perf_counter()
            index.match(known_emb[i % len(known_emb)], known_scores[i % len(known_scores)])
            times.append(time.perf_counter() - t)
        ms = 1e3 * statistics.median(times)
        print(
            f"\nmatch with {n} enrolled products: {ms:.3f} ms per frame, {100 * ms / invoke_ms:.1f} % of the "
            f"invoke ({invoke_ms:.2f} ms, 1 thread; medians of {args.runs})"
        )


if __name__ == "__main__":
    main()
