"""The benchmark tests' models and inputs, shared by test_workload.py, test_router_setting.py,
test_setup.py, test_run.py and test_profile.py."""

import pytest
import torch

from dydit_lab.bench.workload import build_models, make_inputs

from tests.helpers import BENCH_ARCH as ARCH, BENCH_BATCH as BATCH, BENCH_STEPS as STEPS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: one thread avoids waiting on a busy second core at every op.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return build_models(ARCH, input_size=32, device="cpu", seed=0)


@pytest.fixture(scope="module")
def inputs(models):
    return make_inputs(models[0], BATCH, STEPS, seed=0)
