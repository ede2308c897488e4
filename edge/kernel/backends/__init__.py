"""Inference backends as plug-ins, in the way of Frigate's detector plugins: one module per backend in this
package (or named in the TAXONEDGE_BACKENDS environment variable, comma-separated, for one kept outside
the tree), found automatically. `inference.backend` in the config names one, or `auto`.

A backend module defines `BACKEND`, an object with:

    name: str            the `inference.backend` value that selects it; also what labels say in `backend`
    artifact: str        the bundle artifact it runs (manifest `artifacts`: "cpu" is model.tflite)
    accelerator: bool    tried by `auto` before the CPU (and re-probed while `auto` runs on the CPU)
    tolerance: int       quantized output steps it may differ from the recorded golden outputs
    present(device)      cheap: could it run here (a device node, a USB id)? Never loads native code.
    open(model, num_threads, device) -> Classifier     raises BackendUnavailable when it cannot run

The inference worker process opens the classifier through `open_classifier`; nothing else in the device
needs to know which backends exist. docs/extending.md shows a new one from start to end.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import cache
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..runtime import Classifier, InterpreterModel

ENV = "TAXONEDGE_BACKENDS"


class BackendUnavailable(RuntimeError):
    """The backend cannot run here (library absent, no device, no artifact for it in the bundle).
    `fallback` is what `auto` reports when it runs on the CPU instead (status `degraded`)."""

    def __init__(self, message: str, fallback: str | None = None):
        super().__init__(message)
        self.fallback = fallback or f"{message}; running on the CPU"


class Backend(Protocol):
    name: str
    artifact: str
    accelerator: bool
    tolerance: int

    def present(self, device: str | None) -> bool: ...

    def open(self, model: InterpreterModel, num_threads: int | None, device: str | None) -> Classifier: ...


@cache
def registry() -> dict[str, Backend]:
    """Every backend by name: this package's modules, then those named in TAXONEDGE_BACKENDS."""
    modules = [
        f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")
    ]
    modules += [name.strip() for name in os.environ.get(ENV, "").split(",") if name.strip()]
    found: dict[str, Backend] = {}
    for module in modules:
        backend = importlib.import_module(module).BACKEND
        found[backend.name] = backend
    return found


def names() -> list[str]:
    return sorted(registry())


def open_classifier(
    model: InterpreterModel, backend: str, num_threads: int | None = None, device: str | None = None
) -> tuple[Classifier, str, str | None]:
    """(classifier, the backend it runs on, why it is degraded or None). `auto` tries the accelerators,
    then falls back to the CPU and says why; a named backend raises BackendUnavailable."""
    backends = registry()
    if backend != "auto":
        if backend not in backends:
            raise BackendUnavailable(f"no backend {backend!r} (known: {', '.join(names())})")
        return backends[backend].open(model, num_threads, device), backend, None
    reasons = []
    for candidate in sorted((b for b in backends.values() if b.accelerator), key=lambda b: b.name):
        try:
            return candidate.open(model, num_threads, device), candidate.name, None
        except BackendUnavailable as exc:
            reasons.append(exc.fallback)
    reason = "; ".join(reasons) if reasons else None
    return backends["cpu"].open(model, num_threads, device), "cpu", reason


def accelerator_present(device: str | None, artifacts: set[str] | frozenset[str] = frozenset()) -> bool:
    """Could `auto` find an accelerator now for a bundle with `artifacts` (cheap, no native code)? For
    re-probes while on the CPU: one whose artifact the bundle lacks would run nothing of it."""
    return any(b.accelerator and b.artifact in artifacts and b.present(device) for b in registry().values())


def tolerance(name: str) -> int:
    backend: Any = registry().get(name)
    return int(backend.tolerance) if backend is not None else 0
