"""The demo's tasks: scikit-learn's bundled digits seen through input transforms.

Each task is the same digits under a distinct transformation (mirrored,
rotated, transposed, ...), so fine-tunes on different tasks pull the weights
apart and how their task vectors are merged visibly matters. The data ships
with scikit-learn, so the demo needs no network; splits are fixed by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

SPLITS = ("train", "val", "test")


def _hflip(x: np.ndarray) -> np.ndarray:
    return x[:, :, ::-1]


def _vflip(x: np.ndarray) -> np.ndarray:
    return x[:, ::-1, :]


def _rot90(x: np.ndarray) -> np.ndarray:
    return np.rot90(x, 1, axes=(1, 2))


def _transpose(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 1)


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _invert(x: np.ndarray) -> np.ndarray:
    return 1.0 - x


# name -> (transform on (n, 8, 8) images in [0, 1], description)
TRANSFORMS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], str]] = {
    "original": (_identity, "the digits as they are (the base's pre-training task)"),
    "hflip": (_hflip, "digits mirrored left-right"),
    "vflip": (_vflip, "digits mirrored top-bottom"),
    "rot90": (_rot90, "digits rotated 90 degrees counter-clockwise"),
    "transpose": (_transpose, "digits transposed (mirrored about the main diagonal)"),
    "invert": (_invert, "digits with inverted intensities (1 - x)"),
}


@dataclass(frozen=True)
class DigitsData:
    images: np.ndarray  # (n, 8, 8) float32 in [0, 1]
    labels: np.ndarray  # (n,) int64
    split: dict[str, np.ndarray]  # split name -> indices


def load_data(seed: int, fractions: tuple[float, float]) -> DigitsData:
    """The digits, split train/val/test by a seeded permutation (`fractions`: train, val)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    n = len(labels)
    perm = np.random.RandomState(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    split = {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train:n_train + n_val]),
        "test": np.sort(perm[n_train + n_val:]),
    }
    return DigitsData(images, labels, split)


def task_tensors(data: DigitsData, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (n, 64) fp32, labels (n,)) of one task on one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    idx = data.split[split]
    fn = TRANSFORMS[task][0]
    x = np.ascontiguousarray(fn(data.images[idx]), dtype=np.float32).reshape(len(idx), 64)
    return torch.from_numpy(x), torch.from_numpy(data.labels[idx].copy())
