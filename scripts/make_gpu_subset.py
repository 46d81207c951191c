"""A small real CIFAR-10 subset for the GPU check: `python scripts/make_gpu_subset.py [DATA_DIR] [OUT_DIR]`.

Writes OUT_DIR (default gpu_data/) train.npz and test.npz holding the first 7,000 training and 2,000 test
images of DATA_DIR's arrays (default data/, written by data_prep/write_beton.py): ~28 MB, which fits in the
working tree that travels to a lent GPU machine (64 MiB). gpu_data/ is git-ignored; pass it to the device
tool as a carried path.
"""

import sys
from pathlib import Path

from fastcifar.data import read_arrays, write_arrays

TRAIN, TEST = 7_000, 2_000


def main(argv: list[str]) -> int:
    data_dir = Path(argv[0]) if argv else Path("data")
    out = Path(argv[1]) if len(argv) > 1 else Path("gpu_data")
    out.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", TRAIN), ("test", TEST)):
        images, labels = read_arrays(data_dir / f"{split}.npz")
        write_arrays(images[:count], labels[:count], out / f"{split}.npz")
        print(f"wrote {out / f'{split}.npz'}: {count:,} images, labels {sorted(set(labels[:count].tolist()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
