"""The TFLite runtime on the device: interpreter import, Edge TPU delegate, and one classifier adapter.

Small and plain in the style of pycoral's `common.py` / `classify.py`. No TensorFlow: the interpreter
comes from `tflite_runtime` (old images, numpy 1) or `ai_edge_litert` (its successor, numpy 2).
"""

from __future__ import annotations

import gc
import importlib
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .prototypes import EmbeddingSpace, centroid_scores

if TYPE_CHECKING:  # not at run time: the inference worker imports this module and must stay small
    from .bundle import Bundle

EDGETPU_LIBRARY = "libedgetpu.so.1"
# Where the kernel shows Coral accelerators: PCIe and M.2 cards (and the Dev Board's) as /dev/apex_N, the
# USB Accelerator by its USB ids, before its firmware is loaded (Global Unichip) and after (Google).
DEV_ROOT = Path("/dev")
USB_ROOT = Path("/sys/bus/usb/devices")
CORAL_USB_IDS = frozenset({("1a6e", "089a"), ("18d1", "9302")})


class EdgeTpuUnavailable(RuntimeError):
    """The Edge TPU delegate could not be loaded (library absent, no device, or USB error)."""


class ModelError(ValueError):
    """A model the interpreter refuses or whose tensors do not match the bundle manifest."""


@cache
def interpreter_module() -> tuple[Any, str]:
    """(module with Interpreter and load_delegate, its name). tflite_runtime first: it is what Coral images
    ship."""
    errors = []
    for name in ("tflite_runtime.interpreter", "ai_edge_litert.interpreter"):
        try:
            module = importlib.import_module(name)
            # tflite_runtime 2.14 imports under numpy 2 but fails later; probe it here.
            if name.startswith("tflite_runtime") and int(np.__version__.split(".")[0]) >= 2:
                errors.append(f"{name}: built for numpy 1, numpy {np.__version__} is installed")
                continue
            return module, name.split(".")[0]
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise ImportError(
        "no TFLite runtime: pip install 'taxonedge[edge]' (ai-edge-litert). Tried: " + "; ".join(errors)
    )


def load_edgetpu_delegate(device: str | None = None, library: str = EDGETPU_LIBRARY) -> Any:
    """The Edge TPU delegate for `device` ("usb", "usb:0", "pci:0" or None for the first one found)."""
    module, _ = interpreter_module()
    options = {"device": device} if device else {}
    previous_hook, sys.unraisablehook = sys.unraisablehook, quiet_failed_delegate
    try:
        try:
            return module.load_delegate(library, options)
        except (
            OSError,
            ValueError,
            RuntimeError,
        ) as exc:  # OSError: library absent; ValueError: older runtimes
            message = f"Edge TPU delegate {library} ({device or 'any device'}): {exc}"
        # Raised outside the except block so the half-built Delegate is freed now, under the quiet hook.
        gc.collect()
        raise EdgeTpuUnavailable(message)
    finally:
        sys.unraisablehook = previous_hook


def edgetpu_devices(device: str | None = None) -> list[str]:
    """The Edge TPUs the kernel shows ("pci:/dev/apex_0", "usb:2-1"), of the kind `device` names ("usb",
    "usb:0", "pci:0"; None: any), found without loading libedgetpu.

    A cheap look before a re-probe: probing means a new worker process (a Python start-up's CPU, which
    showed as 9-12 ms frames against 5.5 ms on a 2-core board), wasted every minute on a board that has
    no accelerator plugged in.
    """
    kind = device.split(":")[0] if device else None
    found = []
    if kind in (None, "pci"):
        found += [f"pci:{path}" for path in sorted(DEV_ROOT.glob("apex_*"))]
    if kind in (None, "usb"):
        for path in sorted(USB_ROOT.glob("*")):
            try:
                ids = ((path / "idVendor").read_text().strip(), (path / "idProduct").read_text().strip())
            except OSError:  # interfaces and hubs without ids
                continue
            if ids in CORAL_USB_IDS:
                found.append(f"usb:{path.name}")
    return found


