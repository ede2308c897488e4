"""List files without some classes, for the leave-classes-out benchmarks (bench_trust, bench_enroll).

Writes OUT/train.txt (and OUT/val.txt) from a dataset's list files without the given class ids, with
absolute image paths and the dataset's classes.csv copied beside them, so that `taxonedge train --data
OUT/train.txt` reads them as it reads the dataset's own lists. The default ids are the 10 Grocery classes
the benchmarks leave out, spread over Fruit, Vegetables and Packages (8 of them have val images, 40 in all).

    .venv/bin/python bench/leave_classes_out.py --dataset ../shared/data/grocery/dataset --out lo
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# Pink-Lady, Lime, Nectarine, Conference, Tropicana-Apple-Juice, Arla-Standard-Milk,
# Alpro-Vanilla-Soyghurt, Cucumber, Yellow-Bell-Pepper, Sweet-Potato.
LEFT_OUT = (2, 9, 15, 21, 34, 41, 50, 63, 72, 75)


def write_without(list_file: Path, out: Path, left_out: set[int]) -> tuple[int, int]:
    """Copy `list_file` to `out` without the lines of `left_out`; (lines kept, lines left out)."""
    kept, dropped = [], 0
    for line in list_file.read_text(encoding="utf-8").splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 2 or not fields[1].isdigit():
            continue
        if int(fields[1]) in left_out:
            dropped += 1
            continue
        kept.append(", ".join([str((list_file.parent / fields[0]).resolve()), *fields[1:]]))
    out.write_text("\n".join(kept) + "\n", encoding="utf-8")
    return len(kept), dropped


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, type=Path, help="folder with train.txt and classes.csv")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--ids", type=int, nargs="+", default=list(LEFT_OUT), help="class ids to leave out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.dataset / "classes.csv", args.out / "classes.csv")
    for split in ("train", "val"):
        source = args.dataset / f"{split}.txt"
        if source.exists():
            kept, dropped = write_without(source, args.out / f"{split}.txt", set(args.ids))
            print(f"{args.out / f'{split}.txt'}: {kept} images, {dropped} left out")


if __name__ == "__main__":
    main()
