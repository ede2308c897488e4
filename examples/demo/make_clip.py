"""Make the demo clip: Grocery Store val photos passing under a 'camera' as on a conveyor belt, with stretches
of empty belt between them, and its ground truth.

    python examples/demo/make_clip.py /path/to/GroceryStoreDataset/dataset examples/demo/belt.mp4

The belt starts empty for LEAD_IN frames (time to learn it: `taxonedge empty-belt`); each product then
enters from the left, pauses under the camera and leaves to the right, followed by 8-10 frames of empty
belt. The belt has a fixed texture, every frame a little sensor noise and a slow brightness flicker, so that
no two empty frames are the same. Beside the clip, `<clip>.json` says per frame which product is in view and
the share of the frame it covers (0: empty belt); bench/bench_no_item.py scores no-item detection on it.

The photos are from the Grocery Store Dataset (Klasson et al., WACV 2019), MIT licence: see LICENSE.grocery
beside this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

# One photo each of products across the three top-level categories (val split paths).
PRODUCTS = [
    "val/Fruit/Apple/Granny-Smith/Granny-Smith_001.jpg",
    "val/Fruit/Banana/Banana_001.jpg",
    "val/Vegetables/Pepper/Red-Bell-Pepper/Red-Bell-Pepper_001.jpg",
    "val/Packages/Milk/Arla-Standard-Milk/Arla-Standard-Milk_001.jpg",
    "val/Fruit/Lemon/Lemon_001.jpg",
    "val/Vegetables/Carrots/Carrots_001.jpg",
    "val/Packages/Juice/Bravo-Apple-Juice/Bravo-Apple-Juice_001.jpg",
    "val/Fruit/Kiwi/Kiwi_001.jpg",
    "val/Vegetables/Cucumber/Cucumber_001.jpg",
    "val/Packages/Oatghurt/Oatly-Natural-Oatghurt/Oatly-Natural-Oatghurt_001.jpg",
]
SIZE, FPS, SLIDE, HOLD = 320, 10, 6, 12  # frames sliding in/out and holding still
LEAD_IN = 30  # frames of empty belt before the first product
GAPS = (8, 10, 9)  # frames of empty belt after each product, in turn
NOISE_SIGMA = 1.5  # sensor noise, grey levels
FLICKER = 0.04  # brightness varies by up to this share, slowly (period FLICKER_S)
FLICKER_S = 3.7


def belt_texture(rng: np.random.Generator) -> np.ndarray:
    """A grey rubber belt: fine lengthwise grain and a few faint seams, fixed for the whole clip."""
    grain = rng.normal(0, 4, (SIZE, 1, 1)).repeat(SIZE, axis=1).repeat(3, axis=2)
    blotches = cv2.GaussianBlur(rng.normal(0, 6, (SIZE, SIZE)).astype(np.float32), (0, 0), 6)[..., None]
    belt = np.full((SIZE, SIZE, 3), 60.0) + grain + blotches
    belt[:, ::80] -= 8  # seams across the belt
    return belt


def photo_of(dataset: Path, rel: str) -> np.ndarray | None:
    path = dataset / rel
    if not path.exists():  # the val split lacks some classes; take the first photo of the folder instead
        candidates = sorted((dataset / rel).parent.glob("*.jpg"))
        if not candidates:
            print(f"skip {rel}: not in the dataset", file=sys.stderr)
            return None
        path = candidates[0]
    return cv2.resize(cv2.imread(str(path)), (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def scene(belt: np.ndarray, photo: np.ndarray | None, dx: float) -> np.ndarray:
    """The belt with the photo shifted by dx pixels (None: the empty belt), before camera effects."""
    frame = belt.copy()
    if photo is None:
        return frame
    shift = np.float32([[1, 0, dx], [0, 1, 0]])
    moved = cv2.warpAffine(photo, shift, (SIZE, SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = cv2.warpAffine(np.ones((SIZE, SIZE), np.float32), shift, (SIZE, SIZE), borderValue=0)[..., None]
    return frame * (1 - mask) + moved * mask


def camera(image: np.ndarray, index: int, rng: np.random.Generator) -> np.ndarray:
    """Flicker and sensor noise, as every frame of a real camera has."""
    gain = 1 + FLICKER * np.sin(2 * np.pi * index / (FLICKER_S * FPS))
    noisy = image * gain + rng.normal(0, NOISE_SIGMA, image.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def timeline(photos: list[tuple[str, np.ndarray]]) -> list[tuple[str | None, np.ndarray | None, float]]:
    """(product label or None, its photo, dx) per frame: lead-in, then each product and its gap."""
    frames: list[tuple[str | None, np.ndarray | None, float]] = [(None, None, 0.0)] * LEAD_IN
    offsets = list(np.linspace(-SIZE, 0, SLIDE)) + [0.0] * HOLD + list(np.linspace(0, SIZE, SLIDE))
    for k, (label, photo) in enumerate(photos):
        for dx in offsets:
            frames.append((label, photo, float(dx)) if abs(dx) < SIZE else (None, None, 0.0))
        frames += [(None, None, 0.0)] * GAPS[k % len(GAPS)]
    return frames


def main(dataset: Path, out: Path) -> None:
    rng = np.random.default_rng(0)
    belt = belt_texture(rng)
    photos = []
    for rel in PRODUCTS:
        photo = photo_of(dataset, rel)
        if photo is not None:
            photos.append(("/".join(Path(rel).parent.parts[1:]), photo))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    truth = {"fps": FPS, "lead_in": LEAD_IN, "product": [], "coverage": []}
    for index, (label, photo, dx) in enumerate(timeline(photos)):
        writer.write(camera(scene(belt, photo, dx), index, rng))
        truth["product"].append(label)
        truth["coverage"].append(round((SIZE - abs(dx)) / SIZE, 3) if label else 0.0)
    writer.release()
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps(truth, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB, {len(truth['coverage'])} frames) and {sidecar}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
