"""One benchmark's setup: the arguments checked, the models and inputs made (:mod:`.workload`) and
the routers set to a FLOPs target (:mod:`.router_setting`), ready to be timed (:mod:`.run`) or
profiled (:mod:`.profile`)."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.configs import get_config
from ..models.dit import DiT
from ..models.dydit import DyDiT
from .router_setting import DEFAULT_KEEP_RATE, DEFAULT_WIDTH_SLOPE, RouterSetting, check_target, set_routers
from .workload import BenchInputs, build_models, make_inputs


# ---------------------------------------------------------------------------
# Prepared benchmark
# ---------------------------------------------------------------------------


@dataclass
class PreparedBench:
    """The models, inputs and router setting one benchmark (or profile) runs on."""
    dit: DiT
    dydit: DyDiT
    inputs: BenchInputs
    setting: RouterSetting
    device: torch.device


def describe_device(device: torch.device, cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The accelerator's name (CUDA) or the CPU model (Linux's ``model name``, else the platform's
    processor or architecture): what tells two machines' timings apart in one folder of results."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count (None: leave torch's choice); ValueError below 1."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    torch.set_num_threads(threads)


def prepare_bench(arch: str, input_size: int = 32, target_ratio: float = 0.5, batch_size: int = 2,
                  steps: int = 4, device: str | torch.device = "cpu", seed: int = 0,
                  keep_rate: float = DEFAULT_KEEP_RATE, width_slope: float = DEFAULT_WIDTH_SLOPE,
                  threads: int | None = None, models: tuple[DiT, DyDiT] | None = None) -> PreparedBench:
    """Check the arguments, set torch's intra-op ``threads`` (None: leave torch's choice), build
    (or reuse) the models, make the inputs and set the routers for ``target_ratio``; the
    sliced-weight cache starts empty. Raises ValueError for a bad arch, target, batch or thread count."""
    cfg = get_config(arch, input_size=input_size)
    set_threads(threads)
    check_target(cfg, target_ratio)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = torch.device(device)
    dit, dydit = models if models is not None else build_models(arch, input_size, device, seed)
    inputs = make_inputs(dit, batch_size, steps, seed)
    setting = set_routers(dydit, inputs, target_ratio, keep_rate=keep_rate, width_slope=width_slope)
    dydit.clear_slice_cache()
    return PreparedBench(dit, dydit, inputs, setting, device)
