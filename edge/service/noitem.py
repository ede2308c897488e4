"""No item: frames that show the empty belt, or that the model calls background, publish no product label.

Two ways to tell, both cheap on the frame path:

- **The empty belt, learned on the line** (no retraining). `learn_empty` collects the embeddings (a v3
  bundle's second output, the pooled penultimate features) of the next frames for some seconds while the
  operator keeps the belt empty. Their L2-normalised mean is the reference; a frame whose embedding has a
  cosine similarity of at least `threshold` to it is no item. The threshold comes from the captured frames
  only: the lowest similarity of a captured frame to the mean, less `[no_item] margin`, never below
  `min_similarity` (a belt that varies that much would make every frame look empty). One dot product per
  frame. The rule is edge/kernel/emptybelt.py's, which `taxonedge evaluate --belt` scores a clip with.
- **A trained background class** (`[no_item] background_label`): a decision at or under that node.

The reference is stored in the state directory (atomic write) with the model's sha256 and a few JPEG
thumbnails of the captured frames. After a model switch (or a start with another model) the pipeline
re-embeds the thumbnails with the new model before it compares any frame, so the reference follows the
model without the operator; a model without an embedding output turns the comparison off, and says so.

Thread use: the inference thread classifies, feeds a learning and re-embeds; the control thread starts a
learning and forgets; the health thread ends a learning whose frames stopped coming. One lock guards the
state those share; the frame path reads one immutable `_Matcher`.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..kernel.bundle import Bundle
from ..kernel.decode import Decision
from ..kernel.emptybelt import (
    MAX_STORED,
    MIN_FRAMES,
    EmptyBelt,
    centroid_of,
    evenly,
    similarities_to,
    threshold_of,
)
from ..kernel.emptybelt import unit as unit  # re-exported: the tests and bench/bench_no_item.py use it
from ..kernel.files import atomic_write
from ..kernel.protocol import NoItemLearning, NoItemReference, NoItemState, PayloadError
from .config import NoItemConfig
from .source import Frame

log = logging.getLogger(__name__)

REFERENCE_FILE = Path("no_item") / "empty_belt.npz"
FORMAT = 1
THUMBNAILS = 16  # frames kept as JPEG to re-embed after a model switch
# Thumbnails keep the frame's resolution up to this short side: resampled close to a model's input size, a
# belt's fine texture comes out differently and so does its embedding (the demo clip scaled from 320 to 288
# pixels put 4 % of its empty frames below the re-embedded threshold; at full size, none).
THUMB_SHORT_SIDE = 480
MAX_SECONDS = 600.0
LATE_S = 2.0  # a learning whose frames stop coming (paused, source down) ends this long after its end


class ReferenceError(ValueError):
    """A stored reference that cannot be used (damaged, another format)."""


class LearnError(PayloadError):
    """learn_empty cannot start or did not succeed; the text goes back in the command's answer."""


@dataclass(frozen=True)
class Reference:
    """The empty belt for one model: the embeddings of captured frames, thumbnails to re-embed them."""

    embeddings: np.ndarray  # (n, d) float32, as the model gave them
    thumbnails: tuple[bytes, ...]  # JPEG
    bundle_sha256: str
    learned_at: str  # UTC, as in messages

    @functools.cached_property
    def centroid(self) -> np.ndarray:
        """The L2-normalised mean of the normalised embeddings."""
        return centroid_of(self.embeddings)

    @functools.cached_property
    def similarities(self) -> np.ndarray:
        """Each captured frame's cosine similarity to the centroid."""
        return similarities_to(self.centroid, self.embeddings)


@dataclass(frozen=True)
class _Matcher(EmptyBelt):
    """What the frame path reads: the empty belt (edge/kernel/emptybelt.py) and the model it is for."""

    bundle_sha256: str