def quiet_failed_delegate(unraisable: Any) -> None:
    """sys.unraisablehook that drops one known error and passes on the rest.

    ai_edge_litert's Delegate.__del__ raises AttributeError when load_delegate failed (no libedgetpu): a
    traceback on every probe would bury the one clear line the daemon logs for that failure.
    """
    if isinstance(unraisable.exc_value, AttributeError) and "Delegate" in repr(unraisable.object):
        return
    sys.__unraisablehook__(unraisable)


def make_interpreter(model: bytes, num_threads: int | None = None, delegate: Any = None) -> Any:
    module, _ = interpreter_module()
    try:
        interpreter = module.Interpreter(
            model_content=model,
            num_threads=num_threads,
            experimental_delegates=[delegate] if delegate is not None else None,
        )
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"the interpreter refused the model: {exc}") from exc
    return interpreter


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if values.dtype == np.float32 or scale == 0:
        return values.astype(np.float32)
    return (scale * (values.astype(np.float32) - zero_point)).astype(np.float32)


@dataclass(frozen=True)
class InterpreterModel:
    """What an interpreter needs from a bundle, as plain values: the inference worker receives this, not the
    Bundle, so that it never imports the bundle's pydantic, OpenCV and cryptography (a worker of 52 MB
    instead of 91 MB with the reference MobileNetV2)."""

    artifacts: dict[str, bytes]  # backend name -> the model it runs; "cpu" always
    height: int
    width: int
    dtype: str  # the input tensor's
    output_name: str  # signature-runner name of the leaf output
    num_classes: int
    output_scale: float
    output_zero_point: int
    golden_inputs: np.ndarray | None = None  # the self-test images, used for warm-up
    output_kind: str = "leaf_probabilities"  # or "leaf_logits" (v3)
    # v3: (signature name, size, scale, zero point) of the embedding output, None when the model has none
    embedding: tuple[str, int, float, int] | None = None
    # v3, optional: the centroid term's (weight, temperature) and the space it is computed in
    centroid: tuple[float, float] | None = None
    centroid_space: EmbeddingSpace | None = None

    @classmethod
    def of(cls, bundle: Bundle) -> InterpreterModel:
        spec, out, emb = bundle.manifest.input, bundle.manifest.output, bundle.manifest.embedding
        golden = bundle.golden()
        return cls(
            bundle.artifacts(),
            spec.height,
            spec.width,
            spec.dtype,
            out.name,
            out.num_classes,
            out.scale,
            out.zero_point,
            golden[0] if golden is not None else None,
            out.kind,
            (emb.name, emb.size, emb.scale, emb.zero_point) if emb is not None else None,
            (out.centroid.weight, out.centroid.temperature) if out.centroid is not None else None,
            bundle.embedding_space() if out.centroid is not None else None,
        )

    def has_artifact(self, backend: str) -> bool:
        return backend in self.artifacts


