"""Extract the handwritten digits data set shipped as nbnet/data/digits.npz.

Source: the 8x8 "Optical Recognition of Handwritten Digits" data set (UCI Machine
Learning Repository, optdigits test set, 1797 samples; E. Alpaydin and C. Kaynak, 1998),
licensed CC BY 4.0 (https://archive.ics.uci.edu/dataset/80). This script takes it from
the copy bundled with scikit-learn (``sklearn.datasets.load_digits``), so that nbnet
itself never needs scikit-learn at run time.

Stored compressed: ``data`` (1797, 64) uint8 pixel intensities 0..16, row-major 8x8
images; ``target`` (1797,) uint8 labels 0..9.

Run once from the repository root:  python tools/make_digits.py
"""
import os

import numpy as np
from sklearn.datasets import load_digits

OUT = os.path.join(os.path.dirname(__file__), os.pardir, "nbnet", "data", "digits.npz")


def main():
    digits = load_digits()
    data = digits.data.astype(np.uint8)
    target = digits.target.astype(np.uint8)
    assert np.array_equal(data, digits.data) and np.array_equal(target, digits.target)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, data=data, target=target)
    print(f"wrote {os.path.normpath(OUT)}: data {data.shape}, target {target.shape}")


if __name__ == "__main__":
    main()