# ---- storage --------------------------------------------------------------------------------------
def encode_reference(ref: Reference) -> bytes:
    """The reference as one .npz (no pickles): embeddings as float16, thumbnails back to back."""
    meta = {"format": FORMAT, "bundle_sha256": ref.bundle_sha256, "learned_at": ref.learned_at}
    buf = io.BytesIO()
    np.savez(
        buf,
        embeddings=ref.embeddings.astype(np.float16),
        thumbnails=np.frombuffer(b"".join(ref.thumbnails), dtype=np.uint8),
        thumbnail_sizes=np.array([len(t) for t in ref.thumbnails], dtype=np.int64),
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    return buf.getvalue()


def decode_reference(data: bytes) -> Reference:
    """The inverse of encode_reference; ReferenceError says what is wrong with a damaged file."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes())
            embeddings = npz["embeddings"].astype(np.float32)
            blob, sizes = npz["thumbnails"].tobytes(), npz["thumbnail_sizes"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # npy, JSON: ValueErrors
        raise ReferenceError(f"not a readable reference ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ReferenceError(f"format {meta.get('format') if isinstance(meta, dict) else '?'}, not {FORMAT}")
    sha = meta.get("bundle_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ReferenceError("no model sha256")
    if embeddings.ndim != 2 or len(embeddings) < 1 or not np.all(np.isfinite(embeddings)):
        raise ReferenceError(f"embeddings of shape {embeddings.shape} (or not finite)")
    if sizes.ndim != 1 or np.any(sizes < 0) or int(sizes.sum()) != len(blob):
        raise ReferenceError("thumbnail sizes do not add up")
    ends = np.cumsum(sizes)
    thumbs = tuple(blob[int(e - s) : int(e)] for s, e in zip(sizes, ends, strict=True))
    return Reference(embeddings, thumbs, sha, str(meta.get("learned_at", "")))


# ---- learning -------------------------------------------------------------------------------------
@dataclass
class _Learning:
    """A learn_empty in progress: the embeddings of frames captured between `start` and `until`."""

    start: float  # time.monotonic()
    until: float
    bundle_sha256: str
    future: Future
    embeddings: list[np.ndarray] = field(default_factory=list)
    thumbs: list[np.ndarray] = field(default_factory=list)  # small BGR frames, every `stride`-th
    stride: int = 1

    def add(self, image: np.ndarray, embedding: np.ndarray) -> None:
        if len(self.embeddings) % self.stride == 0:
            self.thumbs.append(thumbnail(image))
            if len(self.thumbs) >= 2 * THUMBNAILS:  # keep them spread over the whole capture
                self.thumbs, self.stride = self.thumbs[::2], self.stride * 2
        self.embeddings.append(np.asarray(embedding, dtype=np.float32).reshape(-1))


def thumbnail(image: np.ndarray) -> np.ndarray:
    """`image` scaled down so that its short side is at most THUMB_SHORT_SIDE (a copy: frames are reused)."""
    from ..kernel.preprocess import shrink

    small = shrink(image, THUMB_SHORT_SIDE)
    return small.copy() if small is image else small


def jpeg(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise LearnError("a captured frame could not be encoded as JPEG")
    return data.tobytes()


def utc_now() -> str:
    from .publish import utc_ms

    return utc_ms(time.time())


# ---- the detector ---------------------------------------------------------------------------------
class NoItem:
    """No-item detection for the daemon (over 200 lines: learning, storage and the frame path share the
    reference and its lock)."""

    def __init__(self, config: NoItemConfig, state_dir: Path):
        self.config = config
        self.path = Path(state_dir) / REFERENCE_FILE
        self._lock = threading.Lock()
        self._reference: Reference | None = None
        self._matcher: _Matcher | None = None
        self._learning: _Learning | None = None
        self._bundle: Bundle | None = None
        self._failed_for: str | None = None  # a model whose re-embedding failed: not tried again
        self._problem: str | None = None  # why the stored reference or the model cannot be used
        self.frames = 0  # classified frames judged no item
        self.withheld = 0  # of them, not published

    # ---- start-up and model switches -----------------------------------------------------------------
    def load(self) -> None:
        """The stored reference, if any. A damaged one is reported (status) and ignored, never fatal."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._problem = f"no item: cannot read {self.path}: {exc.strerror or exc}; send learn_empty again"
            log.error("%s", self._problem)
            return
        try:
            self._reference = decode_reference(data)
        except ReferenceError as exc:
            self._problem = (
                f"no item: the empty-belt reference {self.path} is damaged ({exc}) and ignored; "
                "send learn_empty again"
            )
            log.error("%s", self._problem)

    def serve(self, bundle: Bundle) -> None:
        """The model that serves from now on (at start and after each switch)."""
        with self._lock:
            self._bundle = bundle
            self._matcher = self._matcher_for(bundle)
            if self._learning is not None and self._learning.bundle_sha256 != bundle.sha256:
                self._fail(
                    LearnError("the model changed while learning the empty belt: send learn_empty again")
                )

    def _matcher_for(self, bundle: Bundle) -> _Matcher | None:
        ref, spec = self._reference, bundle.manifest.embedding
        if ref is None or ref.bundle_sha256 != bundle.sha256 or spec is None:
            return None
        if ref.embeddings.shape[1] != spec.size:  # same model, other size: a damaged file
            self._problem = (
                f"no item: the empty-belt reference holds embeddings of size {ref.embeddings.shape[1]}, "
                f"the model gives {spec.size}; it is ignored: send learn_empty again"
            )
            return None
        sims = ref.similarities
        threshold = threshold_of(sims, self.config.margin, self.config.min_similarity)
        return _Matcher(ref.centroid, threshold, bundle.sha256)

    def needs_embedding(self, bundle: Bundle) -> bool:
        """The stored reference was made with another model that `bundle` can replace by re-embedding."""
        ref = self._reference
        return (
            self.config.enabled
            and ref is not None
            and ref.bundle_sha256 != bundle.sha256
            and bundle.manifest.embedding is not None
            and bool(ref.thumbnails)
            and self._failed_for != bundle.sha256
        )

    def reembed(self, bundle: Bundle, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        """The stored thumbnails through `bundle`'s model (`embed`: a BGR image to its embedding): the
        reference for the new model, stored. On failure the comparison stays off for this model."""
        ref = self._reference
        if ref is None:
            return
        started = time.monotonic()
        try:
            embeddings = np.stack([embed(decode_jpeg(t)) for t in ref.thumbnails])
        except (ValueError, RuntimeError) as exc:  # WorkerError is a RuntimeError
            self._failed_for = bundle.sha256
            self._problem = (
                f"no item: re-embedding the empty belt with model {bundle.sha256[:12]} failed: {exc}"
            )
            log.error("%s", self._problem)
            return
        new = Reference(embeddings, ref.thumbnails, bundle.sha256, ref.learned_at)
        try:
            self._store(new)
        except OSError as exc:  # used all the same: only the next start re-embeds once more
            log.error("no item: cannot store the re-embedded empty belt in %s: %s", self.path, exc)
        with self._lock:
            self._reference, self._problem = new, None
            if self._bundle is not None and self._bundle.sha256 == bundle.sha256:
                self._matcher = self._matcher_for(bundle)
        log.info(
            "no item: re-embedded %d empty-belt frames for model %s in %.0f ms",
            len(embeddings),
            bundle.sha256[:12],
            (time.monotonic() - started) * 1000,
        )

    # ---- the frame path ------------------------------------------------------------------------------
    def judge(
        self, decision: Decision, embedding: np.ndarray | None, frame: Frame, bundle_sha256: str
    ) -> Decision:
        """The frame's decision, or `unknown` with reason no_item when it shows no item (empty belt, the
        background class, or a frame captured while learn_empty runs: the operator keeps the belt empty)."""
        if not self.config.enabled:
            return decision
        if self._learning is not None and self._feed(frame, embedding, bundle_sha256):
            return self._no_item(decision)
        matcher = self._matcher
        if (
            matcher is not None
            and embedding is not None
            and matcher.bundle_sha256 == bundle_sha256
            and matcher.empty(embedding)
        ):
            return self._no_item(decision)
        if self._background(decision.label):
            return self._no_item(decision)
        return decision

    def _background(self, label: str | None) -> bool:
        """Is `label` the configured background class or a node under it?"""
        background = self.config.background_label
        return (
            background is not None
            and label is not None
            and (label == background or label.startswith(background + "/"))
        )

    def _no_item(self, decision: Decision) -> Decision:
        self.frames += 1
        return Decision(
            decision="unknown",
            label=None,
            path=(),
            levels=(),
            top_k=decision.top_k,
            reason="no_item",
            open_set_score=decision.open_set_score,
        )

    # ---- learning ------------------------------------------------------------------------------------
    @property
    def learning(self) -> bool:
        """learn_empty runs: the pipeline takes frames for it even between items."""
        return self._learning is not None

    def learn(self, seconds: float) -> Future:
        """Start learning the empty belt from the frames of the next `seconds`; the future's result is the
        command's answer (or a LearnError)."""
        with self._lock:
            bundle = self._bundle
            if not self.config.enabled:
                raise LearnError("no-item detection is off (no_item.enabled = false in the config)")
            if self._learning is not None:
                raise LearnError("learn_empty is already running")
            if bundle is None or bundle.manifest.embedding is None:
                raise LearnError(no_embedding(bundle))
            future: Future = Future()
            now = time.monotonic()
            self._learning = _Learning(now, now + seconds, bundle.sha256, future)
        log.info("no item: learning the empty belt for %g s", seconds)
        return future

    def _feed(self, frame: Frame, embedding: np.ndarray | None, sha: str) -> bool:
        """A frame for the learning in progress: True when it was captured while it runs."""
        with self._lock:
            learning = self._learning
            if learning is None or frame.captured < learning.start:
                return False
            if frame.captured > learning.until:
                self._finish(learning)
                return False
            if embedding is None or sha != learning.bundle_sha256:
                return True  # a frame of the old model, at a switch: the switch ends the learning
            learning.add(frame.image, embedding)
            return True

    def expire(self) -> None:
        """From the health thread: a learning whose frames stopped coming ends on what it has."""
        learning = self._learning
        if learning is not None and time.monotonic() > learning.until + LATE_S:
            with self._lock:
                if self._learning is learning:
                    self._finish(learning)

    def cancel(self, why: str) -> None:
        """The daemon stops: a learning in progress gets its answer now."""
        with self._lock:
            if self._learning is not None:
                self._fail(LearnError(f"learn_empty did not finish: {why}"))

    def _fail(self, error: LearnError) -> None:
        """Under the lock: the learning in progress ends with `error` as its answer."""
        learning, self._learning = self._learning, None
        if learning is not None:
            log.warning("no item: %s", error)
            learning.future.set_exception(error)

    def _finish(self, learning: _Learning) -> None:
        """Under the lock: the learning's reference, stored and in use; its future answered."""
        count = len(learning.embeddings)
        if count < MIN_FRAMES:
            self._fail(
                LearnError(
                    f"only {count} frames were classified while learning (at least {MIN_FRAMES}): was the "
                    "daemon paused, or the source down? Try again, or for longer"
                )
            )
            return
        try:
            ref = Reference(
                np.stack(evenly(learning.embeddings, MAX_STORED)),
                tuple(jpeg(t) for t in evenly(learning.thumbs, THUMBNAILS)),
                learning.bundle_sha256,
                utc_now(),
            )
            self._store(ref)
        except (OSError, LearnError) as exc:
            self._fail(LearnError(f"the empty belt could not be stored in {self.path}: {exc}"))
            return
        self._learning = None
        self._reference, self._problem, self._failed_for = ref, None, None
        if self._bundle is not None:
            self._matcher = self._matcher_for(self._bundle)
        learning.future.set_result(self._learned(ref, count))

    def _learned(self, ref: Reference, captured: int) -> dict:
        sims = ref.similarities
        threshold = threshold_of(sims, self.config.margin, self.config.min_similarity)
        result = {
            "frames": captured,
            "stored": len(ref.embeddings),
            "thumbnails": len(ref.thumbnails),
            "threshold": round(threshold, 4),
            "similarity": {
                "min": round(float(sims.min()), 4),
                "median": round(float(np.median(sims)), 4),
                "max": round(float(sims.max()), 4),
            },
            # captured frames the threshold would not call empty: only when min_similarity clamps it
            "below_threshold": int(np.sum(sims < threshold)),
            "bundle_sha256": ref.bundle_sha256,
            "path": str(self.path),
        }
        log.info("no item: learned the empty belt: %s", result)
        return result

    def forget(self) -> dict:
        """Drop the reference (and its file); a learning in progress ends without one."""
        with self._lock:
            self._fail(LearnError("forget_empty came while learning"))
            had = self._reference is not None or self.path.exists()
            self._reference = self._matcher = None
            self._problem = self._failed_for = None
            self.path.unlink(missing_ok=True)
        return {"forgotten": had}

    def _store(self, ref: Reference) -> None:
        atomic_write(self.path, encode_reference(ref))

    # ---- reporting -----------------------------------------------------------------------------------
    def reason(self) -> str | None:
        """A status reason: a reference that exists but cannot be used (damaged, the model has no
        embedding, re-embedding failed), or a background_label the model does not know."""
        if not self.config.enabled:
            return None
        bundle = self._bundle
        if self._problem:
            return self._problem
        if self._reference is not None and bundle is not None and bundle.manifest.embedding is None:
            return no_embedding(bundle) + "; empty-belt detection is off"
        background = self.config.background_label
        if background is not None and bundle is not None and background not in bundle.taxonomy.by_label:
            return f"no item: no_item.background_label {background!r} is not a label of model {bundle.name}"
        return None

    def not_active(self) -> str | None:
        """Why frames are not compared with the empty belt now (None: they are)."""
        if not self.config.enabled:
            return "no_item.enabled is false"
        if self._matcher is not None:
            return None
        if self._problem:
            return self._problem
        bundle = self._bundle
        if bundle is not None and bundle.manifest.embedding is None:
            return no_embedding(bundle)
        if self._reference is None:
            return "no empty-belt reference: send learn_empty (taxonedge empty-belt) while the belt is empty"
        if not self._reference.thumbnails:
            return "the empty-belt reference is another model's, without frames to re-embed: send learn_empty"
        return "the empty-belt reference is another model's: it is re-embedded before the next frame"

    def report(self) -> NoItemState:
        learning, ref, matcher = self._learning, self._reference, self._matcher
        progress: NoItemLearning | None = None
        if learning is not None:
            left = max(learning.until - time.monotonic(), 0.0)
            progress = {"frames": len(learning.embeddings), "seconds_left": round(left, 1)}
        return {
            "enabled": self.config.enabled,
            "active": self.config.enabled and matcher is not None,
            "not_active": self.not_active(),
            "publish": self.config.publish,
            "background_label": self.config.background_label,
            "learning": progress,
            "reference": self._describe(ref) if ref is not None else None,
        }

    def _describe(self, ref: Reference) -> NoItemReference:
        sims = ref.similarities
        threshold = threshold_of(sims, self.config.margin, self.config.min_similarity)
        return {
            "frames": len(ref.embeddings),
            "thumbnails": len(ref.thumbnails),
            "threshold": round(threshold, 4),
            "similarity_min": round(float(sims.min()), 4),
            "similarity_median": round(float(np.median(sims)), 4),
            "bundle_sha256": ref.bundle_sha256,
            "learned_at": ref.learned_at,
        }


def no_embedding(bundle: Bundle | None) -> str:
    name = f"model {bundle.name} {bundle.version}" if bundle is not None else "the model"
    return (
        f"no item: {name} has no embedding output (bundle format v3, taxonedge convert --outputs logits), "
        "so the empty belt cannot be learned; a trained background class (no_item.background_label) works "
        "without one"
    )


def decode_jpeg(data: bytes) -> np.ndarray:
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("a stored thumbnail is not a readable JPEG")
    return image
