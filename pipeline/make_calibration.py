"""Write calibration_data/fashion_mnist_train_500.npz: 50 images per class from the TRAIN split (seeded).

python -m pipeline.make_calibration
"""

from __future__ import annotations

import sys

import numpy as np

from pipeline.data.fashion_mnist import load_fashion_mnist
from pipeline.data.sources import FMNIST_CALIBRATION


def main() -> int:
    train = load_fashion_mnist("train")
    rng = np.random.default_rng(2017)
    picks = np.concatenate([rng.choice(np.flatnonzero(train.labels == c), 50, replace=False) for c in range(10)])
    picks = rng.permutation(picks)
    FMNIST_CALIBRATION.parent.mkdir(parents=True, exist_ok=True)
    tmp = FMNIST_CALIBRATION.with_suffix(".tmp.npz")
    np.savez_compressed(
        tmp,
        images=train.images[picks, :, :, 0],
        labels=train.labels[picks],
        train_indices=picks,
        class_names=np.array(train.class_names),
    )
    tmp.replace(FMNIST_CALIBRATION)
    print(f"wrote {FMNIST_CALIBRATION} ({len(picks)} images, {FMNIST_CALIBRATION.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