class Classifier:
    """One interpreter for one bundle: `raw(image)` gives the leaf output tensor, `scores(image)` it
    dequantized (logits or probabilities, as the manifest says; with the bundle's centroid term added),
    `probabilities(image)` leaf probabilities,
    `outputs(image)` the scores and the embedding of one invoke.

    The input and output tensors are found through the signature runner names recorded in the manifest,
    because `get_output_details()` order is not the Keras output order.
    """

    def __init__(
        self,
        bundle: Bundle | InterpreterModel,
        num_threads: int | None = None,
        delegate: Any = None,
        artifact: str = "cpu",
    ):
        """On the bundle's `artifact` (a backend's name: its model file), with a TFLite `delegate` when the
        backend has one (edge/kernel/backends/edgetpu.py)."""
        model = bundle if isinstance(bundle, InterpreterModel) else InterpreterModel.of(bundle)
        self.bundle = None if isinstance(bundle, InterpreterModel) else bundle
        self.model = model
        self.edgetpu = delegate is not None
        tflite = model.artifacts[artifact]
        self.interpreter = make_interpreter(tflite, num_threads=num_threads, delegate=delegate)
        self._input, self._output, self._embedding = _io_details(self.interpreter, model)
        self.input_shape = (model.height, model.width, 3)
        self._out_scale, self._out_zero = model.output_scale, model.output_zero_point

    def _invoke(self, image: np.ndarray) -> None:
        if image.shape != self.input_shape or image.dtype != self._input["dtype"]:
            raise ModelError(
                f"input {image.shape} {image.dtype} does not fit the model's {self.input_shape} "
                f"{np.dtype(self._input['dtype']).name}"
            )
        self.interpreter.set_tensor(self._input["index"], image[np.newaxis])
        self.interpreter.invoke()

    def raw(self, image: np.ndarray) -> np.ndarray:
        """Invoke on one preprocessed image (HxWx3); returns the leaf output tensor as the model gives it."""
        self._invoke(image)
        return self.interpreter.get_tensor(self._output["index"])[0].copy()

    def scores(self, image: np.ndarray) -> np.ndarray:
        """The leaf scores the bundle decides on, float32: the leaf output dequantized (logits or
        probabilities, as the manifest's output.kind), plus the centroid term when the bundle has one."""
        scores = dequantize(self.raw(image), self._out_scale, self._out_zero)
        if self.model.centroid is None:
            return scores
        weight, temperature = self.model.centroid
        return centroid_scores(
            scores, self._embedding_values(), weight, self.model.centroid_space, temperature
        )

    def _embedding_values(self) -> np.ndarray:
        _, _, scale, zero = self.model.embedding  # type: ignore[misc]
        return dequantize(self.interpreter.get_tensor(self._embedding["index"])[0], scale, zero)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """Leaf probabilities in the taxonomy's leaf order, as float32."""
        from .decode import leaf_probabilities

        kind = self.model.output_kind
        return leaf_probabilities(self.scores(image), kind).astype(np.float32)  # type: ignore[arg-type]

    def outputs(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(leaf scores, embedding or None) of one invoke, both dequantized to float32."""
        scores = self.scores(image)
        if self._embedding is None:
            return scores, None
        return scores, self._embedding_values()

    def raw_embedding(self) -> np.ndarray | None:
        """The embedding tensor of the last invoke as the model gives it (the self-test's), or None."""
        if self._embedding is None:
            return None
        return self.interpreter.get_tensor(self._embedding["index"])[0].copy()


def _io_details(interpreter: Any, model: InterpreterModel) -> tuple[dict, dict, dict | None]:
    inputs = interpreter.get_input_details()
    outputs = interpreter.get_output_details()
    if len(inputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs, a classifier bundle needs exactly 1")
    expected_in = (1, model.height, model.width, 3)
    if tuple(inputs[0]["shape"]) != expected_in or np.dtype(inputs[0]["dtype"]).name != model.dtype:
        raise ModelError(
            f"model input is {tuple(inputs[0]['shape'].tolist())} {np.dtype(inputs[0]['dtype']).name}, "
            f"the manifest says {expected_in} {model.dtype}"
        )
    name = model.output_name
    output = _output_by_signature_name(interpreter, name) if len(outputs) > 1 else outputs[0]
    if tuple(output["shape"]) != (1, model.num_classes):
        raise ModelError(
            f"model output '{name}' is {tuple(output['shape'].tolist())}, expected (1, {model.num_classes})"
        )
    embedding = None
    if model.embedding is not None:
        emb_name, size = model.embedding[:2]
        if len(outputs) < 2:
            raise ModelError(f"the model has no embedding output '{emb_name}' (the manifest names one)")
        embedding = _output_by_signature_name(interpreter, emb_name)
        if tuple(embedding["shape"]) != (1, size):
            raise ModelError(
                f"model output '{emb_name}' is {tuple(embedding['shape'].tolist())}, expected (1, {size})"
            )
    return inputs[0], output, embedding


def _output_by_signature_name(interpreter: Any, name: str) -> dict:
    signatures = interpreter.get_signature_list()
    for key, sig in signatures.items():
        if name in sig.get("outputs", {}):
            runner_index = interpreter.get_signature_runner(key).get_output_details()[name]["index"]
            return next(d for d in interpreter.get_output_details() if d["index"] == runner_index)
    raise ModelError(f"the model has no output named '{name}' (signatures: {signatures})")
