"""Frame sources: camera, stream, video file or image folder, captured in their own thread.

The capture thread keeps only the newest frame in a one-slot `LatestFrame`: a live source (camera,
stream, realtime-paced file) overwrites a frame that inference has not taken yet and counts it as
dropped, so a slow model never builds a backlog. A file read with `pacing = "fast"` is not live: its
thread waits until inference asks for the next frame, so every frame is classified and none is dropped.
When the source fails, ends early or stalls, it is reopened with exponential backoff; each reopen and
stall is counted and the state is visible in `status()`. A realtime-paced file runs on its own clock:
frame k leaves at the first frame's time + k / fps, without drift however late single frames are.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..kernel.preprocess import ImageError, read_image
from ..kernel.taxonomy import IMAGE_SUFFIXES
from .config import CameraSource, FolderSource, SourceConfig, SourceType, StreamSource, VideoSource
from .osthread import start_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # BGR uint8, region of interest already cropped
    index: int  # running number since the daemon started
    captured: float  # time.monotonic() when the frame came off the source
    wall: float  # time.time() at the same moment
    origin: str  # file name or "frame N" of the source, for logs and snapshots


class SourceError(RuntimeError):
    """The source cannot be opened or read right now (it is retried with backoff)."""


class SourceEnded(Exception):
    """A file or folder source without `loop` has delivered everything."""


class LatestFrame:
    """A one-frame slot between the capture thread and inference."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._wanted = True
        self.dropped = 0
        self.closed = False

    def put(self, frame: Frame) -> None:
        with self._cond:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._wanted = False
            self._cond.notify_all()

    def wait_wanted(self, stop: threading.Event, timeout: float = 0.2) -> bool:
        """For unpaced files: block until inference asks for a frame (or `stop`)."""
        with self._cond:
            while not self._wanted and not stop.is_set() and not self.closed:
                self._cond.wait(timeout)
            return self._wanted

    def count_dropped(self) -> None:
        """A frame taken from this slot that will not be classified after all (paused or stopping)."""
        with self._cond:
            self.dropped += 1

    def request(self) -> None:
        """Inference will want a frame soon: let an unpaced file source decode the next one now."""
        with self._cond:
            if self._frame is None:
                self._wanted = True
                self._cond.notify_all()

    def take(self, timeout: float) -> Frame | None:
        """The newest frame, or None after `timeout` seconds (or once the source is closed and empty)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._frame is None:
                self._wanted = True
                self._cond.notify_all()
            while self._frame is None and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            frame, self._frame = self._frame, None
            return frame

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class _OpenCvReader:
    """Camera, stream or video file through cv2.VideoCapture."""

    def __init__(self, cfg: CameraSource | StreamSource | VideoSource):
        self.cfg = cfg
        self.cap: Any = None
        self.count = 0
        self.total = 0
        self.fps = 0.0

    @property
    def name(self) -> str:
        cfg = self.cfg
        return str(
            cfg.path
            if isinstance(cfg, VideoSource)
            else cfg.url
            if isinstance(cfg, StreamSource)
            else cfg.device
        )

    def open(self) -> None:
        cfg = self.cfg
        if isinstance(cfg, VideoSource):
            if not cfg.path.is_file():
                raise SourceError(f"video file {cfg.path} does not exist")
            cap = cv2.VideoCapture(str(cfg.path))
        elif isinstance(cfg, StreamSource):
            cap = cv2.VideoCapture(cfg.url, cv2.CAP_FFMPEG)
        else:
            cap = cv2.VideoCapture(cfg.device)
            for prop, value in (
                (cv2.CAP_PROP_FRAME_WIDTH, cfg.width),
                (cv2.CAP_PROP_FRAME_HEIGHT, cfg.height),
                (cv2.CAP_PROP_FPS, cfg.fps),
            ):
                if value:
                    cap.set(prop, value)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"OpenCV cannot open {self.name}")
        self.cap = cap
        self.count = 0
        self.total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if isinstance(cfg, VideoSource) else 0
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)

    def read(self) -> tuple[np.ndarray, str]:
        ok, image = self.cap.read()
        if not ok or image is None:
            if isinstance(self.cfg, VideoSource):
                if self.total and self.count < self.total - 1:
                    # A truncated or damaged file ends before the frame count in its header.
                    log.warning(
                        "video %s ended at frame %d of %d (truncated or damaged file)",
                        self.name,
                        self.count,
                        self.total,
                    )
                if self.count == 0:
                    raise SourceError(f"video {self.name} has no readable frame (damaged file?)")
                raise SourceEnded
            raise SourceError(f"no frame from {self.name}")
        self.count += 1
        return image, f"frame {self.count}"

    @property
    def live(self) -> bool:
        return not isinstance(self.cfg, VideoSource) or self.cfg.pacing == "realtime"

    @property
    def interval_s(self) -> float:
        """Seconds between frames for realtime pacing of a file (0: no pacing)."""
        if isinstance(self.cfg, VideoSource) and self.cfg.pacing == "realtime" and self.fps > 0:
            return 1.0 / self.fps
        return 0.0

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class _FolderReader:
    """Image files of a folder in name order; rescanned on each pass so new files are picked up."""

    def __init__(self, cfg: FolderSource):
        self.cfg = cfg
        self.files: list[Path] = []
        self.position = 0
        self.corrupt = 0

    @property
    def name(self) -> str:
        return str(self.cfg.path)

    def open(self) -> None:
        try:
            self.files = sorted(p for p in self.cfg.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        except OSError as exc:
            raise SourceError(f"image folder {self.cfg.path}: {exc.strerror or exc}") from None
        if not self.files:
            raise SourceError(f"image folder {self.cfg.path} holds no images")
        self.position = 0

    def read(self) -> tuple[np.ndarray, str]:
        while self.position < len(self.files):
            path = self.files[self.position]
            self.position += 1
            try:
                return read_image(path), path.name
            except ImageError as exc:
                if not self.cfg.path.is_dir():
                    raise SourceError(f"image folder {self.cfg.path} disappeared") from None
                self.corrupt += 1
                log.warning("skipping %s", exc)
        raise SourceEnded

    @property
    def live(self) -> bool:
        return self.cfg.pacing == "realtime"

    @property
    def interval_s(self) -> float:
        return 1.0 / self.cfg.fps if self.cfg.pacing == "realtime" else 0.0

    def close(self) -> None:
        pass


def make_reader(cfg: SourceType) -> _OpenCvReader | _FolderReader:
    return _FolderReader(cfg) if isinstance(cfg, FolderSource) else _OpenCvReader(cfg)


def crop_roi(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """The region of interest [x, y, width, height], clipped to the frame."""
    if roi is None:
        return image
    x, y, w, h = roi
    crop = image[max(0, y) : y + h, max(0, x) : x + w]
    if crop.shape[0] < 2 or crop.shape[1] < 2:
        raise ImageError(
            f"region of interest {list(roi)} lies outside the {image.shape[1]}x{image.shape[0]} frame"
        )
    return crop


class Capture:
    """Runs a reader in a thread and fills `slot`; reopens with backoff; restarts a stalled reader."""

    def __init__(self, source: SourceType, capture: SourceConfig, slot: LatestFrame | None = None):
        self.source_cfg = source
        self.cfg = capture
        self.slot = slot or LatestFrame()
        self.reader = make_reader(source)
        self.state = "starting"
        self.last_error: str | None = None
        self.frames = 0
        self.reconnects = 0
        self.stalls = 0
        self.roi_errors = 0
        self.last_frame_wall: float | None = None
        self._last_frame_mono = time.monotonic()
        self._stop = threading.Event()
        self._generation = 0
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()

    @property
    def corrupt(self) -> int:
        return getattr(self.reader, "corrupt", 0)

    def start(self) -> None:
        self._generation += 1
        self._last_frame_mono = time.monotonic()
        self._thread = start_thread(self._run, "capture", (self._generation,))

    def stop(self) -> None:
        self._stop.set()
        self.slot.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.reader.close()

    def check_stall(self) -> bool:
        """Called periodically: a live source silent for stall_timeout_s gets a fresh reader thread.

        A blocked cv2 read cannot be interrupted, so the old thread is abandoned (it exits when its read
        returns, seeing a newer generation) and a new reader opens the source again.
        """
        if self.finished.is_set() or self._stop.is_set() or not self.reader.live:
            return False
        if time.monotonic() - self._last_frame_mono < self.cfg.stall_timeout_s or self.state != "running":
            return False
        self.stalls += 1
        self.state = "stalled"
        log.warning(
            "source %s stalled: no frame for %.1f s, reopening", self.reader.name, self.cfg.stall_timeout_s
        )
        self.reader = make_reader(self.source_cfg)
        self.start()
        return True

    def status(self) -> dict:
        return {
            "state": self.state,
            "source": self.reader.name,
            "frames": self.frames,
            "dropped": self.slot.dropped,
            "reconnects": self.reconnects,
            "stalls": self.stalls,
            "corrupt": self.corrupt,
            "last_error": self.last_error,
        }

    def _run(self, generation: int) -> None:
        reader = self.reader
        backoff = self.cfg.reconnect_initial_s
        opened = False
        # Realtime pacing of a file: frame k of the schedule is due at anchor + k * interval, so a late
        # frame (a slow decode, a busy core) is made up by the next ones instead of shifting every frame
        # after it. A loop keeps the schedule; a reopen after a failure starts a new one.
        anchor: float | None = None
        paced = 0
        while not self._stop.is_set() and generation == self._generation:
            if not opened:
                try:
                    reader.open()
                    opened = True
                    self.state = "running"
                    self._last_frame_mono = time.monotonic()
                    backoff = self.cfg.reconnect_initial_s
                except SourceError as exc:
                    self._failed(str(exc), backoff)
                    backoff = min(backoff * 2, self.cfg.reconnect_max_s)
                    continue
            if not reader.live and not self.slot.wait_wanted(self._stop):
                continue
            try:
                image, origin = reader.read()
            except SourceEnded:
                if getattr(self.source_cfg, "loop", False):
                    reader.close()
                    opened = False
                    continue
                self.state = "finished"
                self.finished.set()
                self.slot.close()
                return
            except SourceError as exc:
                reader.close()
                opened = False
                anchor = None
                self._failed(str(exc), backoff)
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
                continue
            if generation != self._generation:
                return
            try:
                image = crop_roi(image, self.cfg.roi)
            except ImageError as exc:
                self.roi_errors += 1
                self.last_error = str(exc)
                log.error("%s", exc)
                time.sleep(1.0)
                continue
            now = time.monotonic()
            self.frames += 1
            self._last_frame_mono = now
            self.last_frame_wall = time.time()
            self.slot.put(Frame(image, self.frames, now, self.last_frame_wall, origin))
            interval = reader.interval_s
            if interval:
                if anchor is None:
                    anchor, paced = now, 0
                paced += 1
                self._stop.wait(max(0.0, anchor + paced * interval - time.monotonic()))

    def _failed(self, message: str, backoff: float) -> None:
        self.reconnects += 1
        self.state = "reconnecting"
        if message != self.last_error:
            log.warning("source: %s; retrying in %.1f s", message, backoff)
        self.last_error = message
        self._stop.wait(backoff)
