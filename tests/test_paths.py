"""Where the lab's files live: relative to the repository root, whatever the working directory."""

import pytest
import torch

from dydit_lab import paths
from tests.helpers import ROOT


def test_paths_hang_off_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory plays no part
    assert paths.REPO_ROOT == ROOT
    assert paths.DATA_DIR == ROOT / "data" and paths.CHECKPOINT_DIR == ROOT / "data" / "checkpoints"
    assert paths.RESULTS_CSV == ROOT / "data" / "results.csv" and paths.BENCH_DIR == ROOT / "data" / "bench"
    assert paths.DEFAULT_CLASSIFIER.exists() and paths.CHECKPOINT_NAME == "checkpoint.pt"
    assert paths.display_path(ROOT / "data" / "checkpoints" / "x.pt") == "data/checkpoints/x.pt"
    assert paths.display_path(tmp_path / "y.pt") == str(tmp_path / "y.pt")


def test_resolve_device():
    assert paths.resolve_device("cpu") == torch.device("cpu")
    assert paths.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        paths.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            paths.resolve_device("cuda")
