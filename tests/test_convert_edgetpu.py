"""Edge TPU checks: parsing recorded edgetpu_compiler logs, the static report on real TFLite models, and the
backbone warnings. The compiler cannot be installed here; the logs are in its real output format."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from taxonedge.convert.edgetpu import (
    EdgeTpuError,
    backbone_warnings,
    check_model,
    edgetpu_report,
    parse_compiler_log,
)

from .conftest import REFERENCE, needs_shared

DATA = Path(__file__).parent / "data"


def _log(name: str) -> dict:
    return parse_compiler_log((DATA / f"edgetpu_compiler_{name}.log").read_text())


def test_parse_all_mapped_log():
    report = _log("all_mapped")
    assert report["compiled"] and report["all_mapped"]
    assert report["total_ops"] == 67 and report["edgetpu_ops"] == 67 and report["cpu_ops"] == 0
    assert report["on_chip_memory_used"] == "2.98MiB" and report["off_chip_memory_used"] == "0.00B"
    assert report["subgraphs"] == 1 and report["compiler_version"] == "16.0.384591198"
    assert {r["op"]: r["count"] for r in report["operators"]}["CONV_2D"] == 36
    assert report["not_mapped"] == [] and report["errors"] == []


def test_parse_partially_mapped_log():
    report = _log("partial")
    assert report["compiled"] and not report["all_mapped"]
    assert (report["edgetpu_ops"], report["cpu_ops"], report["total_ops"]) == (3, 125, 128)
    reasons = {r["op"]: r["status"] for r in report["not_mapped"] if r["op"] == "HARD_SWISH"}
    assert reasons == {"HARD_SWISH": "Operation not supported"}
    # The same op can appear both mapped and not (before and after the split): both rows are kept.
    conv = [r for r in report["operators"] if r["op"] == "CONV_2D"]
    assert sorted(r["count"] for r in conv) == [1, 33]


def test_parse_failed_compile_log():
    report = _log("op_version")
    assert not report["compiled"] and not report["all_mapped"]
    assert any("FULLY_CONNECTED' version '12'" in e for e in report["errors"])
    assert report["operators"] == []


def test_parse_garbage_is_not_success():
    report = parse_compiler_log("Segmentation fault (core dumped)\n")
    assert not report["compiled"] and not report["all_mapped"]


@needs_shared(REFERENCE / "mobilenet_v2_1.0_224_quant.tflite")
def test_static_check_passes_googles_edgetpu_model():
    static = check_model((REFERENCE / "mobilenet_v2_1.0_224_quant.tflite").read_bytes())
    assert static["compatible"], static["problems"]
    assert static["ops_total"] == static["ops_supported"] > 60 and static["split_at_op"] is None


def _convert(model, int8: bool) -> bytes:
    import numpy as np
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        x = np.random.default_rng(0).uniform(0, 255, (8, *model.input_shape[1:])).astype("float32")
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([x[i : i + 1]] for i in range(len(x)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    return converter.convert()


@pytest.mark.slow
def test_static_check_finds_hard_swish_split_and_float_tensors():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    inp = keras.Input(batch_shape=(1, 16, 16, 3))
    h = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inp))
    h = keras.layers.Activation("hard_swish")(h)  # what MobileNetV3 uses
    h = keras.layers.Conv2D(4, 3)(h)
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)

    static = check_model(_convert(model, int8=True))
    assert not static["compatible"] and static["unsupported_ops"] == ["HARD_SWISH"]
    assert static["split_at_op"] == 2 and static["float_tensors"] == 0  # QUANTIZE, CONV_2D, then the split
    assert "would run on the CPU" in static["problems"][0]

    float_model = _convert(model, int8=False)
    static = check_model(float_model)
    assert static["float_tensors"] > 0 and any("full-int8" in p for p in static["problems"])
    with pytest.raises(EdgeTpuError, match="needs full int8"):
        edgetpu_report(float_model, "float16", "mobilenet_v2", policy="require")


def test_absent_compiler_is_said_plainly(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    model = REFERENCE / "mobilenet_v2_1.0_224_quant.tflite"
    if not model.exists():
        pytest.skip("../shared not available")
    report, compiled = edgetpu_report(model.read_bytes(), "int8", "mobilenet_v2", policy="auto")
    assert compiled is None and report["status"] == "compiler not found"
    assert report["summary"].startswith("edgetpu_compiler not on PATH: shipping the CPU model only")
    with pytest.raises(EdgeTpuError, match="not on PATH"):
        edgetpu_report(model.read_bytes(), "int8", "mobilenet_v2", policy="require")


def test_backbone_warnings():
    assert "8 MB on-chip memory" in backbone_warnings("vgg16")[0]
    assert "hard-swish" in backbone_warnings("mobilenet_v3_small")[0]
    assert "hard-swish" in backbone_warnings("mobilenet_v3_large")[0]
    assert backbone_warnings("mobilenet_v2", 3_000_000) == []
    assert "over the Edge TPU's 8 MiB" in backbone_warnings("mobilenet_v2", 20_000_000)[0]
