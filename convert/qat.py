"""Quantization-aware training, in a separate process under legacy Keras.

tfmot 0.8 only quantizes tf_keras models, and importing it flips a process to legacy Keras, so it must
never share a process with the Keras 3 model (../shared/docs/toolchain.md). The parent saves the trained
weights by layer name plus the training and calibration images to a temporary folder and starts
`python -m taxonedge.convert.qat` with TF_USE_LEGACY_KERAS=1. The child rebuilds the architecture with
`taxonedge.train.model.build_classifier(config, num_leaves, tf_keras)`, flattens the nested backbone
(tfmot refuses a model inside a model), copies the weights, checks it reproduces the float outputs,
annotates every layer tfmot supports, fine-tunes briefly and converts exactly like post-training int8.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

LEARNING_RATE = 1e-5  # a short, gentle fine-tune: learn the quantization ranges, keep the trained weights


class QatError(RuntimeError):
    """Quantization-aware training failed; the message has the child's last error line."""


def layer_weights(model: Any) -> dict[str, list[np.ndarray]]:
    """{layer name: weights} for every layer with weights, descending into nested models."""
    out: dict[str, list[np.ndarray]] = {}
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out.update(layer_weights(layer))
        elif layer.weights:
            out[layer.name] = [np.asarray(w) for w in layer.get_weights()]
    return out


def run_qat(
    run: Any,
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    calibration: np.ndarray,
    epochs: int = 1,
    seed: int = 0,
    timeout: float = 6 * 3600,
    outputs: str = "logits",
) -> bytes:
    """Fine-tune `model` (Keras 3, the run's float model) quantization-aware; returns full-int8 TFLite
    bytes with the outputs `outputs` says (logits: leaf logits and embedding; probabilities: one output)."""
    with tempfile.TemporaryDirectory(prefix="taxonedge-qat-") as tmp:
        tmp_path = Path(tmp)
        weights = layer_weights(model)
        np.savez(
            tmp_path / "weights.npz",
            **{f"{name}::{i}": w for name, ws in weights.items() for i, w in enumerate(ws)},
        )
        check = calibration[:4].astype(np.float32)
        np.savez(
            tmp_path / "data.npz",
            images=images,
            labels=labels,
            calibration=calibration,
            check_inputs=check,
            check_outputs=model.predict(check, verbose=0),
        )
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        cmd = [
            sys.executable,
            "-m",
            "taxonedge.convert.qat",
            "--run",
            str(run.path),
            "--work",
            tmp,
            "--epochs",
            str(epochs),
            "--seed",
            str(seed),
            "--outputs",
            outputs,
        ]
        # The child's progress goes to the user's terminal; its one-line error, if any, to error.txt.
        proc = subprocess.run(cmd, env=env, timeout=timeout)
        result, error = tmp_path / "model.tflite", tmp_path / "error.txt"
        if proc.returncode != 0 or not result.exists():
            reason = error.read_text() if error.exists() else "no error message (killed?)"
            raise QatError(f"quantization-aware training failed (exit {proc.returncode}): {reason}")
        return result.read_bytes()


# ---- the child process ----------------------------------------------------------------------------
def _flatten(model: Any, keras: Any) -> Any:
    """The same graph with nested models inlined, reusing the layer objects (so the weights come along)."""
    mapping: dict[int, Any] = {}

    def lookup(value: Any) -> Any:
        return mapping[id(value)] if keras.backend.is_keras_tensor(value) else value

    def replay(sub: Any, inputs: list[Any]) -> list[Any]:
        for tensor, new in zip(sub.inputs, inputs, strict=True):
            mapping[id(tensor)] = new
        for layer in sub.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            node = next(
                n
                for n in layer._inbound_nodes
                if all(id(t) in mapping for t in _flat(n.input_tensors, keras))
            )
            if hasattr(layer, "layers"):
                outputs = replay(layer, [lookup(t) for t in _flat(node.input_tensors, keras)])
            else:
                args = _map(lookup, node.call_args)
                kwargs = _map(lookup, node.call_kwargs)
                outputs = _flat(layer(*args, **kwargs), keras)
            for tensor, new in zip(_flat(node.output_tensors, keras), outputs, strict=True):
                mapping[id(tensor)] = new
        return [mapping[id(t)] for t in sub.outputs]

    inputs = [keras.Input(batch_shape=t.shape, name=t.name.split(":")[0]) for t in model.inputs]
    outputs = replay(model, inputs)
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name + "_flat")


