"""Where the lab's files live, all relative to the repository root (never to the working
directory), so commands, notebooks and tests find the same files wherever they are run from."""

from __future__ import annotations

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"
CHECKPOINT_DIR = DATA_DIR / "checkpoints"
RESULTS_CSV = DATA_DIR / "results.csv"
BENCH_DIR = DATA_DIR / "bench"
DEFAULT_CLASSIFIER = DATA_DIR / "lenet_mnist.pt"
SECOND_CLASSIFIER = DATA_DIR / "lenet_mnist_seed1.pt"  # the same LeNet trained with seed 1: checks the metric
FIGURES_DIR = REPO_ROOT / "figures"
CHECKPOINT_NAME = "checkpoint.pt"  # the resumable checkpoint inside a run folder


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; asking for CUDA without one is an error."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return device


def display_path(path: str | Path) -> str:
    """``path`` relative to the repository root when inside it (how results.csv names files)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
