"""The demo's tasks and data: scikit-learn's bundled digits, six views of them, one split.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn (1797
greyscale 8x8 images of the digits 0-9). Each task is a view of the images (a transform)
and a label function of the digit, so that the tasks want different things from the shared
backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Bumped whenever training changes in a way the settings do not capture (invalidates caches).
DEMO_VERSION = 1

#: Image transforms (8x8 images, batch first).
VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "upright": lambda x: x,
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "mirror": lambda x: x[:, :, ::-1],
    "negative": lambda x: 1.0 - x,
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "transpose": lambda x: np.transpose(x, (0, 2, 1)),
}

#: Label functions of the digit 0-9.
LABELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "digit": lambda y: y,
    "parity": lambda y: y % 2,
    "mod3": lambda y: y % 3,
}


@dataclass(frozen=True)
class TaskSpec:
    """One task: a view of the images and a label function."""

    name: str
    view: str
    labels: str
    num_classes: int
    description: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("digits", "upright", "digit", 10, "digit 0-9, upright"),
        TaskSpec("rot90", "rot90", "digit", 10, "digit 0-9, rotated 90 degrees"),
        TaskSpec("mirror", "mirror", "digit", 10, "digit 0-9, mirrored left-right"),
        TaskSpec("negative", "negative", "digit", 10, "digit 0-9, intensities inverted"),
        TaskSpec("parity", "rot180", "parity", 2, "even or odd, upside down"),
        TaskSpec("mod3", "transpose", "mod3", 3, "digit mod 3, transposed"),
    )
}
QUICK_TASKS: tuple[str, ...] = ("digits", "rot90", "negative", "parity")


@dataclass(frozen=True)
class Settings:
    """Everything that determines the split and the trained checkpoints (hashed into the cache key)."""

    tasks: tuple[str, ...] = tuple(TASKS)
    seed: int = 0
    hidden: tuple[int, ...] = (512, 512)
    features: int = 256
    n_pretrain: int = 500
    n_train: int = 700
    n_val: int = 250
    pretrain_epochs: int = 20
    pretrain_batch: int = 128
    pretrain_lr: float = 1e-3
    pretrain_noise: float = 0.2
    shots: int = 5
    head_scale: float = 5.0
    finetune_epochs: int = 10
    finetune_batch: int = 32
    finetune_lr: float = 1e-2
    finetune_momentum: float = 0.9

    def key(self) -> str:
        """A short hash of these settings and :data:`DEMO_VERSION`.

        Returns
        -------
        str
            16 hex digits.
        """
        blob = json.dumps({"version": DEMO_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


FULL_SETTINGS = Settings()
QUICK_SETTINGS = Settings(tasks=QUICK_TASKS, pretrain_epochs=10, finetune_epochs=6)


@dataclass
class Data:
    """The digits images in [0, 1] and the index sets of the split."""

    images: np.ndarray  # [N, 8, 8] float32
    digits: np.ndarray  # [N] int64
    pretrain: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def task(self, name: str, split: str) -> tuple[Tensor, Tensor]:
        """The inputs and labels of one task on one split.

        Parameters
        ----------
        name : str
            A key of :data:`TASKS`.
        split : {"pretrain", "train", "val", "test"}

        Returns
        -------
        tuple of Tensor
            ``(inputs [n, 64] float32, labels [n] int64)``.
        """
        spec = TASKS[name]
        idx = getattr(self, split)
        x = np.ascontiguousarray(VIEWS[spec.view](self.images[idx]), dtype=np.float32).reshape(len(idx), 64)
        y = LABELS[spec.labels](self.digits[idx]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def view(self, name: str, split: str) -> Tensor:
        """The images of ``split`` in view ``name`` (a key of :data:`VIEWS`), ``[n, 64]`` float32."""
        idx = getattr(self, split)
        return torch.from_numpy(np.ascontiguousarray(VIEWS[name](self.images[idx])).reshape(-1, 64))


def load_data(settings: Settings) -> Data:
    """Load scikit-learn's bundled digits and split them with ``settings.seed``.

    Parameters
    ----------
    settings : Settings
        The split sizes and the seed of the permutation.

    Returns
    -------
    Data

    Raises
    ------
    RuntimeError
        If scikit-learn is not installed.
    ValueError
        If the split sizes leave no test images.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("mtmerge demo needs scikit-learn (its bundled digits): pip install scikit-learn") from exc
    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    perm = np.random.default_rng(settings.seed).permutation(len(images))
    a = settings.n_pretrain
    b = a + settings.n_train
    c = b + settings.n_val
    if c >= len(images):
        raise ValueError(f"split sizes {a}+{settings.n_train}+{settings.n_val} leave no test images")
    return Data(images, bunch.target.astype(np.int64), perm[:a], perm[a:b], perm[b:c], perm[c:])
