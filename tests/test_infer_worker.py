"""The inference worker process: images go through its shared buffer and come back in order, unmixed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from taxonedge.edge.kernel import backends
from taxonedge.edge.kernel.bundle import read_bundle
from taxonedge.edge.kernel.preprocess import preprocess
from taxonedge.edge.kernel.runtime import Classifier
from taxonedge.edge.service.infer import InferenceWorker, WorkerError

from .conftest import TINY_LABELS, class_image
from .tinymodels import write_tiny_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return read_bundle(write_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny.tebundle"))


@pytest.fixture
def worker(bundle):
    worker = InferenceWorker(bundle, backend="cpu", warmup_runs=1)
    worker.start()
    yield worker
    worker.stop()


def images(bundle, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [preprocess(class_image(i % len(TINY_LABELS), rng), bundle.manifest.input) for i in range(n)]


def test_two_in_flight_answers_match_the_in_process_classifier_frame_by_frame(bundle, worker):
    frames = images(bundle, 9)
    expected = [Classifier(bundle).outputs(image) for image in frames]
    assert len({int(np.argmax(p)) for p, _ in expected}) > 1  # distinct answers, so a mix-up would show
    got = []
    worker.submit(frames[0])
    for image in frames[1:]:
        worker.submit(image)  # the second slot fills while the first is still at the worker
        got.append(worker.result())
    got.append(worker.result())
    for (scores, embedding), answer in zip(expected, got, strict=True):
        np.testing.assert_array_equal(answer.scores, scores)  # the leaf logits, dequantized
        np.testing.assert_array_equal(answer.embedding, embedding)  # and the embedding of the same invoke


def test_more_images_than_slots_is_refused_before_anything_is_overwritten(bundle, worker):
    frames = images(bundle, 3)
    worker.submit(frames[0])
    worker.submit(frames[1])
    with pytest.raises(RuntimeError, match="collect a result first"):
        worker.submit(frames[2])
    np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).scores(frames[0]))
    np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).scores(frames[1]))


def test_an_image_of_the_wrong_shape_fails_alone_and_the_worker_keeps_serving(bundle, worker):
    frame = images(bundle, 1)[0]
    worker.submit(np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(WorkerError):
        worker.result()
    worker.submit(frame)
    np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).scores(frame))
    assert worker.alive()


def test_without_shared_memory_images_go_through_the_pipe(bundle, monkeypatch, caplog):
    import multiprocessing.context

    def no_shm(self, *args):
        raise FileNotFoundError(
            2, "No such file or directory", "/dev/shm"
        )  # what a container without it gives

    monkeypatch.setattr(multiprocessing.context.BaseContext, "RawArray", no_shm)
    worker = InferenceWorker(bundle, backend="cpu", warmup_runs=1)
    worker.start()
    try:
        assert "images go through the pipe" in caplog.text
        frames = images(bundle, 3)
        worker.submit(frames[0])
        worker.submit(frames[1])
        np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).scores(frames[0]))
        np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).scores(frames[1]))
    finally:
        worker.stop()


def _usb_device(root, name: str, vendor: str, product: str) -> None:
    path = root / name
    path.mkdir(parents=True)
    (path / "idVendor").write_text(vendor + "\n")
    (path / "idProduct").write_text(product + "\n")


def test_edgetpu_devices_reads_usb_ids_and_apex_nodes_without_loading_libedgetpu(tmp_path, monkeypatch):
    from taxonedge.edge.kernel import runtime

    usb, dev = tmp_path / "usb", tmp_path / "dev"
    dev.mkdir()
    _usb_device(usb, "1-1", "046d", "0825")  # a webcam: not an Edge TPU
    (usb / "1-1:1.0").mkdir()  # an interface: no ids
    monkeypatch.setattr(runtime, "USB_ROOT", usb)
    monkeypatch.setattr(runtime, "DEV_ROOT", dev)
    assert runtime.edgetpu_devices() == []
    _usb_device(usb, "2-1", "1a6e", "089a")  # USB Accelerator before its firmware is loaded
    _usb_device(usb, "2-2", "18d1", "9302")  # and after
    (dev / "apex_0").touch()  # a PCIe / M.2 card
    assert runtime.edgetpu_devices() == ["pci:" + str(dev / "apex_0"), "usb:2-1", "usb:2-2"]
    assert runtime.edgetpu_devices("usb:0") == ["usb:2-1", "usb:2-2"]
    assert runtime.edgetpu_devices("pci:0") == ["pci:" + str(dev / "apex_0")]


def test_a_bundle_without_an_edgetpu_model_runs_on_the_cpu_and_says_so(bundle, monkeypatch):
    """The delegate runs only what edgetpu_compiler mapped to it: with an uncompiled model every op would
    run on the CPU while the daemon reported "edgetpu". The accelerator is the part that cannot exist
    here, so its delegate is stood in for at that boundary; everything else is real."""
    from taxonedge.edge.kernel import runtime

    assert not bundle.has_edgetpu_model
    loaded: list[str | None] = []

    def present(device=None):
        loaded.append(device)
        return object()  # a delegate that must never reach the interpreter: nothing is compiled for it

    monkeypatch.setattr(runtime, "load_edgetpu_delegate", present)
    clf, used, reason = backends.open_classifier(bundle, "auto", num_threads=1, device="usb:0")
    assert loaded == ["usb:0"] and used == "cpu" and not clf.edgetpu
    assert "no Edge TPU model (model_edgetpu.tflite)" in reason and "edgetpu_compiler" in reason
    assert clf.probabilities(images(bundle, 1)[0]).shape == (len(TINY_LABELS),)
    with pytest.raises(backends.BackendUnavailable, match="no Edge TPU model"):
        backends.open_classifier(bundle, "edgetpu")


def test_open_classifier_without_libedgetpu_and_on_cpu(bundle, monkeypatch):
    from taxonedge.edge.kernel import runtime

    clf, used, reason = backends.open_classifier(bundle, "auto", num_threads=1)  # the real library load fails
    assert used == "cpu" and not clf.edgetpu and reason.startswith("Edge TPU unavailable, running on the CPU")
    assert "libedgetpu" in reason
    with pytest.raises(backends.BackendUnavailable, match="libedgetpu"):
        backends.open_classifier(bundle, "edgetpu")

    def never(device=None):
        raise AssertionError("backend cpu must not look for an Edge TPU")

    monkeypatch.setattr(runtime, "load_edgetpu_delegate", never)
    assert backends.open_classifier(bundle, "cpu", num_threads=1)[1:] == ("cpu", None)


def test_the_worker_maps_only_the_runtime_not_the_daemons_libraries(worker):
    """The worker gets plain model values, not the Bundle: unpickling a Bundle imported pydantic, OpenCV and
    cryptography into it, 39 of its 91 MB with the reference MobileNetV2 (bench/bench_daemon.py prints the
    peak RSS of each process)."""
    maps = Path(f"/proc/{worker.pid}/maps").read_text()
    assert "litert" in maps or "tflite_runtime" in maps  # the interpreter is there
    for library in ("cv2", "_pydantic_core", "cryptography"):
        assert library not in maps, f"{library} is loaded in the inference worker"
