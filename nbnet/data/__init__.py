"""Data sets shipped with nbnet.

``digits.npz``: the 8x8 handwritten digits (UCI optdigits, 1797 samples, CC BY 4.0;
E. Alpaydin and C. Kaynak, https://archive.ics.uci.edu/dataset/80), extracted once from
scikit-learn's bundled copy by ``tools/make_digits.py``; uint8 pixels 0..16 and labels.
"""
import os

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))


def load_digits():
    """``(X, y)``: X (1797, 64) uint8 pixel intensities 0..16, y (1797,) uint8 labels 0..9."""
    with np.load(os.path.join(_HERE, "digits.npz"), allow_pickle=False) as f:
        return f["data"], f["target"]
