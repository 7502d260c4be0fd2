"""Shared by the plot tests: every figure a test draws is closed after it (no pile-up of open figures)."""

import matplotlib.pyplot as plt
import pytest


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")
