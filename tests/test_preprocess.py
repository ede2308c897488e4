"""One preprocessing function: the same file gives the same tensor on the host and on the device."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from taxonedge.edge.kernel.preprocess import (
    ImageError,
    InputSpec,
    decode_image,
    load_image,
    preprocess,
    read_image,
)

from .conftest import class_image


@pytest.fixture
def jpeg(tmp_path):
    rng = np.random.default_rng(3)
    img = cv2.resize(class_image(2, rng, 64), (160, 120))  # not square: the crop rule matters
    path = tmp_path / "item.jpg"
    cv2.imwrite(str(path), img)
    return path


def test_center_crop_resize_rgb(jpeg):
    spec = InputSpec(height=48, width=48, crop="center", crop_fraction=0.5)
    out = load_image(jpeg, spec)
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    bgr = read_image(jpeg)
    side = 60  # half of the 120-pixel short side, centred
    manual = cv2.resize(bgr[30:90, 50:110], (48, 48), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    assert side == 60 and np.array_equal(out, manual)


def test_int8_and_float_inputs(jpeg):
    u8 = load_image(jpeg, InputSpec(height=32, width=32))
    i8 = load_image(jpeg, InputSpec(height=32, width=32, dtype="int8", zero_point=-128))
    f32 = load_image(jpeg, InputSpec(height=32, width=32, dtype="float32"))
    assert np.array_equal(i8.astype(np.int16) + 128, u8.astype(np.int16))
    assert f32.dtype == np.float32 and np.array_equal(f32, u8.astype(np.float32))


def test_host_file_path_and_device_bytes_path_are_identical(jpeg):
    """The host reads files with load_image; the device decodes bytes (folder source, snapshots). Same
    tensor."""
    spec = InputSpec(height=64, width=64)
    host = load_image(jpeg, spec)
    assert np.array_equal(preprocess(decode_image(jpeg.read_bytes()), spec), host)


def test_ffmpeg_decodes_jpeg_differently(tmp_path, jpeg):
    """Why the device's image-folder source must not use cv2.VideoCapture on an image sequence: FFmpeg's
    MJPEG decoder gives other pixels than libjpeg (cv2.imread), so training and device tensors would drift."""
    seq = tmp_path / "seq"
    seq.mkdir()
    (seq / "frame_0000.jpg").write_bytes(jpeg.read_bytes())
    cap = cv2.VideoCapture(str(seq / "frame_%04d.jpg"))
    ok, frame = cap.read()
    cap.release()
    assert ok
    spec = InputSpec(height=64, width=64)
    ffmpeg, libjpeg = preprocess(frame, spec), load_image(jpeg, spec)
    assert not np.array_equal(ffmpeg, libjpeg)
    assert np.abs(ffmpeg.astype(int) - libjpeg.astype(int)).mean() < 4  # close, but not identical


def test_corrupt_and_bad_frames_are_rejected_clearly(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match="broken.jpg: not a decodable image"):
        read_image(bad)
    with pytest.raises(ImageError, match="missing.jpg: cannot read"):
        read_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageError, match="HxWx3"):
        preprocess(np.zeros((10, 10), np.uint8), InputSpec())
    with pytest.raises(ImageError, match="uint8"):
        preprocess(np.zeros((10, 10, 3), np.float32), InputSpec())
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"")


def test_training_loader_and_device_folder_source_give_identical_tensors(tmp_path):
    """The real host path (taxonedge.train.data.load_images, used by training, calibration, evaluation)
    and the real device path (the daemon's folder source + preprocess) on the same files."""
    from taxonedge.edge.service.config import FolderSource
    from taxonedge.edge.service.source import SourceEnded, make_reader
    from taxonedge.train.data import load_images, read_samples

    from .conftest import write_image_tree

    root = write_image_tree(tmp_path / "photos", ["Fruit/Apple", "Fruit/Kiwi"], per_class=3, size=90, seed=5)
    spec = InputSpec(height=40, width=40)
    samples = sorted(read_samples(root), key=lambda s: s.path)
    host, kept, errors = load_images(samples, spec)
    assert not errors and len(kept) == 6
    for sample, host_tensor in zip(kept, host, strict=True):
        path = Path(sample.path)
        reader = make_reader(FolderSource(type="folder", path=path.parent))
        reader.open()
        frames = {}
        while True:
            try:
                image, name = reader.read()
            except SourceEnded:
                break
            frames[name] = image
        assert np.array_equal(preprocess(frames[path.name], spec), host_tensor)
