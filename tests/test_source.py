"""Frame sources with real files: videos written by cv2.VideoWriter, JPEG folders, corrupt and truncated
input."""

from __future__ import annotations

import shutil
import threading
import time

import cv2
import numpy as np
import pytest
from taxonedge.edge.kernel.preprocess import ImageError
from taxonedge.edge.service.config import FolderSource, SourceConfig, StreamSource, VideoSource
from taxonedge.edge.service.source import Capture, LatestFrame, crop_roi


def write_video(path, frames: int = 30, fourcc: str = "mp4v", fps: float = 30.0, size=(96, 64)):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        img = np.full((size[1], size[0], 3), (i * 8) % 255, np.uint8)
        cv2.putText(img, str(i), (5, 40), cv2.FONT_HERSHEY_SIMPLEX, 1, (255, 255, 255), 2)
        writer.write(img)
    writer.release()
    return path


def drain(capture: Capture, timeout: float = 10.0, want: int | None = None) -> list:
    frames = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = capture.slot.take(0.2)
        if frame is not None:
            frames.append(frame)
            if want and len(frames) >= want:
                break
        elif capture.finished.is_set():
            break
    return frames


def fast_cfg():
    return SourceConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2, stall_timeout_s=1.0)


@pytest.mark.parametrize("fourcc,suffix", [("mp4v", ".mp4"), ("MJPG", ".avi")])
def test_unpaced_video_delivers_every_frame(tmp_path, fourcc, suffix):
    path = write_video(tmp_path / f"v{suffix}", frames=25, fourcc=fourcc)
    capture = Capture(VideoSource(type="video", path=path, pacing="fast"), fast_cfg())
    capture.start()
    frames = drain(capture)
    capture.stop()
    assert len(frames) == 25
    assert capture.slot.dropped == 0
    assert capture.state == "finished"
    assert [f.index for f in frames] == list(range(1, 26))


def test_realtime_source_keeps_only_newest_and_counts_drops(tmp_path):
    path = write_video(tmp_path / "v.avi", frames=40, fourcc="MJPG", fps=200.0)
    capture = Capture(VideoSource(type="video", path=path, pacing="realtime"), fast_cfg())
    capture.start()
    capture.finished.wait(5)
    frame = capture.slot.take(0.5)
    capture.stop()
    assert frame is not None and frame.index == 40  # the newest, not a backlog
    assert capture.slot.dropped == 39


def test_truncated_video_ends_early_without_crashing(tmp_path, caplog):
    full = write_video(tmp_path / "full.avi", frames=60, fourcc="MJPG")
    data = full.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    capture = Capture(VideoSource(type="video", path=cut, pacing="fast"), fast_cfg())
    with caplog.at_level("WARNING"):
        capture.start()
        frames = drain(capture)
        capture.stop()
    assert 0 < len(frames) < 60
    assert capture.finished.is_set()
    assert f"ended at frame {len(frames)} of 60 (truncated or damaged file)" in caplog.text


