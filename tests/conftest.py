"""Shared fixtures: a real mosquitto broker per test, generated image trees, paths into ../shared.

Everything here is real: the broker is Debian's mosquitto on a free loopback port, images are JPEGs
written by OpenCV. Tests that need ../shared (Grocery data, ImageNet weights) skip cleanly without it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GROCERY = SHARED / "data" / "grocery" / "dataset"
WEIGHTS = SHARED / "weights"
REFERENCE = SHARED / "reference"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    """A mosquitto process on 127.0.0.1:port. `stop()`/`start()` simulate an outage on the same port."""

    port: int
    workdir: Path
    extra_config: str = ""
    process: subprocess.Popen | None = None
    host: str = "127.0.0.1"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.skip("mosquitto is not installed (apt-get install mosquitto); .ci/run installs it")
        config = self.extra_config or f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        if "persistence true" not in config:  # a test of the shipped broker config brings its own
            config += "persistence false\n"
        # set_tcp_nodelay as docs/deploy-device.md recommends: with Nagle on, a label sent right after a QoS 0
        # message waits for the subscriber's delayed ACK (8-20 ms at p99 in bench/bench_daemon.py)
        self.config_path.write_text(config + "set_tcp_nodelay true\n")
        # mosquitto drops to user 'mosquitto' when started as root: everything it reads must be readable.
        os.chmod(self.workdir, 0o755)
        os.chmod(self.config_path, 0o644)
        with open(self.workdir / "mosquitto.log", "ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen([exe, "-c", str(self.config_path)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()[-2000:]}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT to its clients, nothing flushed, as a crashed or power-cut broker."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A fresh mosquitto on a free loopback port, stopped after the test."""
    b = Broker(port=free_port(), workdir=tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


# ---- generated images -----------------------------------------------------------------------------
# Each class is a distinct colour and shape so that a tiny model learns it in a few epochs.
_PALETTE = [
    (220, 40, 40),
    (40, 200, 40),
    (40, 60, 220),
    (230, 210, 40),
    (200, 40, 200),
    (40, 210, 210),
    (250, 140, 20),
    (120, 120, 120),
]


def class_image(index: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A BGR image for class `index`: a coloured shape on a noisy background, with random placement."""
    img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    color = tuple(int(c) for c in _PALETTE[index % len(_PALETTE)])
    import cv2

    c = size // 2 + int(rng.integers(-size // 8, size // 8 + 1))
    r = size // 3 + int(rng.integers(-size // 12, size // 12 + 1))
    if (index // len(_PALETTE)) % 2 == 0:
        cv2.circle(img, (c, c), r, color, -1)
    else:
        cv2.rectangle(img, (c - r, c - r), (c + r, c + r), color, -1)
    return img


def write_image_tree(
    root: Path, labels: list[str], per_class: int = 12, size: int = 64, seed: int = 0
) -> Path:
    """Write `per_class` JPEGs for each label path under `root` (`Fruit/Apple/Granny-Smith/0.jpg`)."""
    import cv2

    rng = np.random.default_rng(seed)
    for i, label in enumerate(labels):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            cv2.imwrite(str(folder / f"{k:03d}.jpg"), class_image(i, rng, size))
    return root


def write_frames_folder(root: Path, per_class: int = 3, seed: int = 0) -> Path:
    """A flat folder `root/frames` of JPEGs named 000.jpg, 001.jpg, ... in class order, as a folder source
    reads."""
    tree = write_image_tree(root / "tree", TINY_LABELS, per_class=per_class, seed=seed)
    flat = root / "frames"
    flat.mkdir()
    for i, path in enumerate(sorted(tree.rglob("*.jpg"))):
        shutil.copy(path, flat / f"{i:03d}.jpg")
    return flat


# Uneven depth on purpose: Fruit/Avocado is a leaf at depth 2 beside depth-3 apples.
TINY_LABELS = ["Fruit/Apple/Granny-Smith", "Fruit/Apple/Pink-Lady", "Fruit/Avocado", "Vegetables/Carrot"]


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled image folder tree with uneven depth (train split)."""
    return write_image_tree(tmp_path_factory.mktemp("tiny") / "train", TINY_LABELS, per_class=16, seed=1)


@pytest.fixture(scope="session")
def tiny_val_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("tiny_val") / "val", TINY_LABELS, per_class=6, seed=2)


def needs_shared(*paths: Path) -> pytest.MarkDecorator:
    missing = [str(p) for p in paths if not p.exists()]
    return pytest.mark.skipif(bool(missing), reason=f"../shared not available ({', '.join(missing)})")


def run_cli(
    *args: str, check: bool = True, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m taxonedge ARGS` in a subprocess, as a user would, and return the result."""
    proc = subprocess.run(
        [sys.executable, "-m", "taxonedge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"taxonedge {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc
