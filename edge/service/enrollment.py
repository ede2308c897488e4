"""Enrolled products on a running device: requests come from the control thread and are served by the
pipeline thread between frames (embedding a photo needs the inference worker); each frame's decision then
passes `decide`, which lets an enrolled product decide when the prototype match says so
(edge/kernel/prototypes.py). The products live in `state_dir/enrolled.db` (edge/service/enrolled.py).

From the belt (`enroll` with `from_belt`, item mode): the next N triggered items are the product. The
pipeline shows each item's frames (`saw`) and its result (`item_done`); one frame per item is kept as an
exemplar, and once N items are in, the exemplars go through the same path as photos. The items are labelled
as usual meanwhile: capturing only watches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..kernel.bundle import Bundle
from ..kernel.decode import Decision
from ..kernel.preprocess import ImageError, decode_image, shrink
from ..kernel.prototypes import MARGIN, MIN_SIMILARITY, RIVALS, PrototypeIndex, enrolled_decision, normalise
from .enrolled import EnrolledStore, EnrollError, check_label
from .trigger import ItemResult

log = logging.getLogger(__name__)
THUMB_SHORT_SIDE = 256  # what is kept of a photo: enough for a later model to embed it again
MAX_PHOTOS = 32
MAX_PENDING = 4
MAX_BELT_TIMEOUT_S = 3600.0
DEFAULT_BELT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class _Request:
    label: str
    photos: list[bytes]  # JPEG or PNG bytes
    source: str
    future: Future


@dataclass(frozen=True)
class _Seen:
    """One classified frame of an item while a belt enrollment captures."""

    image: np.ndarray
    embedding: np.ndarray | None
    unusable: bool  # the empty belt (no item) or a failed inference: never an exemplar


@dataclass
class _BeltCapture:
    """`enroll` with `from_belt`: the next `wanted` triggered items are the product `label`."""

    label: str
    wanted: int
    timeout_s: float
    future: Future = field(default_factory=Future)
    started: float = field(default_factory=time.monotonic)
    frames: dict[str, list[_Seen]] = field(default_factory=dict)  # the items being voted on now
    thumbnails: list[bytes] = field(default_factory=list)  # one exemplar per captured item
    items: list[dict] = field(default_factory=list)  # what each captured item was labelled

    @property
    def complete(self) -> bool:
        return len(self.thumbnails) >= self.wanted

    def seconds_left(self) -> float:
        return max(0.0, self.timeout_s - (time.monotonic() - self.started))

    def progress(self) -> dict:
        return {
            "label": self.label,
            "items": len(self.thumbnails),
            "of": self.wanted,
            "seconds_left": round(self.seconds_left(), 1),
        }


def exemplar_frame(seen: list[_Seen]) -> np.ndarray | None:
    """The item's most typical frame: the one nearest the mean of its frames' embeddings (not one caught
    entering or leaving the view); the middle frame when there are no embeddings. None: only empty belt."""
    frames = [s for s in seen if not s.unusable]
    if not frames:
        return None
    if any(s.embedding is None for s in frames):
        return frames[len(frames) // 2].image
    rows = normalise(np.stack([np.asarray(s.embedding).reshape(-1) for s in frames]))
    return frames[int(np.argmax(rows @ normalise(rows.mean(axis=0))))].image


def decode_photo(data: bytes, i: int) -> np.ndarray:
    try:
        return decode_image(data)
    except ImageError as exc:
        raise EnrollError(
            f"photo {i + 1}: not a readable JPEG or PNG image ({exc}); nothing was enrolled"
        ) from None


def thumbnail_jpeg(image: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", shrink(image, THUMB_SHORT_SIDE), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise EnrollError("a photo could not be encoded as JPEG; nothing was enrolled")
    return data.tobytes()


class Enrollment:
    def __init__(
        self,
        state_dir: Path,
        min_similarity: float = MIN_SIMILARITY,
        margin: float = MARGIN,
        min_photos: int = 1,
        rivals: int = RIVALS,
    ):
        self.store = EnrolledStore(Path(state_dir) / "enrolled.db")
        self.min_similarity = min_similarity
        self.margin = margin
        self.rivals = rivals
        self.min_photos = min_photos
        self._requests: queue.Queue[_Request] = queue.Queue(maxsize=MAX_PENDING)
        self._lock = threading.Lock()
        self._index: PrototypeIndex | None = None
        self._model: str | None = None  # the bundle sha256 the index is for
        self._stale = True  # the store changed: rebuild the index before the next frame
        self._capture: _BeltCapture | None = None  # a belt enrollment in progress
        self.problems: list[str] = []  # enrolled products a new model no longer separates
        self.decided = 0  # frames an enrolled product decided

    # ---- control thread ---------------------------------------------------------------------------
    def submit(self, label: str, photos: list[bytes], source: str = "photos") -> Future:
        """Queue an enrollment from photos; the future's result is the command's answer."""
        if len(photos) < self.min_photos:
            raise EnrollError(f"{len(photos)} photo(s): enrollment needs at least {self.min_photos}")
        if len(photos) > MAX_PHOTOS:
            raise EnrollError(f"{len(photos)} photos: at most {MAX_PHOTOS} per enrollment")
        request = _Request(label, photos, source, Future())
        try:
            self._requests.put_nowait(request)
        except queue.Full:
            raise EnrollError(f"{MAX_PENDING} enrollments are already waiting; try again shortly") from None
        return request.future

    def capture(self, label: str, items: int, timeout_s: float) -> Future:
        """Start a belt enrollment: the next `items` triggered items are `label`; the future's result is
        the command's answer, when they are in (or its error, at `timeout_s` or a cancel)."""
        if not self.min_photos <= items <= MAX_PHOTOS:
            raise EnrollError(f"from_belt = {items}: from {self.min_photos} to {MAX_PHOTOS} items")
        if any(p.label == label for p in self.store.products()):
            raise EnrollError(f"label {label!r} is already enrolled: remove or rename it first")
        with self._lock:
            if self._capture is not None:
                busy = self._capture.progress()
                raise EnrollError(
                    f"a belt enrollment of {busy['label']} is under way ({busy['items']} of {busy['of']} "
                    'items): wait for it, or send {"cancel": true}'
                )
            self._capture = _BeltCapture(label, items, timeout_s)
            return self._capture.future

    def cancel_capture(self, why: str) -> dict | None:
        """End a belt enrollment without storing anything; its command is answered with `why`. Returns its
        progress, or None when none was under way."""
        with self._lock:  # whoever takes the capture out answers its command: exactly once
            capture, self._capture = self._capture, None
        if capture is None:
            return None
        progress = capture.progress()
        capture.future.set_exception(
            EnrollError(
                f"belt enrollment of {capture.label} {why} after {progress['items']} of {capture.wanted} "
                "items; nothing was enrolled"
            )
        )
        return progress

    def changed(self) -> None:
        """The store changed outside the pipeline thread (rename, remove): rebuild before the next frame."""
        with self._lock:
            self._stale = True

    # ---- pipeline thread --------------------------------------------------------------------------
    def serve(self, bundle: Bundle, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        """Between frames: embed the stored photos again for a new model, and serve waiting requests."""
        has_embedding = bundle.manifest.embedding is not None
        with self._lock:
            stale = self._stale or self._model != bundle.sha256
        if stale and has_embedding:
            count = self.store.reembed(bundle.sha256, lambda jpeg: embed(decode_photo(jpeg, 0)))
            if count:
                log.info("enrolled products: %d photos embedded again for model %s", count, bundle.version)
            self.problems = self._separation(bundle)
            for problem in self.problems:
                log.warning("enrolled products: %s", problem)
            self._rebuild(bundle)
        elif stale:
            with self._lock:
                self._index, self._model, self._stale = None, bundle.sha256, False
        self._serve_capture(bundle, embed)
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            _settle(request.future, lambda request=request: self._enroll(bundle, request, embed))

    def _enroll(self, bundle: Bundle, request: _Request, embed: Callable[[np.ndarray], np.ndarray]) -> dict:
        need_embedding(bundle)
        check_label(request.label, bundle.taxonomy)  # before decoding photos: the cheaper refusal first
        thumbnails = [thumbnail_jpeg(decode_photo(data, i)) for i, data in enumerate(request.photos)]
        return self._store(bundle, request.label, thumbnails, request.source, embed)

    def _store(
        self,
        bundle: Bundle,
        label: str,
        thumbnails: list[bytes],
        source: str,
        embed: Callable[[np.ndarray], np.ndarray],
    ) -> dict:
        """Exemplars (JPEG thumbnails) embedded and stored as one product, in force at once."""
        need_embedding(bundle)
        label = check_label(label, bundle.taxonomy)
        # embedded from the stored thumbnail, as a later model will: the same vector either way
        vectors = np.stack([embed(decode_photo(jpeg, i)) for i, jpeg in enumerate(thumbnails)])
        self.store.add(label, thumbnails, vectors, bundle.sha256, source)
        self._rebuild(bundle)
        # a product that looks like another one to this model is reported now, not only at the next update
        self.problems = self._separation(bundle)
        log.info("enrolled %s from %d exemplars (%s)", label, len(thumbnails), source)
        return {"label": label, "photos": len(thumbnails), "products": len(self.store.products())}

    # ---- pipeline thread: enrolling from the belt -------------------------------------------------
    def saw(self, item_id: str, image: np.ndarray, embedding: np.ndarray | None, decision: Decision | None):
        """A classified frame of item `item_id` (item mode): kept while a belt enrollment captures."""
        capture = self._capture
        if capture is None or capture.complete:
            return
        unusable = decision is None or decision.reason == "no_item"
        capture.frames.setdefault(item_id, []).append(_Seen(image, embedding, unusable))

    def item_done(self, result: ItemResult) -> None:
        """An item's label is out: while capturing, its most typical frame becomes an exemplar."""
        capture = self._capture
        if capture is None:
            return
        seen = capture.frames.pop(result.item_id, [])
        # "the next N items": one triggered before the command (waiting in the queue, or being voted on) is
        # another product; nor does an item count whose frames showed no product
        late = result.triggered >= capture.started and len(seen) == result.frames
        if capture.complete or not seen or not late or result.reason == "no_item":
            return
        image = exemplar_frame(seen)
        if image is None:
            return
        capture.thumbnails.append(thumbnail_jpeg(image))
        capture.items.append(
            {"item_id": result.item_id, "label": result.decision.label, "decision": result.decision.decision}
        )
        log.info(
            "belt enrollment of %s: item %s captured (%s)", capture.label, result.item_id, capture.progress()
        )

    def _serve_capture(self, bundle: Bundle, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        """Between items: store a belt enrollment that has its items, or end one that ran out of time."""
        with self._lock:
            capture = self._capture
            if capture is None or not (capture.complete or capture.seconds_left() <= 0):
                return
            if not capture.complete:
                capture = None  # cancel_capture takes it out and answers
            else:
                self._capture = None
        if capture is None:
            self.cancel_capture("timed out")
            return

        def store() -> dict:
            result = self._store(bundle, capture.label, capture.thumbnails, "belt", embed)
            return {**result, "items": capture.items, "seconds": round(time.monotonic() - capture.started, 3)}

        _settle(capture.future, store)

    def _separation(self, bundle: Bundle) -> list[str]:
        return self.store.separation(bundle.sha256, bundle.embedding_space(), bundle.taxonomy.leaf_labels)

    def _rebuild(self, bundle: Bundle) -> None:
        index = self.store.index(
            bundle.sha256, bundle.embedding_space(), self.min_similarity, self.margin, self.rivals
        )
        with self._lock:
            self._index, self._model, self._stale = index, bundle.sha256, False

    def decide(
        self, decision: Decision, scores: np.ndarray, embedding: np.ndarray | None, bundle: Bundle
    ) -> Decision:
        """The frame's decision: an enrolled product's when its prototype matches, else the model's. A
        frame the previous model classified (at a switch) keeps the model's decision."""
        with self._lock:
            index, model = self._index, self._model
        if index is None or not len(index) or embedding is None or model != bundle.sha256:
            return decision
        match = index.match(embedding, scores)
        if match is None:
            return decision
        self.decided += 1
        return enrolled_decision(match, bundle.taxonomy, decision)

    def report(self) -> dict:
        """For `state` and `stats`."""
        with self._lock:
            index, capture = self._index, self._capture
        return {
            "products": len(index) if index is not None else 0,
            "decided": self.decided,
            "problems": self.problems,
            "capture": capture.progress() if capture is not None else None,
        }

    def close(self) -> None:
        self.cancel_capture("ended: the daemon stopped")
        while True:
            try:
                self._requests.get_nowait().future.set_exception(EnrollError("the daemon stopped"))
            except queue.Empty:
                break
        self.store.close()


def need_embedding(bundle: Bundle) -> None:
    """EnrollError unless the bundle's model has an embedding output (format v3)."""
    if bundle.manifest.embedding is None:
        raise EnrollError(
            f"model {bundle.name} {bundle.version} has no embedding output: enrollment needs a format v3 "
            "bundle (taxonedge convert --outputs logits)"
        )


def _settle(future: Future, work: Callable[[], dict]) -> None:
    """The command's answer from `work`: its result, or why it failed. Whatever fails (the worker died
    while embedding), the command is answered and the pipeline goes on; nothing was stored (the store
    writes a product in one transaction, after every exemplar is embedded)."""
    try:
        future.set_result(work())
    except EnrollError as exc:
        future.set_exception(exc)
    except Exception as exc:  # noqa: BLE001 - one enrollment failing must not stop the line
        log.exception("enrollment failed")
        future.set_exception(
            EnrollError(f"enrollment failed ({type(exc).__name__}: {exc}); nothing was enrolled")
        )
