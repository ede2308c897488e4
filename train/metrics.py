"""Hierarchical classification metrics from leaf probabilities. numpy only (no TensorFlow), so the same
code scores a Keras run, an int8 bundle through LiteRT, and the converter's accuracy gate.

Definitions (a leaf shallower than a depth counts as itself at that depth, as in `Taxonomy`):
- accuracy at depth d: the argmax leaf's node at depth d equals the true leaf's (`accuracy`), and the same
  with the depth-d node taken as the argmax of summed children's probabilities (`accuracy_summed`);
- hierarchical precision/recall/F1 (Kiritchenko et al.): overlap of the ancestor sets (self included) of
  the predicted and true leaves, micro-averaged;
- mistake severity: for a wrong leaf, the number of levels from the deeper of the two leaves up to their
  lowest common ancestor (1 = a sibling);
- back-off: the device greedy walk (`edge/kernel/decode.py`), per-depth thresholds; per depth, coverage is
  the share of images whose published label reaches that depth, precision the share of those right there.
"""

from __future__ import annotations

import numpy as np
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.kernel.thresholds import threshold_key

RELIABILITY_BINS = 10


def depth_keys(taxonomy: Taxonomy) -> list[tuple[str, int]]:
    """(key, depth) of the `accuracy` object: depth_1 .. depth_{D-1}, then `leaf` (= depth D)."""
    return [(f"depth_{d}", d) for d in range(1, taxonomy.depth)] + [("leaf", taxonomy.depth)]


