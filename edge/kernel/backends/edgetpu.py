"""The Coral Edge TPU: libedgetpu's delegate on `model_edgetpu.tflite` (edgetpu_compiler's output).

`inference.edgetpu_device` picks one ("usb", "usb:0", "pci:0"; unset: the first found).
"""

from __future__ import annotations

from .. import runtime
from ..runtime import Classifier, InterpreterModel
from . import BackendUnavailable


class _EdgeTpu:
    name = "edgetpu"
    artifact = "edgetpu"  # model_edgetpu.tflite: edgetpu_compiler's output (convert/targets.py)
    accelerator = True
    tolerance = 2  # model.update.edgetpu_tolerance overrides it

    def present(self, device: str | None) -> bool:
        return bool(runtime.edgetpu_devices(device))

    def open(self, model: InterpreterModel, num_threads: int | None, device: str | None) -> Classifier:
        try:
            delegate = runtime.load_edgetpu_delegate(device)
        except runtime.EdgeTpuUnavailable as exc:
            raise BackendUnavailable(str(exc), f"Edge TPU unavailable, running on the CPU: {exc}") from None
        if not model.has_artifact(self.artifact):
            # The delegate runs only what edgetpu_compiler mapped to it: an uncompiled model would report
            # "edgetpu" while every op runs on the CPU.
            reason = (
                "the bundle has no Edge TPU model (model_edgetpu.tflite), so the Edge TPU is idle and the "
                "model runs on the CPU: convert with edgetpu_compiler on PATH to add one"
            )
            raise BackendUnavailable(reason, reason)
        return Classifier(model, num_threads=num_threads, delegate=delegate, artifact=self.artifact)


BACKEND = _EdgeTpu()
