"""Compile targets: what `taxonedge convert` builds beside model.tflite for an accelerator, one entry per
target (the host side of edge/kernel/backends/). A target has:

    name       the device backend that runs its artifact (edge/kernel/backends/<name>.py), and the key of its
               report in the manifest (`edgetpu` for the Edge TPU)
    artifact   the bundle file it writes: model_<name>.<ext>, which the manifest's `artifacts` names
    build(model, mode, backbone, policy, compiler) -> (report, compiled model or None)

To add one (an OpenVINO IR, a Hailo HEF): a module with its compiler and checks, and one entry here; the
device side is one file in edge/kernel/backends/ (docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from taxonedge.edge.kernel.bundle import MODEL_EDGETPU

# (model, mode, backbone, policy, compiler) -> (report, compiled model or None)
Build = Callable[[bytes, str, str, str, str | None], tuple[dict[str, Any], bytes | None]]


@dataclass(frozen=True)
class CompileTarget:
    name: str
    artifact: str
    build: Build


def _edgetpu(
    model: bytes, mode: str, backbone: str, policy: str, compiler: str | None
) -> tuple[dict[str, Any], bytes | None]:
    from . import edgetpu  # the compiler wrapper and the static op check

    return edgetpu.edgetpu_report(model, mode, backbone, policy, compiler)


TARGETS: dict[str, CompileTarget] = {"edgetpu": CompileTarget("edgetpu", MODEL_EDGETPU, _edgetpu)}
