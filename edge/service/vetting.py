"""What a received bundle must pass before a device switches to it: the transfer's size and sha256, the
signature policy, compatibility with this device and daemon, the serving taxonomy (model.taxonomy_policy),
and the golden self-test in a worker process of its own. Each failure is `Failed` with a one-line reason.
"""

from __future__ import annotations

import hashlib
import ssl
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from taxonedge import __version__

from ..kernel import backends
from ..kernel.bundle import Bundle, BundleError
from ..kernel.signing import SigningKeyError
from .config import Config, UpdateConfig
from .infer import InferenceWorker, WorkerError
from .slots import read_verified


class Failed(Exception):
    """The deployment ends here: `state` is rejected or rolled_back, `reason` says why."""

    def __init__(self, state: str, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def fetch(url: str, limit: int, cfg: UpdateConfig) -> bytes:
    """A bundle from a file:// or https:// URL, at most `limit` bytes."""
    try:
        if url.startswith("file://"):
            path = Path(urllib.request.url2pathname(url[len("file://") :]))
            if path.stat().st_size > limit:
                raise Failed("rejected", f"size: {path} is over model.max_bundle_bytes ({limit})")
            return path.read_bytes()
        context = ssl.create_default_context(cafile=str(cfg.fetch_ca_file) if cfg.fetch_ca_file else None)
        with urllib.request.urlopen(url, timeout=cfg.fetch_timeout_s, context=context) as resp:
            data = resp.read(limit + 1)
    except OSError as exc:
        raise Failed("rejected", f"cannot fetch {url}: {exc}") from None
    if len(data) > limit:
        raise Failed("rejected", f"size: {url} is over model.max_bundle_bytes ({limit})")
    return data


def verify(data: bytes, size: int, sha256: str, config: Config, active: Bundle | None) -> Bundle:
    """The received bytes as a bundle this device may run, or Failed(rejected) saying why not."""
    model = config.model
    if len(data) != size:
        raise Failed("rejected", f"size: received {len(data)} bytes, the request announced {size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise Failed("rejected", f"sha256: received {digest}, the request announced {sha256}")
    try:
        bundle = read_verified(data, model)
    except SigningKeyError as exc:
        raise Failed("rejected", f"model.public_key: {exc}") from None
    except BundleError as exc:  # its message starts with "bundle: "
        reason = str(exc)
        if "unsigned" in reason:
            reason += (
                " (model.require_signature is on: sign it with `taxonedge convert --sign-key` or "
                "`taxonedge sign`)"
            )
        raise Failed("rejected", reason) from None
    manifest = bundle.manifest
    if manifest.compatible != model.compatible:
        raise Failed(
            "rejected",
            f"compatible: the bundle is for '{manifest.compatible}', this device "
            f"accepts '{model.compatible}'",
        )
    if _version_tuple(manifest.min_daemon_version) > _version_tuple(__version__):
        raise Failed(
            "rejected",
            f"min_daemon_version: the bundle needs taxonedge >= "
            f"{manifest.min_daemon_version}, this daemon is {__version__}",
        )
    spec = manifest.input
    if spec.dtype == "float32" and config.inference.backend == "edgetpu":
        raise Failed("rejected", "input: a float32 model cannot run on the Edge TPU (inference.backend)")
    if (
        active is not None
        and model.taxonomy_policy == "same"
        and manifest.taxonomy_hash != active.manifest.taxonomy_hash
    ):
        raise Failed(
            "rejected",
            (
                f"taxonomy: the bundle's taxonomy ({bundle.taxonomy.num_leaves} leaves, hash "
                f"{manifest.taxonomy_hash[:12]}) differs from the serving one ({active.taxonomy.num_leaves} "
                f"leaves, hash {active.manifest.taxonomy_hash[:12]}) and model.taxonomy_policy = 'same'"
            ),
        )
    return bundle


def self_test(bundle: Bundle, config: Config, report: Callable[..., None]) -> None:
    """Warm up and self-test in a worker process of its own (as every interpreter runs: a native abort
    of the Edge TPU library costs the worker, never the daemon), while the daemon's model serves."""
    report("warming")
    inference = config.inference
    worker = InferenceWorker(
        bundle,
        backend=inference.backend,
        device=inference.edgetpu_device,
        num_threads=inference.interpreter_threads(),
        warmup_runs=inference.warmup_runs,
        invoke_timeout_s=inference.invoke_timeout_s,
    )
    try:
        try:
            info = worker.start()
        except WorkerError as exc:
            if exc.cause == "BackendUnavailable":  # a named backend only: "auto" falls back to the CPU
                raise Failed("rejected", f"warming: {exc.detail}") from None
            raise Failed("rejected", f"input/output: {exc.detail or exc}") from None
        _golden_test(bundle, config.model.update, worker, info.backend, report)
    finally:
        worker.stop()


def _golden_test(
    bundle: Bundle, cfg: UpdateConfig, worker: InferenceWorker, backend: str, report: Callable[..., None]
) -> None:
    """The bundle's golden inputs must give its recorded outputs (exactly on the CPU, within the
    backend's tolerance on an accelerator)."""
    spec = bundle.manifest.input
    golden = bundle.golden()
    if golden is None:
        if cfg.require_golden:
            raise Failed(
                "rejected",
                "self_test: the bundle has no golden self-test set (model.update.require_golden is on)",
            )
        inputs, outputs = np.zeros((1, spec.height, spec.width, 3), dtype=np.dtype(spec.dtype)), None
    else:
        inputs, outputs = golden
    report("self_test", count=len(inputs))
    tolerance = cfg.edgetpu_tolerance if backend == "edgetpu" else backends.tolerance(backend)
    embeddings = bundle.golden_embeddings()
    try:
        for i, image in enumerate(inputs):
            answer = worker.raw(image)
            expected = None if outputs is None else outputs[i]
            _check_output("output", i, answer.scores, expected, tolerance, backend)
            if embeddings is not None:
                if answer.embedding is None:
                    raise Failed("rejected", f"self_test: golden input {i} gives no embedding output")
                _check_output("embedding", i, answer.embedding, embeddings[i], tolerance, backend)
    except WorkerError as exc:
        raise Failed("rejected", f"self_test: {exc}") from None


def _check_output(
    what: str, i: int, out: np.ndarray, expected: np.ndarray | None, tolerance: float, backend: str
) -> None:
    """One output of golden input `i` against its recorded value (only finite when none is recorded)."""
    if not np.all(np.isfinite(out.astype(np.float64))):
        raise Failed("rejected", f"self_test: the {what} for golden input {i} is not finite (NaN or inf)")
    if expected is None:
        return
    if out.shape != expected.shape:
        raise Failed("rejected", f"self_test: {what} shape {out.shape}, golden {expected.shape}")
    diff = float(np.max(np.abs(out.astype(np.float64) - expected.astype(np.float64))))
    if not diff <= tolerance:
        raise Failed(
            "rejected",
            f"self_test: golden input {i} gives {what}s differing by {diff:g} from the recorded "
            f"ones (tolerance {tolerance} on {backend})",
        )
