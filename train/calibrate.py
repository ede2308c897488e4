"""Calibration on validation data: a softmax temperature, then per-depth back-off thresholds. numpy only.

The thresholds are chosen for the device decoder (`edge/kernel/decode.py`): it walks down from the top level,
taking the most probable child while that child's (summed) probability passes its depth's threshold, and
publishes the deepest node kept. Depth d is chosen after depths 1..d-1 are fixed, on the images whose walk
reaches d, so the precision measured here is the precision of what the device publishes at that depth.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from taxonedge.edge.kernel.taxonomy import Taxonomy
from taxonedge.edge.kernel.thresholds import threshold_key

from .metrics import backoff, greedy_walk

log = logging.getLogger(__name__)

DEFAULT_TARGET_PRECISION = 0.98
DEFAULT_MIN_COUNT = 10


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(z)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0) -> float:
    """The T > 0 minimising the negative log-likelihood of softmax(logits / T) (Guo et al. 2017).

    NLL is convex in 1/T, hence unimodal in log T: a golden-section search on log T finds the minimum.
    When no image is wrong (or the minimum sits at `low`), the images do not determine T: the NLL only falls
    as T shrinks. T at the bound would scale the logits by 1/low and saturate the softmax (every answer
    1.0, nothing left for the back-off thresholds to separate), so T stays 1.0.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or labels.shape != (len(logits),) or len(logits) == 0:
        raise ValueError(f"expected logits (N, L) and labels (N,), got {logits.shape} and {labels.shape}")
    # with no image wrong the NLL only falls as T shrinks: no search, T is at the bound
    wrong = int((logits.argmax(axis=1) != labels).sum())
    temperature = _nll_minimum(logits, labels, low, high) if wrong else low
    if temperature < low * 1.01:
        log.warning(
            "temperature: the %d validation images (%d wrong) do not determine one (their NLL only falls "
            "as it shrinks); keeping 1.0. Validation images from other occasions (train --val) calibrate "
            "better",
            len(logits),
            wrong,
        )
        return 1.0
    return temperature


def _nll_minimum(logits: np.ndarray, labels: np.ndarray, low: float, high: float) -> float:
    """Golden-section search on log T in [low, high] for the T of least NLL."""
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = _nll(logits, labels, math.exp(c)), _nll(logits, labels, math.exp(d))
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = _nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = _nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def choose_thresholds(
    taxonomy: Taxonomy,
    probs: np.ndarray,
    true_leaf: np.ndarray,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    min_count: int = DEFAULT_MIN_COUNT,
    warn: bool = True,
) -> dict[str, float]:
    """Per depth, the lowest threshold at which the label the device publishes there is right at least
    `target_precision` of the time on this data. A threshold must let at least `min_count` images through
    (or all that reach the depth, when fewer do): a precision measured on two or three images means nothing.
    A depth that cannot reach the target gets 1.0 (never published: the device backs off to the parent)
    and a warning."""
    probs = np.asarray(probs, dtype=np.float64)
    true_leaf = np.asarray(true_leaf, dtype=np.int64)
    nodes, scores = greedy_walk(taxonomy, probs)
    reaching = np.ones(len(probs), dtype=bool)
    thresholds: dict[str, float] = {}
    for d in range(1, taxonomy.depth + 1):
        idx, score = nodes[:, d - 1], scores[:, d - 1]
        candidates = reaching & (idx >= 0)
        right = (idx == taxonomy.level_index(d)[true_leaf])[candidates]
        s = score[candidates]
        threshold = 1.0
        if len(s):
            order = np.argsort(-s, kind="stable")
            s_sorted, right_sorted = s[order], right[order]
            # precision of {score >= s_sorted[i]}: ties share the count of the last equal score
            precision = np.cumsum(right_sorted) / np.arange(1, len(s_sorted) + 1)
            last_of_tie = np.r_[s_sorted[1:] != s_sorted[:-1], True]
            enough = np.arange(1, len(s_sorted) + 1) >= min(min_count, len(s_sorted))
            ok = last_of_tie & enough & (precision >= target_precision)
            if ok.any():
                lowest = np.flatnonzero(ok).max()
                threshold = 0.0 if lowest == len(s_sorted) - 1 else float(s_sorted[lowest])
        if threshold >= 1.0:
            report = log.warning if warn else log.debug  # the two-fold check's halves stay quiet
            report(
                "depth %d: no threshold reaches precision %.3f on %d images; it is set to 1.0 (labels stop "
                "at "
                "depth %d)",
                d,
                target_precision,
                int(candidates.sum()),
                d - 1,
            )
        thresholds[threshold_key(d)] = threshold
        reaching = candidates & (np.nan_to_num(score, nan=-1.0) >= threshold)
    return thresholds


