"""The enrollment demo as a user runs it (`bash examples/demo.sh enroll [PHOTO_DIR]`): a product the model
does not know, photos of it and a belt clip made by examples/demo/enroll_clip.py, a real daemon on a real
mosquitto, `taxonedge enroll` while it runs, and `taxonedge listen` showing the product's label from then
on. Run with a tiny signed v3 bundle here (the demo's own Grocery bundle is the same format)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from taxonedge.edge.kernel.signing import generate_keypair, load_private_key

from .conftest import class_image
from .tinymodels import write_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]
LABEL = "Hardware/Paint/Blue-Can"


def frames_of(clip: Path) -> int:
    video = cv2.VideoCapture(str(clip))
    count = 0
    while video.read()[0]:
        count += 1
    return count


def test_the_demo_photos_and_clip_from_a_folder_of_photos(tmp_path):
    """PHOTO_DIR: all photos but the last are enrolled; the last one passes on the belt."""
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.jpg"), class_image(5, rng, 200))
    (folder / "notes.txt").write_text("not a photo")
    script = ROOT / "examples/demo/enroll_clip.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "out"), str(folder)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out/photos").iterdir()) == [f"new-0{i}.jpg" for i in range(3)]
    assert frames_of(tmp_path / "out/belt-new.mp4") > 100  # Grocery frames, then three passes
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "o2"), str(empty)], capture_output=True
    )
    assert done.returncode == 1 and b"no readable JPEG or PNG photos" in done.stderr


def test_demo_enroll_walkthrough_end_to_end(tmp_path):
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.skip("mosquitto is not installed")
    generate_keypair(tmp_path / "op.key", tmp_path / "op.pub")
    bundle = write_tiny_bundle(tmp_path / "tiny.tebundle", sign_key=load_private_key(tmp_path / "op.key"))
    venv = Path(sys.executable).parent.parent  # this checkout is installed there (editable)
    env = {**os.environ, "VENV": str(venv), "BUNDLE": str(bundle), "PUBKEY": str(tmp_path / "op.pub")}
    proc = subprocess.run(
        ["bash", str(ROOT / "examples/demo.sh"), "enroll"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"enrolled {LABEL} from 6 photos; in force now" in proc.stdout, out[-4000:]
    after = proc.stdout.split("the labels from now on", 1)[1].splitlines()
    recognised = [line for line in after if "Hardware > Paint > Blue-Can" in line and "accepted" in line]
    assert recognised, out[-4000:]
