"""The CPU: the TFLite interpreter (LiteRT or tflite_runtime) with XNNPACK, on `model.tflite`."""

from __future__ import annotations

from ..runtime import Classifier, InterpreterModel


class _Cpu:
    name = "cpu"
    artifact = "cpu"  # model.tflite
    accelerator = False
    tolerance = 0  # the same interpreter recorded the golden outputs: exact

    def present(self, device: str | None) -> bool:
        return True

    def open(self, model: InterpreterModel, num_threads: int | None, device: str | None) -> Classifier:
        return Classifier(model, num_threads=num_threads)


BACKEND = _Cpu()