def _flat(value: Any, keras: Any) -> list[Any]:
    import tensorflow as tf

    return [v for v in tf.nest.flatten(value) if keras.backend.is_keras_tensor(v)]


def _map(fn: Any, structure: Any) -> Any:
    import tensorflow as tf

    return tf.nest.map_structure(fn, structure)


def _per_channel_depthwise() -> None:
    """Make tfmot quantize depthwise kernels per channel, as the converter does after training.

    tfmot 0.8's conv weight quantizer sizes its per-axis ranges by the kernel's last axis, which for a
    depthwise kernel (h, w, channels, 1) is the depth multiplier: one range for all channels
    (tensorflow/model-optimization#808). The converter then writes per-channel scales that are all equal,
    so a channel with small weights keeps only a few int8 levels, far coarser than post-training int8
    (measured on the 288 px Grocery model, QAT with no fine-tuning epoch: 77.4 % leaf before this,
    84.1 % after, as post-training int8's 84.5 %). Here a depthwise kernel gets one range per channel:
    the kernel is seen as (h, w, 1, channels) for the fake quantization, as tfmot's own Conv2DTranspose
    quantizer transposes.
    """
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantizers,
    )

    cls = default_8bit_quantizers.Default8BitConvWeightsQuantizer
    if getattr(cls, "_taxonedge_per_channel_depthwise", False):
        return
    build, call = cls.build, cls.__call__

    def per_channel_build(self: Any, tensor_shape: Any, name: str, layer: Any) -> Any:
        if name.endswith("depthwise_kernel") and len(tensor_shape) == 4 and tensor_shape[-1] == 1:
            return build(self, (tensor_shape[0], tensor_shape[1], 1, tensor_shape[-2]), name, layer)
        return build(self, tensor_shape, name, layer)

    def per_channel_call(self: Any, inputs: Any, training: Any, weights: Any, **kwargs: Any) -> Any:
        import tensorflow as tf

        if (
            weights["min_var"].shape[0] == inputs.shape[-1]
        ):  # ranges along the last axis: not a depthwise kernel
            return call(self, inputs, training, weights, **kwargs)
        outputs = call(self, tf.transpose(inputs, (0, 1, 3, 2)), training, weights, **kwargs)
        return tf.transpose(outputs, (0, 1, 3, 2))

    cls.build, cls.__call__ = per_channel_build, per_channel_call
    cls._taxonedge_per_channel_depthwise = True


def quantize(model: Any) -> Any:
    """tfmot's quantization-aware model. Every layer tfmot handles is annotated (BatchNormalization has no
    config of its own but is folded by tfmot's Conv+BN transforms); the input Rescaling stays float here and
    is calibrated by the converter like in post-training quantization."""
    import tensorflow_model_optimization as tfmot
    import tf_keras

    # The registry is not in tfmot's public API; 0.8.1 is pinned in pyproject (toolchain.md).
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_registry,
    )

    _per_channel_depthwise()
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()

    def annotate(layer: Any) -> Any:
        if registry.supports(layer) or layer.__class__.__name__ == "BatchNormalization":
            return tfmot.quantization.keras.quantize_annotate_layer(layer)
        return layer

    with tfmot.quantization.keras.quantize_scope():
        annotated = tf_keras.models.clone_model(model, clone_function=annotate)
        annotated.set_weights(model.get_weights())
        return tfmot.quantization.keras.quantize_apply(annotated)


def freeze_batchnorm(qmodel: Any) -> None:
    for layer in qmodel.layers:
        if getattr(layer, "layer", layer).__class__.__name__ == "BatchNormalization":
            layer.trainable = False  # keep the trained statistics (small batches would wreck them)


