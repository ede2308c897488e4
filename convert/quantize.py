"""Keras model -> TFLite bytes (full int8, float16 or dynamic range), and running a TFLite model on images.

`to_tflite` works for Keras 3 models and for the tf_keras models of quantization-aware training, so both
paths convert the same way. TensorFlow is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Sequence
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
    """Convert `model` (one input of raw pixels; one output, or a dict of named outputs) with batch size
    fixed to 1.

    int8: full integer (TFLITE_BUILTINS_INT8 only), uint8 input and output, calibrated on `calibration`
    (N x H x W x 3 raw pixels). float16 / dynamic: CPU-only options, float input and output.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    # A static batch of 1: the Edge TPU compiler and delegates need static shapes.
    inp = keras_module.Input(batch_shape=(1, *model.input_shape[1:]))
    outputs = model(inp)
    if isinstance(outputs, dict):  # tf_keras names signature outputs after layers, Keras 3 after the keys
        outputs = {key: keras_module.layers.Activation("linear", name=key)(t) for key, t in outputs.items()}
    fixed = keras_module.Model(inp, outputs)
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
    them: the leaf output (`leaf_logits` when the model has named outputs, else its one output) and the
    embedding output, if any."""
    from taxonedge.edge.kernel.runtime import make_interpreter
    from taxonedge.train.model import EMBEDDING_OUTPUT, LEAF_OUTPUT

    interpreter = make_interpreter(model)
    inputs = interpreter.get_input_details()
    if len(inputs) != 1:
        raise QuantizationError(f"the model has {len(inputs)} inputs; expected 1")
    outputs = _outputs_by_name(interpreter)
    if LEAF_OUTPUT in outputs:
        leaf_name, kind = LEAF_OUTPUT, "leaf_logits"
    elif len(outputs) == 1:
        leaf_name, kind = next(iter(outputs)), "leaf_probabilities"
    else:
        raise QuantizationError(f"the model has outputs {sorted(outputs)}; expected '{LEAF_OUTPUT}'")
    leaf = outputs[leaf_name]
    (in_scale, in_zero), (out_scale, out_zero) = inputs[0]["quantization"], leaf["quantization"]
    info = {
        "input_shape": tuple(int(d) for d in inputs[0]["shape"]),
        "input_dtype": np.dtype(inputs[0]["dtype"]).name,
        "input_scale": float(in_scale) or 1.0,  # 0.0 means "not quantized": raw values
        "input_zero_point": int(in_zero),
        "output_shape": tuple(int(d) for d in leaf["shape"]),
        "output_name": leaf_name,
        "output_kind": kind,
        "output_dtype": np.dtype(leaf["dtype"]).name,
        "output_scale": float(out_scale),
        "output_zero_point": int(out_zero),
        "embedding": None,
    }
    if EMBEDDING_OUTPUT in outputs:
        emb = outputs[EMBEDDING_OUTPUT]
        scale, zero = emb["quantization"]
        info["embedding"] = {
            "name": EMBEDDING_OUTPUT,
            "dtype": np.dtype(emb["dtype"]).name,
            "scale": float(scale) or 1.0,
            "zero_point": int(zero),
            "size": int(emb["shape"][-1]),
        }
    return info


def _outputs_by_name(interpreter: Any) -> dict[str, dict]:
    """Signature-runner output name -> output details (`get_output_details()` order is not the Keras
    order; a model without signatures has one output, `output_0`)."""
    details = interpreter.get_output_details()
    signatures = interpreter.get_signature_list()
    if not signatures:
        return {"output_0": details[0]}
    key = next(iter(signatures))
    by_index = {d["index"]: d for d in details}
    runner = interpreter.get_signature_runner(key).get_output_details()
    return {name: by_index[d["index"]] for name, d in runner.items()}


def run_tflite(
    model: bytes, images: Iterable[np.ndarray], desc: str = "", total: int | None = None
) -> dict[str, np.ndarray]:
    """Each output's raw tensor for each image (name -> N x C, in the model's output dtype), one invoke per
    image as on the device, through the device's interpreter. `total`: for the progress bar of a generator."""
    from taxonedge.edge.kernel.runtime import make_interpreter
    from tqdm import tqdm

    interpreter = make_interpreter(model)
    inp = interpreter.get_input_details()[0]
    outputs = _outputs_by_name(interpreter)
    results: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
    bar = tqdm(images, desc=desc or "running TFLite", unit="img", leave=False, disable=not desc, total=total)
    for image in bar:
        interpreter.set_tensor(inp["index"], image[np.newaxis].astype(inp["dtype"]))
        interpreter.invoke()
        for name, out in outputs.items():
            results[name].append(interpreter.get_tensor(out["index"])[0].copy())
    return {name: np.stack(values) for name, values in results.items()}
