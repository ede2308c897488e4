"""Shift-oriented augmentation (`train --white-balance W --blur SIGMA`): the light and the focus of
another occasion, applied in the training graph beside the crops, flips and colour jitter."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
cv2 = pytest.importorskip("cv2")

from taxonedge.train.trainer import TrainConfig, augment_batch, blur_batch  # noqa: E402


def only(**augment) -> TrainConfig:
    """A config with every other augmentation off, so a test sees one at a time."""
    return TrainConfig(data="-", crop_scale=1.0, flip=False, color_jitter=0.0, **augment)


def test_white_balance_scales_each_channel_by_its_own_gain_within_the_bound() -> None:
    images = np.full((400, 8, 8, 3), 100.0, np.float32)
    out = augment_batch(tf.constant(images), only(white_balance=0.2), 8, tf.random.Generator.from_seed(1))
    gains = out.numpy()[:, 0, 0, :] / 100.0
    # one gain per image and channel, the same over the whole image
    np.testing.assert_allclose(
        out.numpy(), np.broadcast_to(gains[:, None, None, :] * 100.0, out.shape), rtol=1e-4
    )
    assert gains.min() >= 0.8 - 1e-4 and gains.max() <= 1.2 + 1e-4
    assert gains.min() < 0.82 and gains.max() > 1.18  # the whole range is used
    assert np.abs(gains[:, 0] - gains[:, 2]).mean() > 0.05  # channels move apart: a colour cast
    off = augment_batch(tf.constant(images), only(), 8, tf.random.Generator.from_seed(1))
    np.testing.assert_allclose(off.numpy(), images, atol=1e-3)


def test_full_blur_is_opencvs_gaussian_blur_and_amount_blends_towards_it() -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, 24, 24, 3)).astype(np.float32)
    expected = cv2.GaussianBlur(image[0], (11, 11), 1.5, borderType=cv2.BORDER_REFLECT_101)  # 3 sigma
    full = blur_batch(tf.constant(image), 1.5, tf.ones([1, 1, 1, 1])).numpy()[0]
    np.testing.assert_allclose(full, expected, atol=0.05)
    none = blur_batch(tf.constant(image), 1.5, tf.zeros([1, 1, 1, 1])).numpy()[0]
    np.testing.assert_allclose(none, image[0], atol=1e-4)
    half = blur_batch(tf.constant(image), 1.5, tf.fill([1, 1, 1, 1], 0.5)).numpy()[0]
    np.testing.assert_allclose(half, (image[0] + expected) / 2, atol=0.05)


def test_blur_takes_a_random_amount_per_image() -> None:
    stripes = np.zeros((200, 16, 16, 3), np.float32)
    stripes[:, :, ::2] = 255.0  # the sharpest pattern there is: a blur shows as lost contrast
    out = augment_batch(tf.constant(stripes), only(blur=2.0), 16, tf.random.Generator.from_seed(2)).numpy()
    contrast = out.std(axis=(1, 2, 3)) / stripes[0].std()
    assert contrast.max() > 0.9 and contrast.min() < 0.2  # from almost none to nearly all
    assert np.std(contrast) > 0.2
