"""Make the enrollment demo's input: photos of a product the demo model was not trained on, and a short belt
clip in which it passes the camera after a few of the Grocery products of belt.mp4.

    python examples/demo/enroll_clip.py OUT [PHOTOS]

Without PHOTOS the product is drawn here (a blue paint can with an orange band: nothing like the Grocery
Store Dataset's fruit, vegetables and packages), so the demo needs no download and carries no licence
beyond this project's. Its enrollment photos show it on the belt in other poses than the clip does. With
PHOTOS (a folder of your JPEG/PNG photos of one product), all but the last are the enrollment photos and
the last one passes on the belt, as make_clip.py passes the Grocery photos: it is recognised from photos
it was not enrolled with.

Writes OUT/photos/*.jpg and OUT/belt-new.mp4 (the first GROCERY_FRAMES frames of belt.mp4, then the new
product passing PASSES times).
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
from make_clip import FPS, GAPS, HOLD, SIZE, SLIDE, belt_texture, camera, scene

HERE = Path(__file__).resolve().parent
GROCERY_FRAMES = 100  # the lead-in and about two Grocery products of belt.mp4
PASSES = 3
ENROLL_PHOTOS = 6
SPRITE = 200  # the drawn product's box, pixels


def paint_can(angle: float, scale: float, gain: float) -> np.ndarray:
    """The drawn product as BGRA (alpha 0 around it), turned by `angle` degrees and scaled."""
    can = np.zeros((SPRITE, SPRITE, 4), np.uint8)
    cv2.rectangle(can, (50, 30), (150, 170), (150, 60, 20, 255), -1)  # blue body
    cv2.rectangle(can, (50, 80), (150, 120), (20, 140, 250, 255), -1)  # orange band
    cv2.ellipse(can, (100, 30), (50, 12), 0, 0, 360, (200, 200, 205, 255), -1)  # the lid
    cv2.putText(can, "PAINT", (58, 110), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (250, 250, 250, 255), 2)
    lit = can.astype(np.float32)
    lit[..., :3] *= gain
    turn = cv2.getRotationMatrix2D((SPRITE / 2, SPRITE / 2), angle, scale)
    return cv2.warpAffine(lit, turn, (SPRITE, SPRITE), flags=cv2.INTER_LINEAR)


def place(background: np.ndarray, sprite: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """`sprite` (BGRA) laid on `background` with its centre at (cx, cy); what falls outside is cut off."""
    shift = np.float32([[1, 0, cx - SPRITE / 2], [0, 1, cy - SPRITE / 2]])
    moved = cv2.warpAffine(sprite, shift, (SIZE, SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    alpha = moved[..., 3:] / 255.0
    return background * (1 - alpha) + moved[..., :3] * alpha


def pose(rng: np.random.Generator) -> tuple[float, float, float]:
    """A random angle, scale and brightness: no two photos or passes alike."""
    return float(rng.uniform(-30, 30)), float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.1))


def drawn_photos(belt: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    return [
        camera(place(belt, paint_can(*pose(rng)), SIZE / 2 + rng.uniform(-20, 20), SIZE / 2), i, rng)
        for i in range(ENROLL_PHOTOS)
    ]


def offsets() -> list[float]:
    """dx per frame of one pass: slide in, hold, slide out (as make_clip.py)."""
    return list(np.linspace(-SIZE, 0, SLIDE)) + [0.0] * HOLD + list(np.linspace(0, SIZE, SLIDE))


def drawn_pass(belt: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    sprite = paint_can(*pose(rng))
    return [place(belt, sprite, SIZE / 2 + dx, SIZE / 2) for dx in offsets()]


def photo_pass(belt: np.ndarray, photo: np.ndarray) -> list[np.ndarray]:
    return [scene(belt, photo, dx) for dx in offsets()]


def grocery_frames(count: int) -> list[np.ndarray]:
    clip = cv2.VideoCapture(str(HERE / "belt.mp4"))
    frames = []
    while len(frames) < count:
        ok, frame = clip.read()
        if not ok:
            break
        frames.append(frame)
    clip.release()
    return frames


def read_photos(folder: Path) -> list[np.ndarray]:
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = [cv2.imread(str(p)) for p in paths]
    photos = [cv2.resize(p, (SIZE, SIZE), interpolation=cv2.INTER_AREA) for p in photos if p is not None]
    if not photos:
        sys.exit(f"{folder}: no readable JPEG or PNG photos")
    return photos


def main(out: Path, photo_dir: Path | None) -> None:
    rng = np.random.default_rng(7)
    belt = belt_texture(np.random.default_rng(0))  # make_clip.py's belt, the same seed: the same belt
    if photo_dir is None:
        enroll = drawn_photos(belt, rng)
        passes = [drawn_pass(belt, rng) for _ in range(PASSES)]
    else:
        photos = read_photos(photo_dir)
        enroll = photos[:-1] or photos  # one photo only: it is both
        passes = [photo_pass(belt, photos[-1]) for _ in range(PASSES)]
    (out / "photos").mkdir(parents=True, exist_ok=True)
    for i, photo in enumerate(enroll):
        cv2.imwrite(str(out / "photos" / f"new-{i:02d}.jpg"), np.clip(photo, 0, 255).astype(np.uint8))
    writer = cv2.VideoWriter(str(out / "belt-new.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    for frame in grocery_frames(GROCERY_FRAMES):
        writer.write(frame)
    index = GROCERY_FRAMES
    for k, frames in enumerate(passes):
        for image in frames + [belt] * GAPS[k % len(GAPS)]:
            writer.write(camera(image, index, rng))
            index += 1
    writer.release()
    print(f"wrote {len(enroll)} photos to {out / 'photos'} and {out / 'belt-new.mp4'} ({index} frames)")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python examples/demo/enroll_clip.py OUT [PHOTOS]")
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None)