def calibrate_ranges(qmodel: Any, calibration: np.ndarray, batch: int = 16) -> None:
    """Start the activation ranges from the calibration images instead of tfmot's fixed [-6, 6].

    tfmot moves each range by an EMA with decay 0.999 per training step, so a short fine-tune would run
    with clipped activations (seen: 3 % agreement with the float model). Here the ranges become the mean of
    per-batch min/max over the calibration set, as post-training calibration does; fine-tuning then
    continues with tfmot's own decay.
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quant_ops

    original = quant_ops.MovingAvgQuantize
    decay = [0.0]

    def running_mean(*args: Any, **kwargs: Any) -> Any:
        kwargs["ema_decay"] = decay[0]
        return original(*args, **kwargs)

    dropouts = [
        layer for layer in qmodel.layers if getattr(layer, "layer", layer).__class__.__name__ == "Dropout"
    ]
    rates = [getattr(layer, "layer", layer).rate for layer in dropouts]
    quant_ops.MovingAvgQuantize = running_mean
    try:
        for layer in dropouts:
            getattr(layer, "layer", layer).rate = 0.0
        for i, start in enumerate(range(0, len(calibration), batch)):
            decay[0] = i / (i + 1)  # equal weight for every batch
            qmodel(calibration[start : start + batch], training=True)  # eager: the decay is read per call
    finally:
        quant_ops.MovingAvgQuantize = original
        for layer, rate in zip(dropouts, rates, strict=True):
            getattr(layer, "layer", layer).rate = rate


def _child(args: argparse.Namespace) -> None:
    if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
        raise QatError("run with TF_USE_LEGACY_KERAS=1 (set before TensorFlow is imported)")
    import tf_keras
    from taxonedge.train.model import build_classifier, export_model
    from taxonedge.train.rundir import load_run

    from .quantize import to_tflite

    tf_keras.utils.set_random_seed(args.seed)
    run = load_run(args.run)
    work = Path(args.work)
    model = _flatten(build_classifier(run.config, run.taxonomy.num_leaves, tf_keras), tf_keras)
    with np.load(work / "weights.npz") as saved:
        weights: dict[str, dict[int, np.ndarray]] = {}
        for key in saved.files:
            name, _, i = key.rpartition("::")
            weights.setdefault(name, {})[int(i)] = saved[key]
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in weights:
            raise QatError(f"layer '{layer.name}' of the rebuilt model has no trained weights in the run")
        saved_layer = weights.pop(layer.name)
        layer.set_weights([saved_layer[i] for i in range(len(saved_layer))])
    if weights:
        raise QatError(
            f"trained weights for layers the rebuilt model lacks: {', '.join(sorted(weights)[:5])}"
        )
    data = np.load(work / "data.npz")
    got = model.predict(data["check_inputs"], verbose=0)
    if not np.allclose(got, data["check_outputs"], atol=1e-3):
        raise QatError(
            "the tf_keras rebuild does not reproduce the Keras 3 model's outputs "
            f"(max difference {np.abs(got - data['check_outputs']).max():.4f})"
        )

    qmodel = quantize(model)
    freeze_batchnorm(qmodel)
    calibrate_ranges(qmodel, data["calibration"].astype(np.float32))
    qmodel.compile(
        optimizer=tf_keras.optimizers.Adam(LEARNING_RATE),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    images, labels = data["images"].astype(np.float32), data["labels"]
    qmodel.fit(images, labels, epochs=args.epochs, batch_size=16, shuffle=True, verbose=2)  # one line/epoch
    exported = export_model(qmodel, tf_keras) if args.outputs == "logits" else qmodel
    tflite = to_tflite(exported, tf_keras, "int8", data["calibration"])
    (work / "model.tflite").write_bytes(tflite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m taxonedge.convert.qat",
        description="Quantization-aware training child process (used by convert).",
    )
    parser.add_argument("--run", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outputs", choices=("logits", "probabilities"), default="logits")
    args = parser.parse_args(argv)
    try:
        _child(args)
    except Exception as exc:  # one line for the parent's error message; the traceback goes to stderr
        import traceback

        traceback.print_exc()
        line = (f"{type(exc).__name__}: {exc}".splitlines() or ["error"])[0][:500]
        (Path(args.work) / "error.txt").write_text(line)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
