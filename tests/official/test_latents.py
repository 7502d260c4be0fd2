"""``extract-latents`` (an RGB image folder through a VAE folder, once; sharded under torchrun) and
latent folders as ``--data`` of finetune / flexi-finetune / train, with released-format parents."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dydit_lab.checkpoints import load_model
from dydit_lab.cli import main
from dydit_lab.data import LATENT_MANIFEST, load_dataset
from dydit_lab.models import DyDiT, FlexiDiT
from dydit_lab.official.latents import center_crop, read_images
from dydit_lab.official.vae import encode, load_vae

from .files import IMAGE_SIZE, NUM_CLASSES, lab_latent_checkpoint
from tests.helpers import cli_error, run_module

# Two steps; the official (absolute) router objective skips the lab's loss profile of the parent.
FINETUNE_FAST = ["--steps", "2", "--batch-size", "4", "--hold-steps", "0", "--anneal-steps", "1",
                 "--noise-off-step", "0", "--router-objective", "absolute", "--device", "cpu"]


@pytest.fixture(scope="module")
def latents(rgb_folder, vae_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "latents"
    main(["extract-latents", "--images", str(rgb_folder), "--vae", str(vae_dir), "--out", str(out),
          "--image-size", str(IMAGE_SIZE), "--batch-size", "4", "--device", "cpu", "--seed", "3"])
    return out


def test_centre_crop_follows_adm():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    # short side exactly twice the size: one box halving, then the centre 16 of 24 columns
    expected = np.asarray(image.resize((24, 16), resample=Image.BOX))[:, 4:20]
    assert np.array_equal(center_crop(image, 16), expected)
    small = Image.fromarray(rng.integers(0, 256, (20, 12, 3), dtype=np.uint8))  # upscaled with bicubic
    expected = np.asarray(small.resize((16, 27), resample=Image.BICUBIC))[5:21]
    assert np.array_equal(center_crop(small, 16), expected)


def test_extract_latents_writes_what_the_vae_encodes(latents, rgb_folder, vae_dir, capsys):
    manifest = json.loads((latents / LATENT_MANIFEST).read_text())
    assert manifest["num_latents"] == 9 and manifest["shape"] == [4, 8, 8]
    assert manifest["classes"] == ["n00", "n01", "n02"] and manifest["scaling_factor"] == 0.18215
    data = load_dataset(str(latents))
    x, y = data.tensors
    assert x.shape == (9, 4, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # image i, by hand: ADM crop, posterior mean + std * noise seeded by (seed, i), x 0.18215
    paths = sorted(rgb_folder.glob("*/*.png"))
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed((3 << 32) + i))
                         for i in range(9)])
    vae = load_vae(vae_dir)
    with torch.no_grad():
        posterior = vae.encode(read_images(paths, IMAGE_SIZE)).latent_dist
    expected = (posterior.mean + posterior.std * noise) * 0.18215
    assert torch.allclose(x, expected, atol=2e-3, rtol=2e-3)  # shards hold float16
    assert torch.allclose(encode(vae, read_images(paths[:1], IMAGE_SIZE)), posterior.mean[:1] * 0.18215, atol=1e-6)
    err = cli_error(capsys, ["extract-latents", "--images", str(rgb_folder), "--vae", str(vae_dir),
                            "--out", str(latents), "--device", "cpu"])
    assert "already holds latents" in err


def test_bad_extraction_input_is_one_line(rgb_folder, vae_dir, tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, ["extract-latents", "--images", str(tmp_path / "none"),
                                                 "--vae", str(vae_dir), "--out", str(tmp_path / "o")])
    err = cli_error(capsys, ["extract-latents", "--images", str(rgb_folder), "--vae", str(vae_dir),
                            "--out", str(tmp_path / "o"), "--image-size", "15", "--device", "cpu"])
    assert "multiple of the VAE's downsampling 2" in err


def test_finetune_a_released_dit_on_latents(latents, released, tmp_path, capsys):
    main(["finetune", "--parent", str(released["dit"]), "--data", str(latents), "--out", str(tmp_path / "ft"),
          "--target-ratio", "0.7", *FINETUNE_FAST])
    model = load_model(tmp_path / "ft" / "checkpoint.pt")
    assert isinstance(model, DyDiT) and model.arch == "DiT-S/4"
    assert (model.in_channels, model.config.input_size, model.num_classes) == (4, 8, NUM_CLASSES)
    assert all(b.attn_rate.always_on_first for b in model.blocks)  # new DyDiTs: the 2025 layout
    assert len((tmp_path / "ft" / "log.csv").read_text().splitlines()) == 3


def test_latent_parents_finetune_and_flexify_on_latents(latents, tmp_path, capsys):
    dit = lab_latent_checkpoint("dit", tmp_path / "dit.pt")
    main(["finetune", "--parent", str(dit), "--data", str(latents), "--out", str(tmp_path / "ft"), *FINETUNE_FAST])
    model = load_model(tmp_path / "ft" / "checkpoint.pt")
    assert isinstance(model, DyDiT) and (model.in_channels, model.config.input_size) == (4, 8)
    assert all(b.attn_rate.always_on_first for b in model.blocks)  # new DyDiTs: the 2025 layout
    assert len((tmp_path / "ft" / "log.csv").read_text().splitlines()) == 3

    dydit_2024 = lab_latent_checkpoint("dydit-2024", tmp_path / "dydit.pt")
    main(["finetune", "--parent", str(dydit_2024), "--data", str(latents), "--out", str(tmp_path / "ft24"),
          *FINETUNE_FAST])
    model = load_model(tmp_path / "ft24" / "checkpoint.pt")
    assert not any(b.attn_rate.always_on_first for b in model.blocks)  # it stays in its release's layout

    main(["flexi-finetune", "--parent", str(dit), "--data", str(latents), "--out", str(tmp_path / "fx"),
          "--steps", "1", "--batch-size", "2", "--coarse-patch", "4", "--device", "cpu"])
    assert isinstance(load_model(tmp_path / "fx" / "checkpoint.pt"), FlexiDiT)


def test_train_names_a_latent_size_the_model_does_not_take(latents, tmp_path, capsys):
    err = cli_error(capsys, ["train", "--arch", "DiT-S/4", "--data", str(latents), "--out", str(tmp_path / "t"),
                            "--steps", "1", "--device", "cpu"])
    assert "(4, 8, 8)" in err and "(4, 32, 32)" in err


@pytest.mark.slow  # the single-process test above runs the same finetune; DDP is covered by tests/test_cli.py
def test_extract_and_finetune_under_torchrun(latents, rgb_folder, vae_dir, released, tmp_path):
    out = tmp_path / "latents"
    run = run_module("extract-latents", "--images", str(rgb_folder), "--vae", str(vae_dir), "--out", str(out),
                     "--image-size", str(IMAGE_SIZE), "--batch-size", "2", "--device", "cpu", "--seed", "3",
                     torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000-of-00002.pt", "shard-00001-of-00002.pt"]
    one, two = (load_dataset(str(p)).tensors for p in (latents, out))
    assert torch.equal(one[1], two[1]) and torch.allclose(one[0], two[0], atol=2e-3)  # same latents, any world

    run = run_module("finetune", "--parent", str(released["dit"]), "--data", str(out), "--out", str(tmp_path / "ft"),
                     *FINETUNE_FAST, torchrun=2)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("checkpoint:") == 1
    assert isinstance(load_model(tmp_path / "ft" / "checkpoint.pt"), DyDiT)


@pytest.mark.cuda
def test_extraction_on_cuda_matches_cpu(latents, rgb_folder, vae_dir, tmp_path):
    main(["extract-latents", "--images", str(rgb_folder), "--vae", str(vae_dir), "--out", str(tmp_path / "g"),
          "--image-size", str(IMAGE_SIZE), "--device", "cuda", "--seed", "3"])
    cpu, gpu = (load_dataset(str(p)).tensors for p in (latents, tmp_path / "g"))
    assert torch.equal(cpu[1], gpu[1]) and torch.allclose(cpu[0], gpu[0], atol=1e-2)
