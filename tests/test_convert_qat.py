"""Quantization-aware training on a tiny real EfficientNet-Lite0 (32 px) built by the trainer's
`build_classifier`: the child process rebuilds it under tf_keras, fine-tunes with tfmot and converts."""

from __future__ import annotations

import numpy as np
import pytest
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.runtime import Classifier

from .test_convert import write_run

pytestmark = pytest.mark.slow


def forced_qat_bundle(tmp_path, tiny_tree, tiny_val_tree, **config):
    """A bundle from `convert --qat auto` on a 4-epoch tiny model of `config` at 32 px, from random weights.

    An impossible allowance makes post-training int8 miss the gate, so --qat auto must run QAT; --force then
    writes the QAT bundle so that it can be checked.
    """
    from taxonedge.convert.converter import Options, convert
    from taxonedge.train.model import build_classifier

    config = {"input_size": 32, "dropout": 0.0, "weights": "none", "seed": 0, **config}
    run = write_run(
        tmp_path / "run", tiny_tree, tiny_val_tree, config=config, epochs=4, build=build_classifier
    )
    out = tmp_path / "qat.tebundle"
    options = Options(
        run=run,
        out=out,
        qat="auto",
        max_drop=-50,
        force=True,
        calibration_images=16,
        qat_images=32,
        edgetpu="skip",
    )
    result = convert(options)
    assert "post_training" in result.gate and result.gate["forced"]
    return read_bundle(out)


def test_qat_auto_runs_after_the_gate_fails_and_makes_a_full_int8_bundle(tmp_path, tiny_tree, tiny_val_tree):
    """On EfficientNet-Lite0, the shipped backbone, whose layers are this project's own code (the child
    rebuilds them under tf_keras by name). MobileNetV2 comes from keras.applications in both Keras; its
    rebuild is pinned by test_train.py::test_build_classifier_rebuilds_in_tf_keras_and_takes_the_weights.
    One QAT conversion here rather than one per backbone: each costs about 100 s of the suite."""
    from taxonedge.convert.edgetpu import check_model

    bundle = forced_qat_bundle(tmp_path, tiny_tree, tiny_val_tree, backbone="efficientnet_lite0")
    m = bundle.manifest
    assert m.quantization.qat and m.quantization.mode == "int8" and m.model.backbone == "efficientnet_lite0"
    assert (m.input.dtype, m.input.scale, m.input.zero_point) == ("uint8", 1.0, 0)
    static = check_model(bundle.model_bytes())
    assert static["float_tensors"] == 0 and static["unsupported_ops"] == [] and static["compatible"], static
    assert set(m.metrics["per_level"]) == {"depth_1", "depth_2", "leaf"}
    inputs, outputs = bundle.golden()
    classifier = Classifier(bundle)
    for image, expected in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(classifier.raw(image), expected)
        assert classifier.probabilities(image).sum() == pytest.approx(1.0, abs=0.05)  # a real softmax output
    # Depthwise kernels are quantized per channel, as in post-training int8: each channel's largest weight
    # uses the full int8 range. (tfmot alone gives a depthwise kernel one range for all channels,
    # tensorflow/model-optimization#808: the converter still writes per-channel scales, all equal, and
    # channels with small weights keep only a few levels.)
    filters = depthwise_filters(bundle.model_bytes())
    assert filters
    for peaks in filters:
        assert len(peaks) > 1 and (peaks[peaks > 0] >= 126).all(), peaks


def depthwise_filters(model: bytes) -> list[np.ndarray]:
    """For every DEPTHWISE_CONV_2D filter of a TFLite model, the largest |int8 weight| of each channel."""
    from taxonedge.edge.kernel.runtime import interpreter_module

    module, _ = interpreter_module()
    interpreter = module.Interpreter(model_content=model)
    found = []
    for op in interpreter._get_ops_details():
        if op["op_name"] == "DEPTHWISE_CONV_2D":
            weights = interpreter.get_tensor(op["inputs"][1]).astype(np.int32)  # (1, h, w, channels)
            found.append(np.abs(weights).max(axis=(0, 1, 2)))
    return found
