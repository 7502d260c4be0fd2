"""Fixtures of the evaluation tests."""

import functools

import pytest
from torch.utils.data import TensorDataset

from dydit_lab.data import mnist_split
from dydit_lab.evaluation import metrics, report


@functools.cache
def _tensors(split: str):
    return mnist_split(split).tensors


@functools.cache
def _split(split: str, size: int | None) -> TensorDataset:
    x, y = _tensors(split)
    return TensorDataset(x[:size], y[:size])


@pytest.fixture
def cached_mnist(monkeypatch):
    """The judges (and re-scored real-val rows) read MNIST once per session: parsing it takes
    seconds on a busy CPU."""
    for module in (metrics, report):
        monkeypatch.setattr(module, "mnist_split", lambda split: _split(split, None))


@pytest.fixture
def val_digits():
    """The held-out real digits and their labels (read once per session)."""
    return _tensors("val")


@pytest.fixture
def small_mnist(monkeypatch):
    """train_classifier on 256 training and 100 held-out digits: an epoch in well under a second."""
    monkeypatch.setattr(metrics, "mnist_split", lambda split: _split(split, 256 if split == "train" else 100))
