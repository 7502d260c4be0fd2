"""The checkpoints committed in data/ load as the model their name promises, stay small, and
every one of them has its metrics in data/results.csv (a swapped checkpoint without a re-run
evaluation would leave the README quoting numbers of a file that no longer exists)."""

import pytest
import torch

import dydit_lab
from dydit_lab.evaluation.results import read_results
from dydit_lab.evaluation.strategies import RESULTS
from dydit_lab.models.dydit import DyDiT
from dydit_lab.models.flexidit import FlexiDiT
from dydit_lab.paths import CHECKPOINT_DIR

CHECKPOINTS = sorted(CHECKPOINT_DIR.glob("*.pt"))
PARENTS = sorted((CHECKPOINT_DIR.parent / "parents").glob("*.pt"))  # sweep parents (scored as sweep rows)
EXPECTED_CLASS = {"DiT": dydit_lab.DiT, "DyDiT": DyDiT, "FlexiDiT": FlexiDiT}


def test_the_lab_checkpoints_are_committed():
    names = {path.name for path in CHECKPOINTS}
    assert {"DiT-lab-S.pt", "DiT-lab-L.pt", "DyDiT-lab-L-0.7.pt", "DyDiT-lab-L-0.5.pt"} <= names


@pytest.mark.parametrize("path", CHECKPOINTS + PARENTS, ids=lambda p: p.name)
def test_committed_checkpoint_loads_as_its_family_and_is_small(path):
    assert path.stat().st_size < 10 * 2**20
    model = dydit_lab.load_model(path)
    family = path.name.split("-lab-")[0]
    assert type(model) is EXPECTED_CLASS[family]
    x = torch.randn(2, 1, 32, 32)
    out = model.eval()(x, torch.tensor([10, 900]), torch.tensor([3, 7]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_every_committed_checkpoint_has_results():
    scored = {row["checkpoint"] for row in read_results(RESULTS)}
    for path in CHECKPOINTS:
        assert f"data/checkpoints/{path.name}" in scored, path.name
