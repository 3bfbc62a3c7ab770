"""Make the bundled MNIST subset reproducibly from the full IDX files.

    python scripts/make_mnist_subset.py ../shared/data/mnist

writes pipelines/resources/mnist_subset.npz: 1,000 training and 200 test images per class, drawn
without replacement with fixed seeds, with their ids in the full files (see pipelines/data.py).
"""

import sys
from pathlib import Path

import numpy as np

from pipelines.data import load_mnist_dir, stratified_subset

TRAIN_PER_CLASS, TEST_PER_CLASS, SEED = 1000, 200, 20260101


def main(data_dir: str) -> None:
    full = load_mnist_dir(data_dir)
    tr = stratified_subset(full.train_labels, TRAIN_PER_CLASS, SEED)
    te = stratified_subset(full.test_labels, TEST_PER_CLASS, SEED + 1)
    out = Path(__file__).resolve().parents[1] / "pipelines" / "resources" / "mnist_subset.npz"
    np.savez_compressed(
        out,
        train_images=full.train_images[tr],
        train_labels=full.train_labels[tr].astype(np.uint8),
        train_ids=full.train_ids[tr].astype(np.int32),
        test_images=full.test_images[te],
        test_labels=full.test_labels[te].astype(np.uint8),
        test_ids=full.test_ids[te].astype(np.int32),
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {len(tr)} train + {len(te)} test examples")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mnist")
