"""``python -m dydit_lab sample``: lab checkpoints in pixel space, released latent DiT / DyDiT files
through a VAE folder, the measured FLOPs fraction, ADM's .npz, and sharding under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dydit_lab.checkpoints import load_model
from dydit_lab.cli import main
from dydit_lab.diffusion import GaussianDiffusion
from dydit_lab.models import DyDiT, create_model
from dydit_lab.models.dydit import sampling_flops
from dydit_lab.official.sample import sample_to_files
from dydit_lab.official.vae import decode, load_vae

from .files import mixed_routers, randomise
from tests.helpers import cli_error

ROOT = Path(__file__).resolve().parents[2]


def run_module(*args, torchrun: int = 0, timeout: int = 600):
    """``python -m dydit_lab ARGS`` in a subprocess (under torchrun with gloo when asked)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
                if torchrun else [sys.executable])
    return subprocess.run([*launcher, "-m", "dydit_lab", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)




@pytest.fixture(scope="module")
def lab_dydit(tmp_path_factory):
    """A pixel-space DyDiT in our checkpoint format (arch recorded), mixed routing."""
    model = mixed_routers(randomise(DyDiT.from_dit(create_model("DiT-lab-T"))))
    path = tmp_path_factory.mktemp("lab") / "DyDiT-lab-T.pt"
    torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    return path


def test_lab_checkpoint_samples_in_pixel_space(lab_dydit, tmp_path, capsys):
    main(["sample", "--checkpoint", str(lab_dydit), "--steps", "4", "--method", "ddim", "--num-samples", "5",
          "--classes", "3,7", "--batch-size", "2", "--cfg-scale", "2", "--out", str(tmp_path / "grid.png"),
          "--out-dir", str(tmp_path / "one"), "--npz", str(tmp_path / "all.npz")])
    out = capsys.readouterr().out
    assert "5 images of DyDiT DiT-lab-T" in out and "FLOPs fraction" in out and "seconds per image" in out
    grid = Image.open(tmp_path / "grid.png")
    assert grid.mode == "L" and grid.size == (2 + 5 * 34, 2 + 34)  # one row of five 32x32, 2-pixel lines
    singles = sorted((tmp_path / "one").iterdir())
    assert [p.name for p in singles] == [f"{i:06d}.png" for i in range(5)]
    arr = np.load(tmp_path / "all.npz")["arr_0"]
    assert arr.shape == (5, 32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(np.asarray(Image.open(singles[3])), arr[3, ..., 0])
    assert np.array_equal(np.asarray(grid)[2:34, 2 + 3 * 34:34 + 3 * 34], arr[3, ..., 0])


def test_measured_flops_fraction_is_that_of_the_routing_used(lab_dydit, tmp_path):
    summary = sample_to_files(lab_dydit, tmp_path / "g.png", steps=5, method="ddim", cfg_scale=1.0,
                              num_samples=6, batch_size=6, progress=False)
    reference = sampling_flops(load_model(lab_dydit), steps=5, num_samples=6, method="ddim", progress=False)
    assert 0.1 < summary["flops_fraction"] < 0.99
    assert summary["flops_fraction"] == pytest.approx(reference["flops_fraction"], rel=1e-6)  # its MACs are float32
    static = sample_to_files(lab_dydit, tmp_path / "h.png", steps=2, num_samples=2, progress=False,
                             arch="DiT-lab-T")
    assert static["model"] == "DyDiT"


def test_bad_input_is_one_line(lab_dydit, released, tmp_path, capsys):
    out = str(tmp_path / "g.png")
    assert "class 10 is out of range" in cli_error(capsys, ["sample", "--checkpoint", str(lab_dydit),
                                                           "--classes", "1,10", "--out", out])
    assert "comma-separated" in cli_error(capsys, ["sample", "--checkpoint", str(lab_dydit),
                                                  "--classes", "dog", "--out", out])
    assert ".png" in cli_error(capsys, ["sample", "--checkpoint", str(lab_dydit), "--out", str(tmp_path / "g.jpg")])
    assert "no checkpoint" in cli_error(capsys, ["sample", "--checkpoint", str(tmp_path / "none.pt"), "--out", out])
    err = cli_error(capsys, ["sample", "--checkpoint", str(released["dit"]), "--out", out])
    assert "latent model" in err and "--vae" in err
    err = cli_error(capsys, ["sample", "--checkpoint", str(released["dit"]), "--vae", str(tmp_path / "no"),
                            "--out", out])
    assert "is not a folder" in err
    (tmp_path / "empty").mkdir()
    err = cli_error(capsys, ["sample", "--checkpoint", str(released["dit"]), "--vae", str(tmp_path / "empty"),
                            "--out", out])
    assert "config.json" in err


def test_a_vae_that_does_not_fit_is_named(lab_dydit, vae_dir, tmp_path, capsys):
    err = cli_error(capsys, ["sample", "--checkpoint", str(lab_dydit), "--vae", str(vae_dir),
                            "--out", str(tmp_path / "g.png")])
    assert "4-channel latents" in err and "takes 1 channels" in err


@pytest.mark.parametrize("kind", ["dit", "dydit-2025", "dydit-2024"])
def test_released_latent_models_sample_through_the_vae(kind, released, vae_dir, tmp_path):
    summary = sample_to_files(released[kind], tmp_path / "grid.png", vae=vae_dir, classes="2,0", num_samples=3,
                              steps=3, cfg_scale=1.5, seed=5, batch_size=2, npz=tmp_path / "s.npz",
                              progress=False)
    model = load_model(released[kind])  # arch read off the shapes: DiT-S/4
    assert model.arch == "DiT-S/4" and summary["arch"] == "DiT-S/4"
    assert isinstance(model, DyDiT) == kind.startswith("dydit")
    assert (summary["flops_fraction"] < 1) == kind.startswith("dydit")
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (3, 16, 16, 3)  # 8x8 latents, decoded at twice the side
    assert Image.open(tmp_path / "grid.png").mode == "RGB"
    if kind != "dydit-2024":  # the pipeline is the same for every kind: checked by hand once
        return
    # the same pipeline by hand: DDPM with guidance on the latents, decode(latents / 0.18215), DiT's rounding
    diffusion = GaussianDiffusion(learn_sigma=True).respaced(3)
    vae = load_vae(vae_dir)
    expected = []
    for k, y in enumerate([torch.tensor([2, 0]), torch.tensor([2])]):
        with torch.no_grad():
            z = diffusion.sample(model, y, (len(y), 4, 8, 8), method="ddpm", cfg_scale=1.5, seed=5 + k,
                                 clip_denoised=False, progress=False)
            images = vae.decode(z / 0.18215).sample
            assert torch.allclose(images, decode(vae, z))
        expected.append(torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy())
    assert np.abs(np.concatenate(expected).astype(int) - arr.astype(int)).max() <= 1


def test_torchrun_shards_and_gathers_the_same_images(lab_dydit, tmp_path):
    common = ["sample", "--checkpoint", str(lab_dydit), "--steps", "3", "--num-samples", "5", "--batch-size", "2",
              "--device", "cpu"]
    single = run_module(*common, "--out", str(tmp_path / "one.png"), "--npz", str(tmp_path / "one.npz"))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_module(*common, "--out", str(tmp_path / "two.png"), "--out-dir", str(tmp_path / "two"),
                     torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("FLOPs fraction") == 1 and "on 2 process(es)" in ddp.stdout
    a, b = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("one", "two"))  # --npz defaults to --out's
    assert a.shape == b.shape == (5, 32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert len(list((tmp_path / "two").iterdir())) == 5
    assert not list(tmp_path.glob(".two-parts*"))  # the hand-over files are gone


@pytest.mark.cuda
def test_sample_on_cuda_matches_cpu(released, vae_dir, tmp_path):
    cpu = sample_to_files(released["dydit-2024"], tmp_path / "c.png", vae=vae_dir, num_samples=2, steps=3,
                          method="ddim", device="cpu", npz=tmp_path / "c.npz", progress=False)
    gpu = sample_to_files(released["dydit-2024"], tmp_path / "g.png", vae=vae_dir, num_samples=2, steps=3,
                          method="ddim", device="cuda", npz=tmp_path / "g.npz", progress=False)
    assert gpu["flops_fraction"] == pytest.approx(cpu["flops_fraction"], abs=0.02)
    a, b = (np.load(tmp_path / f"{n}.npz")["arr_0"].astype(int) for n in "cg")
    assert np.abs(a - b).mean() < 2
