"""The speed benchmark's setup (dydit_lab.bench.setup): models, inputs and routers prepared
together, arguments checked. No timing asserts."""

import pytest
import torch

from dydit_lab.bench import setup as bench
from tests.helpers import BENCH_ARCH, BENCH_BATCH as BATCH, BENCH_STEPS as STEPS


def test_prepare_bench_sets_the_routers_and_checks_its_arguments(models):
    prepared = bench.prepare_bench(BENCH_ARCH, target_ratio=0.5, batch_size=BATCH, steps=STEPS, models=models)
    assert abs(prepared.setting.flops_ratio - 0.5) <= 0.02
    assert prepared.inputs.batch_size == BATCH and len(prepared.inputs.timesteps) == STEPS
    assert all(not block._slice_cache for block in prepared.dydit.blocks)  # timing starts cold
    for bad, match in (({"threads": 0}, "threads"), ({"batch_size": 0}, "batch_size"),
                       ({"target_ratio": 1.5}, "target")):
        with pytest.raises(ValueError, match=match):
            bench.prepare_bench(BENCH_ARCH, **{"steps": STEPS, **bad}, models=models)


def test_describe_device_names_the_cpu_model(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\nflags\t: avx\n")
    assert bench.describe_device(torch.device("cpu"), cpuinfo=info) == "Intel(R) Xeon(R) Gold 6338"
    fallback = bench.describe_device(torch.device("cpu"), cpuinfo=tmp_path / "missing")
    assert isinstance(fallback, str) and fallback  # the platform's processor or architecture
