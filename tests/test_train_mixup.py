"""Mixup (`train --mixup A`): each fine-tuning example is one convex blend of two of the batch, the same
blend for its image, its targets and its sample weight, with the weight drawn from Beta(A, A)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from taxonedge.train.trainer import mix_batch  # noqa: E402


def blended(n: int, alpha: float, seed: int = 3) -> tuple[np.ndarray, ...]:
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 4, 4, 3), np.float32)
    targets = np.eye(n, dtype=np.float32)  # example i is class i: a target row says who was blended
    parents = np.eye(n, dtype=np.float32)[np.arange(n) // 2, : n // 2]
    weights = np.linspace(0.5, 2.0, n).astype(np.float32)
    out = mix_batch(
        [tf.constant(a) for a in (images, targets, parents, weights)],
        alpha,
        tf.random.Generator.from_seed(seed),
    )
    return images, targets, parents, weights, *(t.numpy() for t in out)


def test_image_targets_and_weight_are_blended_alike() -> None:
    images, _, parents, weights, mixed, mixed_targets, mixed_parents, mixed_weights = blended(64, 0.4)
    np.testing.assert_allclose(mixed_targets.sum(1), 1.0, atol=1e-5)
    assert ((mixed_targets > 1e-6).sum(1) <= 2).all()  # at most two examples in each blend
    assert (mixed_targets < 1 - 1e-6).any(axis=1).mean() > 0.9  # and nearly all are blends
    # the image, the parent target and the weight are the same blend of the same two examples
    np.testing.assert_allclose(mixed, np.einsum("ik,khwc->ihwc", mixed_targets, images), atol=1e-3)
    np.testing.assert_allclose(mixed_parents, mixed_targets @ parents, atol=1e-5)
    np.testing.assert_allclose(mixed_weights, mixed_targets @ weights, atol=1e-5)


def test_alpha_sets_how_far_blends_go() -> None:
    def mean_minor_share(alpha: float) -> float:
        _, _, _, _, _, mixed_targets, _, _ = blended(2000, alpha)
        top2 = np.sort(mixed_targets, axis=1)[:, -2:]
        return float(top2[:, 0].mean())  # E[min(lam, 1 - lam)]: 0.25 for Beta(1, 1), less for a < 1

    assert mean_minor_share(1.0) == pytest.approx(0.25, abs=0.02)
    assert mean_minor_share(0.2) < 0.15
