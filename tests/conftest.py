import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each,
    os.environ["OMP_NUM_THREADS"] = "1"  # here and in the notebook kernels and CLI processes it starts
    torch.set_num_threads(1)

from tests.helpers import FIXTURES, randomised, random_dydit  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# Reference outputs of the official implementations (tests/fixtures/README.md)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def official_dit():
    return torch.load(FIXTURES / "official_dit_tiny.pt", weights_only=True)


@pytest.fixture(scope="session")
def official_dydit():
    return torch.load(FIXTURES / "official_dydit_tiny.pt", weights_only=True)


# ---------------------------------------------------------------------------
# Tiny models and checkpoints
# ---------------------------------------------------------------------------


@pytest.fixture
def tiny():
    """DiT-lab-T (patch 8 on 32x32: FlexiDiT's coarse patch is 16), trainable weights ~N(0, 0.05)."""
    import dydit_lab

    return randomised(dydit_lab.create_model("DiT-lab-T"))


@pytest.fixture
def small_sigma():
    """learn_sigma (2C outputs) and 4 channels, patch 2 on 8x8 (coarse 4)."""
    import dydit_lab

    return randomised(dydit_lab.create_model("DiT-S/2", input_size=8, num_classes=10))


@pytest.fixture
def parent(tmp_path, tiny):
    """A resumable training checkpoint of ``tiny`` at step 10: what a fine-tune starts from."""
    from dydit_lab.checkpoints import save_training_checkpoint
    from dydit_lab.training.pretrain import TrainConfig

    path = tmp_path / "parent.pt"
    save_training_checkpoint(path, tiny, tiny, torch.optim.AdamW(tiny.parameters()),
                             TrainConfig(arch="DiT-lab-T"), 10)
    return path


@pytest.fixture(scope="session")
def exported_parent(tmp_path_factory):
    """``create_model("DiT-lab-T")`` (randomised) in the export format ``{"ema", "args"}``."""
    import dydit_lab

    torch.manual_seed(0)
    model = randomised(dydit_lab.create_model("DiT-lab-T"))
    path = tmp_path_factory.mktemp("exported") / "DiT-lab-T.pt"
    torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T", "step": 10}}, path)
    return path


@pytest.fixture(scope="session")
def strategy_checkpoints(tmp_path_factory):
    """Tiny stand-ins for every checkpoint the strategies name, in our export layout."""
    import dydit_lab
    from dydit_lab.models import DyDiT, FlexiDiT

    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    dit = dydit_lab.create_model("DiT-lab-T")
    models = {"DiT-lab-L.pt": dit, "DiT-lab-S.pt": dit, "FlexiDiT-lab-L-adapters.pt": FlexiDiT.from_dit(dit, lora_rank=2)}
    for lam in ("0.7", "0.5"):
        models[f"DyDiT-lab-L-{lam}.pt"] = DyDiT.from_dit(dit)
    for name, model in models.items():
        torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}, "step": 7}, folder / name)
    return folder


@pytest.fixture(scope="session")
def evaluator():
    """The LeNet judge (data/lenet_mnist.pt) with the MNIST train split as reference."""
    from dydit_lab.evaluation.metrics import SampleEvaluator

    return SampleEvaluator.from_default()


@pytest.fixture(scope="session")
def traces():
    """Two recorded 5-step sampling runs of random DyDiTs with mixed routing."""
    from dydit_lab.analysis.routing import trace_sampling

    return {f"model {s}": trace_sampling(random_dydit(s), [1, 7, 3], steps=5, progress=False, name=f"model {s}")
            for s in (0, 1)}