def check_thresholds(
    taxonomy: Taxonomy, probs: np.ndarray, true_leaf: np.ndarray, target_precision: float, repeats: int = 5
) -> dict[str, dict[str, float | None]]:
    """What thresholds chosen on these images give on new images of the same kind, per depth.

    Chosen on a few hundred images, thresholds promise more than they give: each threshold is the lowest
    that reaches the target here, so it sits where the luck of this sample helps most. The check chooses
    on one stratified half and measures on the other, both ways, pooled over `repeats` random halvings
    (one halving of 169 Grocery images gave anything from 96.7 to 98.7 % at the leaf). Thresholds from
    half the images are noisier than from all of them, so the check errs on the pessimistic side.
    """
    probs = np.asarray(probs, dtype=np.float64)
    true_leaf = np.asarray(true_leaf, dtype=np.int64)
    right = np.zeros(taxonomy.depth)
    count = np.zeros(taxonomy.depth)
    for seed in range(repeats):
        first = stratified_half(true_leaf, seed)
        for fit, check in ((first, ~first), (~first, first)):
            chosen = choose_thresholds(taxonomy, probs[fit], true_leaf[fit], target_precision, warn=False)
            held = backoff(taxonomy, probs[check], true_leaf[check], chosen)
            for d in range(1, taxonomy.depth + 1):
                row = held[f"depth_{d}"]
                count[d - 1] += row["count"]
                right[d - 1] += round((row["precision"] or 0.0) * row["count"])
    n = len(true_leaf) * repeats
    return {
        f"depth_{d}": {
            "coverage": float(count[d - 1] / n) if n else 0.0,
            "precision": float(right[d - 1] / count[d - 1]) if count[d - 1] else None,
        }
        for d in range(1, taxonomy.depth + 1)
    }


def choose_and_check_thresholds(
    taxonomy: Taxonomy, probs: np.ndarray, true_leaf: np.ndarray, target_precision: float
) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """`choose_thresholds` and its `check_thresholds`, with a warning when the check misses the target:
    what train and convert record for the thresholds they ship."""
    thresholds = choose_thresholds(taxonomy, probs, true_leaf, target_precision)
    check = check_thresholds(taxonomy, probs, true_leaf, target_precision)
    warn_if_short(check, target_precision, len(true_leaf))
    return thresholds, check


def warn_if_short(check: dict[str, dict[str, float | None]], target_precision: float, images: int) -> None:
    """Log a warning naming the depths whose two-fold check falls short of the target, and what to do."""
    short = {
        d: row["precision"]
        for d, row in check.items()
        if row["precision"] is not None and row["precision"] < target_precision
    }
    if short:
        log.warning(
            "back-off thresholds: chosen on %d validation images for %.3f precision, a two-fold check "
            "gives %s on new images of the same kind; more validation images or a higher target "
            "precision make them hold",
            images,
            target_precision,
            ", ".join(f"{d} {100 * p:.1f} %" for d, p in short.items()),
        )


def stratified_half(true_leaf: np.ndarray, seed: int) -> np.ndarray:
    """A mask holding half of each class's images (the smaller half of an odd class), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(true_leaf), dtype=bool)
    for leaf in np.unique(true_leaf):
        idx = rng.permutation(np.flatnonzero(true_leaf == leaf))
        mask[idx[: len(idx) // 2]] = True
    return mask


def occasion_shift(images: np.ndarray, strength: float, copies: int = 2, seed: int = 0) -> np.ndarray:
    """`copies` views of each preprocessed image (N x H x W x 3, uint8) as another occasion might show it:
    another white balance, exposure and contrast, some blur, a tighter framing. Thresholds and the open-set
    threshold chosen on these views hold better where the model has not been: chosen on a slice of
    Grocery's training occasions they let 82 % right labels through on val's occasions, chosen on these
    views at strength 2 98 % (docs/trust.md). `strength` 0: the images as they are."""
    import cv2

    if strength <= 0:
        return np.asarray(images)
    rng = np.random.default_rng(seed)
    out = []
    for image in np.asarray(images):
        h, w = image.shape[:2]
        for _ in range(copies):
            x = image.astype(np.float32) * rng.uniform(1 - 0.3 * strength, 1 + 0.3 * strength, 3)
            x *= rng.uniform(1 - 0.4 * strength, 1 + 0.3 * strength)
            mean = x.mean()
            x = np.clip((x - mean) * rng.uniform(1 - 0.4 * strength, 1 + 0.2 * strength) + mean, 0, 255)
            x = x.astype(np.uint8)
            sigma = rng.uniform(0, 2.0 * strength)
            if sigma > 0.3:
                x = cv2.GaussianBlur(x, (0, 0), sigma)
            keep = rng.uniform(max(0.6, 1 - 0.3 * strength), 1.0)
            ch, cw = max(1, int(h * keep)), max(1, int(w * keep))
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            x = cv2.resize(x[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
            out.append(x)
    return np.stack(out)
