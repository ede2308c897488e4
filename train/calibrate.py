"""Calibration on validation data: a softmax temperature, then per-depth back-off thresholds. numpy only.

The thresholds are chosen for the device decoder (`edge/kernel/decode.py`): it walks down from the top level,
taking the most probable child while that child's (summed) probability passes its depth's threshold, and
publishes the deepest node kept. Two rules (`THRESHOLD_RULES`):

- `published` (the default): all depths together, so that the labels as published (each at the depth where
  it stops) reach the target precision, telling as much about the items as that allows (`label_information`).
  It is what a line reads.
- `per_depth`: depth d is chosen after depths 1..d-1 are fixed, on the images whose walk reaches d, so each
  depth's labels (those that stop there and those that go on) reach the target. The labels that stop at an
  upper depth are the uncertain ones and can fall short of it: on occasion-shifted views of Grocery images
  the published labels came out 96.3 % right for a 98 % target (docs/trust.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

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


def label_information(taxonomy: Taxonomy) -> list[np.ndarray]:
    """Per depth d, what a label at each node of `level_nodes(d)` tells about an item: log(leaves / the
    node's leaves), the information of narrowing the taxonomy's leaves to that node's. A leaf tells the
    most wherever it sits (`Fruit/Avocado` as much as `Fruit/Apple/Pink-Lady`); a broad top level little."""
    total = taxonomy.num_leaves
    return [np.log(total / taxonomy.level_matrix(d).sum(axis=0)) for d in range(1, taxonomy.depth + 1)]


PUBLISHED_GRID = 30  # candidate thresholds per depth: quantiles of the scores that reach it
PUBLISHED_ROUNDS = 8  # coordinate-ascent rounds; each tries every move once


def choose_published_thresholds(
    taxonomy: Taxonomy,
    probs: np.ndarray,
    true_leaf: np.ndarray,
    target_precision: float = DEFAULT_TARGET_PRECISION,
    min_count: int = DEFAULT_MIN_COUNT,
    warn: bool = True,
) -> dict[str, float]:
    """All depths' thresholds together: the labels as published (each at the depth it stops) right at least
    `target_precision` of the time on this data, telling as much as that allows: the sum of the published
    labels' `label_information` (`unknown` tells nothing). Counting information rather than depth values
    a label by how far it narrows the item down: reaching `Fruit/Apple` from `Fruit` counts for more than
    going on from `Fruit/Apple` to one of its few varieties, and a leaf at depth 2 as much as one at depth
    3. On Grocery's new-occasions proxies it published depth 2 for 5-8 points more of the images at the
    same precision than the sum of depths (docs/trust.md).

    `choose_thresholds` holds each depth's labels to the target separately, so the labels that stop at an
    upper depth (the uncertain ones, that its threshold let through and the next one did not) can fall well
    below it, and a line reads those too. Here the target is on what the line reads. The search is
    coordinate ascent over each depth's score quantiles, one depth or two adjacent depths at a time, from
    two starts (depth 1 alone at the target, and `choose_thresholds`' answer when it meets the target as
    published), so it costs rounds x depths x grid^2 evaluations, not grid^depth: 0.3 to 0.7 s on 700
    Grocery views. Being local it can miss the best point: on those views it did at least as well as a
    full grid of 25 values a depth (docs/trust.md), on synthetic scores within 2 % of a grid of 20. Fewer
    than `min_count` published labels do not count as meeting the target; when even depth 1 alone cannot,
    depth 1 gets 1.0 (nothing published) and a warning."""
    probs = np.asarray(probs, dtype=np.float64)
    true_leaf = np.asarray(true_leaf, dtype=np.int64)
    nodes, scores = greedy_walk(taxonomy, probs)
    n, depth = nodes.shape
    scores = np.where(nodes >= 0, np.nan_to_num(scores, nan=-1.0), -1.0)
    right = np.stack([nodes[:, d] == taxonomy.level_index(d + 1)[true_leaf] for d in range(depth)], axis=1)
    information = np.stack(
        [
            np.where(nodes[:, d] >= 0, gain[np.maximum(nodes[:, d], 0)], 0.0)
            for d, gain in enumerate(label_information(taxonomy))
        ],
        axis=1,
    )
    grids = [
        np.unique(np.r_[0.0, np.quantile(col[col >= 0], np.linspace(0, 1, PUBLISHED_GRID)), 1.0])
        if (col >= 0).any()
        else np.array([0.0, 1.0])
        for col in scores.T
    ]
    needed = min(min_count, n)

    def published_information(ths: np.ndarray) -> float | None:
        """The information of the labels published under `ths`, or None when they miss the target."""
        stop = np.cumprod(scores >= ths[None, :], axis=1).sum(axis=1)
        published, deepest = stop > 0, np.maximum(stop - 1, 0)
        count = int(published.sum())
        correct = int((right[np.arange(n), deepest] & published).sum())
        if count < needed or correct < target_precision * count:
            return None
        return float(information[np.arange(n), deepest][published].sum())

    per_depth = choose_thresholds(taxonomy, probs, true_leaf, target_precision, min_count, warn=False)
    per_depth = np.array([per_depth[threshold_key(d)] for d in range(1, depth + 1)])
    starts = [np.r_[per_depth[0], np.ones(depth - 1)], per_depth]
    best, best_value = np.r_[1.0, np.ones(depth - 1)], None
    for ths in starts:
        value = published_information(ths)
        if value is None:
            continue
        for _ in range(PUBLISHED_ROUNDS):
            improved = False
            # moves of one depth, or of two adjacent depths together: letting more labels reach depth d
            # often needs a stricter depth d+1, which no single move finds
            for d in range(depth):
                pairs = [(a, b) for a in grids[d] for b in grids[d + 1]] if d + 1 < depth else grids[d]
                for move in pairs:
                    trial = ths.copy()
                    trial[d : d + np.size(move)] = move
                    trial_value = published_information(trial)
                    if trial_value is not None and trial_value > value:
                        ths, value, improved = trial, trial_value, True
            if not improved:
                break
        if best_value is None or value > best_value:
            best, best_value = ths, value
    if best_value is None and warn:
        log.warning(
            "no thresholds make the published labels reach precision %.3f on %d images; depth 1 is set to "
            "1.0 (every label unknown)",
            target_precision,
            n,
        )
    return {threshold_key(d): float(best[d - 1]) for d in range(1, depth + 1)}


THRESHOLD_RULES = {"published": choose_published_thresholds, "per_depth": choose_thresholds}
DEFAULT_THRESHOLD_RULE = "published"


def check_thresholds(
    taxonomy: Taxonomy,
    probs: np.ndarray,
    true_leaf: np.ndarray,
    target_precision: float,
    repeats: int = 5,
    rule: str = DEFAULT_THRESHOLD_RULE,
    views: int = 1,
) -> dict[str, dict[str, float | None]]:
    """What thresholds chosen on these images give on new images of the same kind, per depth.

    Chosen on a few hundred images, thresholds promise more than they give: each threshold is the lowest
    that reaches the target here, so it sits where the luck of this sample helps most. The check chooses
    on one stratified half and measures on the other, both ways, pooled over `repeats` random halvings
    (one halving of 169 Grocery images gave anything from 96.7 to 98.7 % at the leaf). Thresholds from
    half the images are noisier than from all of them, so the check errs on the pessimistic side.

    One row per depth (the labels reaching it) and `published` (the labels as published, at any depth).
    With `views` > 1 the rows are `views` consecutive views of each image (`occasion_views`), and the halves
    keep each image's views together: a view checked against thresholds its own siblings chose would flatter
    them.
    """
    probs = np.asarray(probs, dtype=np.float64)
    true_leaf = np.asarray(true_leaf, dtype=np.int64)
    choose = THRESHOLD_RULES[rule]
    keys = [threshold_key(d) for d in range(1, taxonomy.depth + 1)] + ["published"]
    right = dict.fromkeys(keys, 0)
    count = dict.fromkeys(keys, 0)
    for seed in range(repeats):
        first = np.repeat(stratified_half(true_leaf[::views], seed), views)
        for fit, check in ((first, ~first), (~first, first)):
            chosen = choose(taxonomy, probs[fit], true_leaf[fit], target_precision, warn=False)
            held = backoff(taxonomy, probs[check], true_leaf[check], chosen)
            held["published"] = {
                "count": round((1.0 - held["decisions"]["unknown"]) * int(check.sum())),
                "precision": held["published_precision"],
            }
            for key in keys:
                count[key] += held[key]["count"]
                right[key] += round((held[key]["precision"] or 0.0) * held[key]["count"])
    n = len(true_leaf) * repeats
    return {
        key: {
            "coverage": float(count[key] / n) if n else 0.0,
            "precision": float(right[key] / count[key]) if count[key] else None,
        }
        for key in keys
    }


def choose_and_check_thresholds(
    taxonomy: Taxonomy,
    probs: np.ndarray,
    true_leaf: np.ndarray,
    target_precision: float,
    rule: str = DEFAULT_THRESHOLD_RULE,
    views: int = 1,
) -> tuple[dict[str, float], dict[str, dict[str, float | None]]]:
    """The thresholds of `rule` and their `check_thresholds`, with a warning when the check misses the
    target: what train and convert record for the thresholds they ship. `views`: as `check_thresholds`."""
    thresholds = THRESHOLD_RULES[rule](taxonomy, probs, true_leaf, target_precision)
    check = check_thresholds(taxonomy, probs, true_leaf, target_precision, rule=rule, views=views)
    warn_if_short(check, target_precision, len(true_leaf) // views, rule, views)
    return thresholds, check


def warn_if_short(
    check: dict[str, dict[str, float | None]],
    target_precision: float,
    images: int,
    rule: str = DEFAULT_THRESHOLD_RULE,
    views: int = 1,
) -> None:
    """Log a warning naming the rows of the two-fold check that `rule` aims at (the published labels, or
    each depth) that fall short of the target, and what to do."""
    short = {
        key: row["precision"]
        for key, row in check.items()
        if (key == "published") == (rule == "published")
        and row["precision"] is not None
        and row["precision"] < target_precision
    }
    if short:
        log.warning(
            "back-off thresholds: chosen on %d validation images%s for %.3f precision, a two-fold check "
            "gives %s on new images of the same kind; more validation images or a higher target "
            "precision make them hold",
            images,
            f" ({views} views of each)" if views > 1 else "",
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


# Views per validation image that `convert` chooses thresholds on: with 2, the random draw of the views alone
# moved the published labels reaching depth 2 between 64 and 77 % on Grocery's leave-out proxy; 8 draws
# average most of that out (docs/trust.md).
DEFAULT_VIEWS = 8


def occasion_views(
    images: np.ndarray, strength: float, copies: int = DEFAULT_VIEWS, seed: int = 0, chunk: int = 64
) -> Iterator[np.ndarray]:
    """`occasion_shift`'s views of `images`, made `chunk` images at a time (image by image, `copies` views
    each, in order): eight views of a few thousand validation images at once would take gigabytes."""
    for start in range(0, len(images), chunk):
        yield from occasion_shift(images[start : start + chunk], strength, copies, seed + start)


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
