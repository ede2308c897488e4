"""Keras model -> TFLite bytes (full int8, float16 or dynamic range), and running a TFLite model on images.

`to_tflite` works for Keras 3 models and for the tf_keras models of quantization-aware training, so both
paths convert the same way. TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

MODES = ("int8", "float16", "dynamic")


class QuantizationError(RuntimeError):
    """The converter could not produce the model asked for (e.g. an op with no integer kernel)."""


def stratified(items: Sequence[tuple[str, int]], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Up to `n` items drawn round-robin over the classes (shuffled within each class, seeded), so every
    class is represented in calibration even when the data set is unbalanced."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(by_class.items())]
    out: list[tuple[str, int]] = []
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop())
    return out


def to_tflite(
    model: Any, keras_module: Any, mode: str = "int8", calibration: np.ndarray | None = None
) -> bytes:
    """Convert `model` (one input of raw pixels, one output) with batch size fixed to 1.

    int8: full integer (TFLITE_BUILTINS_INT8 only), uint8 input and output, calibrated on `calibration`
    (N x H x W x 3 raw pixels). float16 / dynamic: CPU-only options, float input and output.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    # A static batch of 1: the Edge TPU compiler and delegates need static shapes.
    inp = keras_module.Input(batch_shape=(1, *model.input_shape[1:]))
    fixed = keras_module.Model(inp, model(inp))
    converter = tf.lite.TFLiteConverter.from_keras_model(fixed)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        if calibration is None or len(calibration) == 0:
            raise QuantizationError("full-int8 conversion needs calibration images")
        samples = calibration.astype(np.float32)
        # Pin the observed input range to exactly 0..255 (one pixel each in the first sample), so the uint8
        # input tensor gets scale 1.0 / zero point 0 and takes raw pixels as the device feeds them.
        samples[0, 0, 0, :] = 0.0
        samples[0, 0, 1, :] = 255.0
        converter.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.uint8
    elif mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        # Keras' export prints a page of "Saved artifact ... Captures" to stdout: keep the CLI output
        # readable.
        with contextlib.redirect_stdout(io.StringIO()):
            return converter.convert()
    except (
        Exception
    ) as exc:  # the converter raises ConverterError/RuntimeError/ValueError for unsupported ops
        first = str(exc).strip().splitlines()
        reason = next(
            (line for line in first if "error" in line.lower()), first[0] if first else type(exc).__name__
        )
        raise QuantizationError(
            f"the TFLite converter could not make a {mode} model: {reason[:400]}"
            + (
                " (an op without an integer kernel? try --mode dynamic for a CPU-only model)"
                if mode == "int8"
                else ""
            )
        ) from None


def io_details(model: bytes) -> dict[str, Any]:
    """Input and output tensor facts of a converted model, named as the device's signature runner names
    them."""
    from taxonedge.edge.kernel.runtime import make_interpreter

    interpreter = make_interpreter(model)
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise QuantizationError(
            f"the model has {len(inputs)} inputs and {len(outputs)} outputs; expected 1 and 1"
        )
    signatures = interpreter.get_signature_list()
    names = next(iter(signatures.values()))["outputs"] if signatures else ["output_0"]
    (in_scale, in_zero), (out_scale, out_zero) = inputs[0]["quantization"], outputs[0]["quantization"]
    return {
        "input_shape": tuple(int(d) for d in inputs[0]["shape"]),
        "input_dtype": np.dtype(inputs[0]["dtype"]).name,
        "input_scale": float(in_scale) or 1.0,  # 0.0 means "not quantized": raw values
        "input_zero_point": int(in_zero),
        "output_shape": tuple(int(d) for d in outputs[0]["shape"]),
        "output_name": names[0],
        "output_dtype": np.dtype(outputs[0]["dtype"]).name,
        "output_scale": float(out_scale),
        "output_zero_point": int(out_zero),
    }


def run_tflite(model: bytes, images: np.ndarray, desc: str = "") -> np.ndarray:
    """The raw output tensor for each image (N x C, in the model's output dtype), one invoke per image as on
    the device, through the device's interpreter."""
    from taxonedge.edge.kernel.runtime import make_interpreter
    from tqdm import tqdm

    interpreter = make_interpreter(model)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for image in tqdm(images, desc=desc or "running TFLite", unit="img", leave=False, disable=not desc):
        interpreter.set_tensor(inp["index"], image[np.newaxis].astype(inp["dtype"]))
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(results)
