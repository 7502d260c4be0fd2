"""Models in the released formats with random weights (shared by the tests of tests/official)."""

import torch

from dydit_lab.models import DyDiT, create_model, get_config
from dydit_lab.models.routers import set_router_release

LATENT_ARCH = "DiT-S/4"  # the smallest official width; 8x8 latents -> 4 tokens
IMAGE_SIZE = 16  # pixels; the tiny VAE halves them: 8x8 latents
NUM_CLASSES = 3


def randomise(model, seed: int = 0):
    """Every trainable weight ~N(0, 0.05) (past adaLN-Zero's zero output), eval mode."""
    torch.manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    return model.eval()


def mixed_routers(model: DyDiT, seed: int = 0) -> DyDiT:
    """Strong random width routers and unbiased token routers: mixed routing."""
    torch.manual_seed(seed)
    for block in model.blocks:
        for r in (block.attn_rate.router, block.mlp_rate.router):
            r.weight.data.normal_(0, 2.0)
            r.bias.data.zero_()
        block.token_selection.mlp_head[2].bias.data.zero_()
    return model


def latent_model(kind: str, seed: int = 0):
    """A latent (4-channel) DiT-S/4 on 8x8 latents: ``dit``, ``dydit-2025`` or ``dydit-2024``."""
    config = get_config(LATENT_ARCH, input_size=8, num_classes=NUM_CLASSES)
    if kind == "dit":
        return randomise(create_model(LATENT_ARCH, input_size=8, num_classes=NUM_CLASSES), seed)
    model = randomise(DyDiT(config, arch=LATENT_ARCH), seed)
    if kind == "dydit-2024":
        set_router_release([r for b in model.blocks for r in (b.attn_rate, b.mlp_rate)], "2024")
    return mixed_routers(model, seed)


def lab_latent_checkpoint(kind: str, path, seed: int = 0):
    """A tiny latent model (DiT-lab-T widths, 4 channels, 8x8 latents) in our format (arch
    recorded): the fast stand-in for a released file where the arch does not matter."""
    config = get_config("DiT-lab-T", in_channels=4, input_size=8, num_classes=NUM_CLASSES, learn_sigma=True)
    model = randomise(DyDiT(config, arch="DiT-lab-T") if kind.startswith("dydit") else
                      create_model("DiT-lab-T", **{k: getattr(config, k) for k in
                                                   ("in_channels", "input_size", "num_classes", "learn_sigma")}), seed)
    if kind == "dydit-2024":
        set_router_release([r for b in model.blocks for r in (b.attn_rate, b.mlp_rate)], "2024")
    if kind.startswith("dydit"):
        mixed_routers(model, seed)
    torch.save({"ema": model.state_dict(), "args": {"arch": "DiT-lab-T"}}, path)
    return path
