"""The classifier architecture, built the same way under Keras 3 (training) and tf_keras (QAT in convert).

    raw RGB pixels 0..255 (H, W, 3)
      -> scaling for the backbone (inside the model, so the exported model takes raw uint8)
      -> backbone (keras.applications, no top, global average pooling)
      -> Dropout -> Dense(num_leaves, "leaf_logits") -> Softmax ("leaf_probs")

Layer names are fixed so that weights can be copied layer by layer between the two Keras versions. What
differs per backbone (factory, scaling, BGR weights, Edge TPU note) is in the registry, `backbones.py`.
"""

from __future__ import annotations

import logging
from typing import Any

from .backbones import get_backbone

log = logging.getLogger(__name__)


def build_classifier(
    config: dict, num_leaves: int, keras_module: Any, *, pretrained: bool = False, num_parents: int = 0
) -> Any:
    """Build the classifier described by a run's config.json for `keras_module` (`keras` or `tf_keras`).

    config keys used: backbone, alpha, input_size, dropout, weights (only with `pretrained=True`).
    `pretrained=False` (the default) builds the architecture with random weights, e.g. for the converter,
    which rebuilds the model under tf_keras and copies the trained weights into it layer by layer (the
    names match: `input_scaling`, the backbone's own layer names, `head_dropout`, `leaf_logits`,
    `leaf_probs`). With `pretrained=True` the backbone starts from config["weights"]: "imagenet", a
    weights file path, or "none".

    Returns a model with one input (H, W, 3) of raw 0..255 RGB floats and one output `leaf_probs`, or,
    with `num_parents > 0` (training only), a dict of outputs {"leaf_probs", "parent_probs"} where
    `parent_probs` comes from an auxiliary head on the parent level.
    """
    layers = keras_module.layers
    spec = get_backbone(config["backbone"])
    weights = None
    if pretrained:
        weights = _weights_arg(config.get("weights", "imagenet"))
    if spec.edgetpu_note:
        log.warning("%s: %s", spec.name, spec.edgetpu_note)
    backbone = spec.build(keras_module, config["input_size"], config.get("alpha", 1.0), weights)
    if pretrained and spec.bgr_weights and weights is not None:
        _flip_first_conv_channels(backbone)
    size = config["input_size"]
    inputs = keras_module.Input((size, size, 3), name="image")
    features = backbone(spec.scaling_layer(keras_module)(inputs))
    features = layers.Dropout(config.get("dropout", 0.2), name="head_dropout")(features)
    logits = layers.Dense(num_leaves, name="leaf_logits")(features)
    leaf_probs = layers.Softmax(name="leaf_probs")(logits)
    outputs = leaf_probs
    if num_parents:
        parent_logits = layers.Dense(num_parents, name="parent_logits")(features)
        outputs = {
            "leaf_probs": leaf_probs,
            "parent_probs": layers.Softmax(name="parent_probs")(parent_logits),
        }
    return keras_module.Model(inputs, outputs, name="taxonedge_classifier")


def _weights_arg(weights: str | None) -> str | None:
    if weights in (None, "none", ""):
        return None
    return weights


def _flip_first_conv_channels(backbone: Any) -> None:
    # VGG16 ImageNet weights expect BGR input; our model feeds RGB, so reverse the first kernel's input axis.
    conv = next(layer for layer in backbone.layers if layer.__class__.__name__ == "Conv2D")
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel[:, :, ::-1, :], bias])


def backbone_of(model: Any) -> Any:
    """The backbone sub-model inside a classifier built by `build_classifier`."""
    return next(layer for layer in model.layers if hasattr(layer, "layers"))


def inference_model(model: Any, keras_module: Any, temperature: float = 1.0) -> Any:
    """The single-output model to save: leaf probabilities with the temperature folded into `leaf_logits`
    (kernel and bias scaled by 1/T, so softmax(logits / T) is computed without any extra layer)."""
    leaf = model.get_layer("leaf_probs").output
    single = keras_module.Model(model.inputs, leaf, name=model.name)
    dense = single.get_layer("leaf_logits")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel / temperature, bias / temperature])
    return single


LEAF_OUTPUT = "leaf_logits"
EMBEDDING_OUTPUT = "embedding"


def export_model(model: Any, keras_module: Any) -> Any:
    """The model a bundle carries: two outputs of one invoke, named for the device's signature runner,
    `leaf_logits` (temperature folded in; the device takes the softmax in float, so confident answers keep
    their ranking instead of saturating at 255/256) and `embedding` (the pooled features the leaf layer
    reads: no-item detection and enrolled products compare them).

    `model` is a classifier from `build_classifier`/`inference_model` (Keras 3, or tf_keras after QAT,
    where tfmot wraps each layer: the wrapper's inner layer keeps the name)."""
    named = [layer for layer in model.layers if getattr(layer, "layer", layer).name == "leaf_logits"]
    if named:
        logits, embedding = named[0].output, named[0].input
    else:  # a classifier built elsewhere: Softmax(Dense(features)) at the end
        last = model.layers[-1]
        inner = getattr(last, "layer", last)
        activation = getattr(getattr(inner, "activation", None), "__name__", "")
        if "softmax" not in (inner.__class__.__name__.lower(), activation):
            raise ValueError(
                f"the model does not end in a softmax over leaf logits (its last layer is {last.name}): "
                "convert it with --outputs probabilities"
            )
        logits = last.input
        embedding = _producer(logits).input
    outputs = {LEAF_OUTPUT: logits, EMBEDDING_OUTPUT: embedding}
    return keras_module.Model(model.inputs, outputs, name=model.name + "_export")


def _producer(tensor: Any) -> Any:
    """The layer that made a symbolic tensor (Keras 3 names it `operation`, tf_keras `layer`)."""
    history = tensor._keras_history
    return getattr(history, "operation", None) or history.layer


def unfreeze_top(backbone: Any, count: int) -> int:
    """Make the top `count` layers of the backbone trainable, every BatchNormalization layer frozen.

    BN layers are frozen explicitly: under Keras 3.15 `fit` passes training=True through the functional
    graph, so calling the base with training=False would still update their statistics. Returns the number
    of trainable layers with weights.
    """
    backbone.trainable = True
    layers = backbone.layers
    boundary = max(0, len(layers) - count) if count >= 0 else 0
    trainable = 0
    for i, layer in enumerate(layers):
        is_bn = layer.__class__.__name__ == "BatchNormalization"
        layer.trainable = i >= boundary and not is_bn
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable


def recalibrate_batchnorm(feature_model: Any, backbone: Any, images: Any) -> None:
    """Set every BatchNorm layer's moving statistics to those of `images` (one pass in training mode).

    For a backbone without pretrained weights (`--weights none`): its initial statistics (mean 0, var 1)
    make the features vanish (about 1e-11 after MobileNetV2's 50 BN layers), so nothing could train on them.
    """
    bns = [layer for layer in backbone.layers if layer.__class__.__name__ == "BatchNormalization"]
    momenta = [bn.momentum for bn in bns]
    try:
        for bn in bns:
            bn.momentum = 0.0  # moving statistics := this batch's statistics
        feature_model([images], training=True)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
