"""Enrolled products on a running device: requests come from the control thread and are served by the
pipeline thread between frames (embedding a photo needs the inference worker); each frame's decision then
passes `decide`, which lets an enrolled product decide when the prototype match says so
(edge/kernel/prototypes.py). The products live in `state_dir/enrolled.db` (edge/service/enrolled.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernel.bundle import Bundle
from ..kernel.decode import Decision
from ..kernel.preprocess import ImageError, decode_image, shrink
from ..kernel.prototypes import PrototypeIndex, enrolled_decision
from .enrolled import EnrolledStore, EnrollError, check_label

log = logging.getLogger(__name__)
THUMB_SHORT_SIDE = 256  # what is kept of a photo: enough for a later model to embed it again
MAX_PHOTOS = 32
MAX_PENDING = 4


@dataclass(frozen=True)
class _Request:
    label: str
    photos: list[bytes]  # JPEG or PNG bytes
    source: str
    future: Future


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
        self, state_dir: Path, min_similarity: float = 0.6, margin: float = 0.05, min_photos: int = 1
    ):
        self.store = EnrolledStore(Path(state_dir) / "enrolled.db")
        self.min_similarity = min_similarity
        self.margin = margin
        self.min_photos = min_photos
        self._requests: queue.Queue[_Request] = queue.Queue(maxsize=MAX_PENDING)
        self._lock = threading.Lock()
        self._index: PrototypeIndex | None = None
        self._model: str | None = None  # the bundle sha256 the index is for
        self._stale = True  # the store changed: rebuild the index before the next frame
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
            self.problems = self.store.separation(bundle.sha256)
            for problem in self.problems:
                log.warning("enrolled products: %s", problem)
            self._rebuild(bundle)
        elif stale:
            with self._lock:
                self._index, self._model, self._stale = None, bundle.sha256, False
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                request.future.set_result(self._enroll(bundle, request, embed))
            except EnrollError as exc:
                request.future.set_exception(exc)

    def _enroll(self, bundle: Bundle, request: _Request, embed: Callable[[np.ndarray], np.ndarray]) -> dict:
        if bundle.manifest.embedding is None:
            raise EnrollError(
                f"model {bundle.name} {bundle.version} has no embedding output: enrollment needs a format v3 "
                "bundle (taxonedge convert --outputs logits)"
            )
        label = check_label(request.label, bundle.taxonomy)
        images = [decode_photo(data, i) for i, data in enumerate(request.photos)]
        thumbnails = [thumbnail_jpeg(image) for image in images]
        # embedded from the stored thumbnail, as a later model will: the same vector either way
        vectors = np.stack([embed(decode_photo(jpeg, i)) for i, jpeg in enumerate(thumbnails)])
        self.store.add(label, thumbnails, vectors, bundle.sha256, request.source)
        self._rebuild(bundle)
        log.info("enrolled %s from %d %s", label, len(images), request.source)
        return {"label": label, "photos": len(images), "products": len(self.store.products())}

    def _rebuild(self, bundle: Bundle) -> None:
        index = self.store.index(bundle.sha256, bundle.centroids(), self.min_similarity, self.margin)
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
        match = index.match(embedding, int(np.argmax(scores)))
        if match is None:
            return decision
        self.decided += 1
        return enrolled_decision(match, bundle.taxonomy, decision)

    def report(self) -> dict:
        """For `state` and `stats`."""
        with self._lock:
            index = self._index
        return {
            "products": len(index) if index is not None else 0,
            "decided": self.decided,
            "problems": self.problems,
        }

    def close(self) -> None:
        while True:
            try:
                self._requests.get_nowait().future.set_exception(EnrollError("the daemon stopped"))
            except queue.Empty:
                break
        self.store.close()