def greedy_walk(taxonomy: Taxonomy, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The device decoder's walk, vectorised: (node index in level_nodes(d), score), each (N, D).

    At depth 1 the most probable top-level node; below, the most probable child of the node above. Where
    the walk already ended at a shallower leaf the index is -1 and the score NaN. Thresholds are applied
    by the caller: the walk itself does not depend on them.
    """
    n, depth = len(probs), taxonomy.depth
    nodes = np.full((n, depth), -1, dtype=np.int64)
    scores = np.full((n, depth), np.nan)
    previous = None
    for d in range(1, depth + 1):
        level = probs @ taxonomy.level_matrix(d)
        level_nodes = taxonomy.level_nodes(d)
        real = np.array([node.depth == d for node in level_nodes])
        if previous is None:
            allowed = np.broadcast_to(real, level.shape)
        else:
            # parent of each depth-d node, as an index into level d-1
            parent_of = np.array(
                [
                    taxonomy.level_index(d - 1)[taxonomy.leaf_index(_first_leaf(node).label)]
                    for node in level_nodes
                ]
            )
            allowed = real[None, :] & (parent_of[None, :] == previous[:, None])
        masked = np.where(allowed, level, -np.inf)
        best = np.argmax(masked, axis=1)
        reached = allowed.any(axis=1)
        nodes[reached, d - 1] = best[reached]
        scores[reached, d - 1] = level[reached, best[reached]]
        previous = np.where(reached, best, -1)
    return nodes, scores


def _first_leaf(node):
    while node.children:
        node = node.children[0]
    return node


def backoff(
    taxonomy: Taxonomy,
    probs: np.ndarray,
    true_leaf: np.ndarray,
    thresholds: dict[str, float] | None,
    unfamiliar: np.ndarray | None = None,
) -> dict:
    """Coverage and precision per depth of the labels the device would publish with `thresholds`; the
    images marked `unfamiliar` (below the open-set threshold) are published as unknown."""
    nodes, scores = greedy_walk(taxonomy, probs)
    n = len(probs)
    passed = np.ones(n, dtype=bool) if unfamiliar is None else ~np.asarray(unfamiliar, dtype=bool)
    published_right = np.zeros(n, dtype=bool)
    published_leaf = np.zeros(n, dtype=bool)
    published_any = np.zeros(n, dtype=bool)
    result: dict = {}
    for d in range(1, taxonomy.depth + 1):
        t = float((thresholds or {}).get(threshold_key(d), 0.0))
        idx = nodes[:, d - 1]
        passed = passed & (idx >= 0) & (np.nan_to_num(scores[:, d - 1], nan=-1.0) >= t)
        right = idx == taxonomy.level_index(d)[true_leaf]
        count = int(passed.sum())
        result[f"depth_{d}"] = {
            "threshold": t,
            "coverage": count / n,
            "precision": float((passed & right).sum() / count) if count else None,
            "count": count,
        }
        # the published label is the deepest node that passed
        is_leaf = np.array([node.is_leaf for node in taxonomy.level_nodes(d)])[np.maximum(idx, 0)]
        published_right = np.where(passed, right, published_right)
        published_leaf = np.where(passed, is_leaf, published_leaf)
        published_any |= passed
    result["decisions"] = {
        "accepted": float(published_leaf.mean()),
        "backed_off": float((published_any & ~published_leaf).mean()),
        "unknown": float((~published_any).mean()),
    }
    result["published_precision"] = (
        float(published_right[published_any].mean()) if published_any.any() else None
    )
    return result


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = RELIABILITY_BINS) -> dict:
    """Per-bin mean confidence and accuracy of the top-1 leaf, and the expected calibration error."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        conf = float(confidence[mask].mean()) if count else None
        acc = float(correct[mask].mean()) if count else None
        if count:
            ece += count / len(confidence) * abs(conf - acc)
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return {"bins": rows, "ece": float(ece)}


def compute_metrics(
    taxonomy: Taxonomy,
    true_leaf: np.ndarray,
    probs: np.ndarray,
    thresholds: dict[str, float] | None = None,
    unfamiliar: np.ndarray | None = None,
) -> dict:
    """Every metric of `taxonedge evaluate` for N images: `true_leaf` (N,) leaf indices, `probs` (N, L);
    `unfamiliar` (N,) marks the images the open-set check publishes as unknown."""
    true_leaf = np.asarray(true_leaf, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, num_leaves = probs.shape if probs.ndim == 2 else (0, 0)
    if probs.ndim != 2 or num_leaves != taxonomy.num_leaves or true_leaf.shape != (n,) or n == 0:
        raise ValueError(
            f"expected probs (N, {taxonomy.num_leaves}) and true_leaf (N,) with N > 0, got "
            f"{probs.shape} and {true_leaf.shape}"
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities contain NaN or infinity")
    pred = probs.argmax(axis=1)

    accuracy, accuracy_summed = {}, {}
    for key, d in depth_keys(taxonomy):
        index = taxonomy.level_index(d)
        accuracy[key] = float((index[pred] == index[true_leaf]).mean())
        accuracy_summed[key] = float(
            ((probs @ taxonomy.level_matrix(d)).argmax(axis=1) == index[true_leaf]).mean()
        )

    k = min(5, num_leaves)
    top_k = np.argsort(-probs, axis=1)[:, :k]
    top5 = float((top_k == true_leaf[:, None]).any(axis=1).mean())

    per_class, f1s = [], []
    confusion = confusion_matrix(num_leaves, true_leaf, pred)
    for i, label in enumerate(taxonomy.leaf_labels):
        tp = int(confusion[i, i])
        support, predicted = int(confusion[i].sum()), int(confusion[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else None
        row = {
            "label": label,
            "support": support,
            "predicted": predicted,
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall) if support else None,
        }
        wrong = confusion[i].copy()
        wrong[i] = 0
        if support and wrong.any():
            row["most_confused_with"] = taxonomy.leaf_labels[int(wrong.argmax())]
        per_class.append(row)
        if support:
            f1s.append(row["f1"])

    paths = [leaf.path for leaf in taxonomy.leaves]
    inter = pred_len = true_len = 0
    severities = []
    for t, p in zip(true_leaf, pred, strict=False):
        common = _common_prefix(paths[t], paths[p])
        inter += common
        pred_len += len(paths[p])
        true_len += len(paths[t])
        if t != p:
            severities.append(max(len(paths[t]), len(paths[p])) - common)
    h_p, h_r = inter / pred_len, inter / true_len

    confidence = probs.max(axis=1)
    correct = pred == true_leaf
    nll = float(-np.log(np.clip(probs[np.arange(n), true_leaf], 1e-12, 1.0)).mean())
    return {
        "n": int(n),
        "num_classes": num_leaves,
        "classes_present": int(len(f1s)),
        "accuracy": accuracy,
        "accuracy_summed": accuracy_summed,
        "top5": top5,
        "macro_f1": float(np.mean(f1s)),
        "hierarchical": {"precision": h_p, "recall": h_r, "f1": _f1(h_p, h_r)},
        "mistake_severity": {
            "mean": float(np.mean(severities)) if severities else 0.0,
            "mistakes": len(severities),
            "histogram": {
                str(s): int(c) for s, c in zip(*np.unique(severities, return_counts=True), strict=False)
            },
        },
        "nll": nll,
        "calibration": reliability(confidence, correct),
        "backoff": backoff(taxonomy, probs, true_leaf, thresholds, unfamiliar),
        "per_class": per_class,
    }


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def confusion_matrix(num_classes: int, true_leaf: np.ndarray, pred: np.ndarray) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(true_leaf), np.asarray(pred)), 1)
    return matrix


def agreement(probs_a: np.ndarray, probs_b: np.ndarray) -> float:
    """Share of images whose top-1 leaf is the same under both models (float vs int8)."""
    a, b = np.asarray(probs_a), np.asarray(probs_b)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"agreement needs two equal (N, L) arrays with N > 0, got {a.shape} and {b.shape}")
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
