"""Make the demo clip: Grocery Store val photos sliding under a 'camera' as on a conveyor belt.

    python examples/demo/make_clip.py /path/to/GroceryStoreDataset/dataset examples/demo/belt.mp4

The photos are from the Grocery Store Dataset (Klasson et al., WACV 2019), MIT licence: see LICENSE.grocery
beside this file. Each product enters from the left, pauses under the camera and leaves to the right.
"""

from __future__ import annotations

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
SIZE, FPS, SLIDE, HOLD = 320, 10, 6, 14  # frames sliding in/out and holding still


def main(dataset: Path, out: Path) -> None:
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIZE, SIZE))
    belt = np.full((SIZE, SIZE, 3), 60, np.uint8)
    for rel in PRODUCTS:
        path = dataset / rel
        if not path.exists():  # the val split lacks some classes; take the first photo of the folder instead
            candidates = sorted((dataset / rel).parent.glob("*.jpg"))
            if not candidates:
                print(f"skip {rel}: not in the dataset", file=sys.stderr)
                continue
            path = candidates[0]
        photo = cv2.resize(cv2.imread(str(path)), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        offsets = list(np.linspace(-SIZE, 0, SLIDE)) + [0] * HOLD + list(np.linspace(0, SIZE, SLIDE))
        for dx in offsets:
            frame = belt.copy()
            shift = np.float32([[1, 0, dx], [0, 1, 0]])
            moved = cv2.warpAffine(
                photo, shift, (SIZE, SIZE), borderMode=cv2.BORDER_CONSTANT, borderValue=(60, 60, 60)
            )
            frame[:] = moved
            writer.write(frame)
    writer.release()
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
