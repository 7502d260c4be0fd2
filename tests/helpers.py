"""Plain helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dydit_lab import create_model
from dydit_lab.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def randomised(model, std: float = 0.05):
    """``model`` in eval mode with every trainable weight ~N(0, std): past adaLN-Zero's zero output
    (the fixed sin-cos position tables are kept)."""
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, std)
    return model.eval()


def inputs(model, n: int = 3, size: int | None = None):
    """x, t, y for ``model``: t from [999, 500, 3, 250], labels 0, 1, ..."""
    size = size or model.config.input_size
    x = torch.randn(n, model.in_channels, size, size)
    t = torch.tensor([999, 500, 3, 250][:n])
    y = torch.arange(n) % model.num_classes
    return x, t, y


def random_dydit(seed: int = 0, arch: str = "DiT-lab-T", spread: float = 2.0):
    """A DyDiT with random weights and strong random routers: mixed routing (eval mode)."""
    from dydit_lab.models import DyDiT, get_config

    torch.manual_seed(seed)
    model = DyDiT(get_config(arch))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    for block in model.blocks:  # mixed gates: some units and tokens on, some off
        for r in (block.attn_rate.router, block.mlp_rate.router):
            r.weight.data.normal_(0, spread)
            r.bias.data.zero_()
        block.token_selection.mlp_head[2].bias.data.fill_(0.0)
    return model.eval()


def lab_t_macs(tokens: int, patch: int) -> int:
    """Hand count of one DiT-lab-T forward (depth 2, D 32, 1 channel, 32x32, MLP 128, 256
    frequencies) at ``patch``, with ``tokens`` = (32 / patch)^2."""
    D, depth = 32, 2
    return (tokens * D * patch * patch  # patch embedding conv
            + 256 * D + D * D  # timestep MLP
            + depth * 6 * D * D  # adaLN
            + (2 * depth + 1) * tokens * D * 4  # LayerNorms
            + depth * (tokens * D * 3 * D + 2 * tokens * tokens * D + tokens * D * D)  # attention
            + depth * 2 * tokens * D * 128  # MLP
            + 2 * D * D  # final adaLN
            + tokens * D * patch * patch  # final linear (1 output channel)
            + 32 * 32 // 2)  # unpatchify einsum charge


def write_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    """An image-folder dataset: one sub-folder per class of ``size``x``size`` grayscale PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_module(*args: str, torchrun: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m dydit_lab ARGS`` (under ``torchrun --standalone --nproc_per_node=N`` when
    ``torchrun``), one thread per process, from the repository root."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.run([*launcher, "-m", "dydit_lab", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# The benchmark tests' model and inputs: depth 2, 4 heads, 16 tokens (the router search has
# coarse steps here), 4 sampled timesteps, batch 2.
BENCH_ARCH, BENCH_STEPS, BENCH_BATCH = "DiT-lab-T", 4, 2
BENCH_RESULT_KEYS = {
    "arch", "input_size", "device", "batch_size", "steps", "target_ratio", "flops_ratio",
    "static_seconds", "dynamic_seconds", "masked_seconds", "speedup", "masked_speedup",
    "ideal_speedup", "efficiency", "token_keep_rate", "head_fraction", "group_fraction",
    "flops_ratio_per_step", "static_pass_spread", "torch_version", "num_threads", "timestamp",
    "static_faults_per_pass", "dynamic_faults_per_pass", "freed_memory_kept",
    "static_best_pass_seconds", "dynamic_best_pass_seconds", "best_pass_speedup", "best_pass_efficiency",
    "best_pass_masked_speedup", "conditioning_planned",
}


def cli_error(capsys, argv) -> str:
    """Run a command that must fail: exit status 2 and the one-line ``error:`` it printed."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def tiny_model(seed: int = 0):
    """DiT-lab-T with small random weights (past adaLN-Zero's zero output), eval mode."""
    torch.manual_seed(seed)
    model = create_model("DiT-lab-T")
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()
