"""The inference worker process: images go through its shared buffer and come back in order, unmixed."""

from __future__ import annotations

import numpy as np
import pytest
from taxonedge.edge.bundle import read_bundle
from taxonedge.edge.infer import InferenceWorker, WorkerError
from taxonedge.edge.preprocess import preprocess
from taxonedge.edge.runtime import Classifier

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
    expected = [Classifier(bundle).probabilities(image) for image in frames]
    assert len({int(np.argmax(p)) for p in expected}) > 1  # distinct answers, so a mix-up would show
    got = []
    worker.submit(frames[0])
    for image in frames[1:]:
        worker.submit(image)  # the second slot fills while the first is still at the worker
        got.append(worker.result()[0])
    got.append(worker.result()[0])
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)


def test_more_images_than_slots_is_refused_before_anything_is_overwritten(bundle, worker):
    frames = images(bundle, 3)
    worker.submit(frames[0])
    worker.submit(frames[1])
    with pytest.raises(RuntimeError, match="collect a result first"):
        worker.submit(frames[2])
    np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).probabilities(frames[0]))
    np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).probabilities(frames[1]))


def test_an_image_of_the_wrong_shape_fails_alone_and_the_worker_keeps_serving(bundle, worker):
    frame = images(bundle, 1)[0]
    worker.submit(np.zeros((7, 5, 3), np.uint8))
    with pytest.raises(WorkerError):
        worker.result()
    worker.submit(frame)
    np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).probabilities(frame))
    assert worker.alive()


def test_without_shared_memory_images_go_through_the_pipe(bundle, monkeypatch, caplog):
    import multiprocessing.context

    def no_shm(self, *args):
        raise FileNotFoundError(2, "No such file or directory", "/dev/shm")  # what a container without it gives

    monkeypatch.setattr(multiprocessing.context.BaseContext, "RawArray", no_shm)
    worker = InferenceWorker(bundle, backend="cpu", warmup_runs=1)
    worker.start()
    try:
        assert "images go through the pipe" in caplog.text
        frames = images(bundle, 3)
        worker.submit(frames[0])
        worker.submit(frames[1])
        np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).probabilities(frames[0]))
        np.testing.assert_array_equal(worker.result()[0], Classifier(bundle).probabilities(frames[1]))
    finally:
        worker.stop()