def test_damaged_video_is_retried_with_backoff(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00not a video" * 100)
    capture = Capture(VideoSource(type="video", path=bad, pacing="fast"), fast_cfg())
    capture.start()
    time.sleep(0.6)
    status = capture.status()
    capture.stop()
    assert status["state"] == "reconnecting"
    assert status["reconnects"] >= 2
    assert "bad.mp4" in status["last_error"]


def test_folder_skips_corrupt_jpeg_and_names_it(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.full((40, 40, 3), 90 * i, np.uint8))
    (folder / "1b.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    capture = Capture(FolderSource(type="folder", path=folder), fast_cfg())
    with caplog.at_level("WARNING"):
        capture.start()
        frames = drain(capture)
        capture.stop()
    assert [f.origin for f in frames] == ["0.jpg", "1.jpg", "2.jpg"]
    assert capture.corrupt == 1
    assert "1b.jpg" in caplog.text


def test_folder_vanishes_and_comes_back(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.full((40, 40, 3), 100, np.uint8))
    capture = Capture(
        FolderSource(type="folder", path=folder, loop=True, pacing="realtime", fps=50), fast_cfg()
    )
    capture.start()
    assert len(drain(capture, want=3)) == 3
    folder.rename(tmp_path / "away")
    deadline = time.monotonic() + 5
    while capture.state != "reconnecting" and time.monotonic() < deadline:
        capture.slot.take(0.05)
    assert capture.state == "reconnecting"
    before = capture.reconnects
    (tmp_path / "away").rename(folder)
    frames = drain(capture, want=3)
    capture.stop()
    assert len(frames) == 3
    assert capture.state == "running"
    assert before >= 1


def test_missing_video_appears_later(tmp_path):
    path = tmp_path / "late.avi"
    capture = Capture(VideoSource(type="video", path=path, pacing="fast"), fast_cfg())
    capture.start()
    time.sleep(0.3)
    assert capture.state == "reconnecting"
    write_video(tmp_path / "tmp.avi", frames=5, fourcc="MJPG")
    shutil.move(tmp_path / "tmp.avi", path)
    frames = drain(capture)
    capture.stop()
    assert len(frames) == 5


def test_stalled_live_source_gets_a_new_reader(tmp_path):
    path = write_video(tmp_path / "v.avi", frames=3, fourcc="MJPG", fps=1.0)
    cfg = SourceConfig(stall_timeout_s=0.3, reconnect_initial_s=0.05)
    capture = Capture(VideoSource(type="video", path=path, pacing="realtime", loop=True), cfg)
    capture.start()
    capture.slot.take(2)
    time.sleep(0.5)  # 1 fps pacing: silent longer than the stall timeout
    assert capture.check_stall()
    assert capture.stalls == 1
    assert capture.slot.take(2) is not None
    capture.stop()


def test_roi_crop_and_outside_roi():
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    assert crop_roi(image, (5, 2, 10, 8)).shape == (8, 10, 3)
    assert np.array_equal(crop_roi(image, (5, 2, 10, 8)), image[2:10, 5:15])
    with pytest.raises(ImageError, match="outside"):
        crop_roi(image, (40, 40, 10, 10))


def test_latest_frame_take_times_out_and_close_wakes():
    slot = LatestFrame()
    assert slot.take(0.05) is None
    threading.Timer(0.05, slot.close).start()
    assert slot.take(5) is None
    assert slot.closed


def test_http_stream_is_read_and_reconnected(tmp_path):
    """A `stream` source over HTTP (OpenCV's FFMPEG backend), served by a real local HTTP server."""
    import functools
    import http.server

    write_video(tmp_path / "cam.avi", frames=10, fourcc="MJPG")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    handler.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cam.avi"
    capture = Capture(StreamSource(type="stream", url=url), fast_cfg())
    try:
        capture.start()
        assert len(drain(capture, want=3)) == 3
        server.shutdown()
        server.server_close()
        deadline = time.monotonic() + 10
        while "cannot open" not in (capture.last_error or "") and time.monotonic() < deadline:
            capture.slot.take(0.05)
        assert capture.state == "reconnecting" and f"cannot open {url}" in capture.last_error
        server = http.server.ThreadingHTTPServer(("127.0.0.1", server.server_address[1]), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        assert len(drain(capture, want=3)) == 3  # the stream came back
        assert capture.state == "running"
    finally:
        capture.stop()
        server.shutdown()


def test_realtime_video_keeps_the_files_clock_through_late_frames(tmp_path):
    """Frame k leaves at the first frame's time + k / fps: a late frame (a slow decode, a busy core; here
    every 10th read takes 1.5 frame intervals) is made up by the next ones, so the clip does not drift.
    Pacing 'sleep one interval after each frame' lost half an interval at each of them (200 ms over 4 s)."""
    fps, count = 25.0, 100
    path = write_video(tmp_path / "v.avi", frames=count, fourcc="MJPG", fps=fps)
    capture = Capture(VideoSource(type="video", path=path, pacing="realtime"), fast_cfg())
    reader = capture.reader
    real_read = reader.read

    def hiccup_read():
        image, origin = real_read()
        if reader.count % 10 == 5:
            time.sleep(1.5 / fps)
        return image, origin

    reader.read = hiccup_read
    capture.start()
    frames = drain(capture, timeout=15)
    capture.stop()
    assert len(frames) >= count - 12, len(frames)  # a late frame may be overwritten by the one due next
    first = frames[0].captured
    errors = [f.captured - first - (int(f.origin.split()[1]) - 1) / fps for f in frames]
    # frames 5 and 6 of every ten are late by design (the slow read, the one due during it)
    settled = [e for f, e in zip(frames, errors, strict=True) if int(f.origin.split()[1]) % 10 in (8, 9, 0)]
    assert abs(errors[-1]) < 0.015 and max(abs(e) for e in settled) < 0.015, (errors[-1], settled)
