"""DiT architecture configs: the 12 official presets and the lab's small ones.

A config is plain data; :func:`get_config` validates overrides. Kept free of torch modules so
that FLOPs formulas and checkpoint readers can use it without building a model.
"""

from __future__ import annotations

from dataclasses import dataclass

FREQUENCY_EMBEDDING_SIZE = 256  # width of the sinusoidal timestep features (official DiT)


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of one DiT preset. Keyword names follow the official constructor."""

    depth: int
    hidden_size: int
    patch_size: int
    num_heads: int
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1


def _official(depth: int, hidden: int, heads: int) -> dict[str, DiTConfig]:
    return {
        f"{p}": DiTConfig(depth=depth, hidden_size=hidden, patch_size=p, num_heads=heads)
        for p in (2, 4, 8)
    }


# The 12 official configs (latent space of a 256 px image: 32x32x4, 1000 ImageNet classes).
DIT_CONFIGS: dict[str, DiTConfig] = {}
for _name, (_depth, _hidden, _heads) in {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}.items():
    for _p, _cfg in _official(_depth, _hidden, _heads).items():
        DIT_CONFIGS[f"DiT-{_name}/{_p}"] = _cfg

# Lab presets: 32x32 one-channel MNIST digits, patch 4 (64 tokens), eps-only loss.
# 8 heads on the large model give TDW a width granularity of 12.5 % (heads are switched whole).
DIT_CONFIGS["DiT-lab-S"] = DiTConfig(
    depth=4, hidden_size=64, patch_size=4, num_heads=4,
    input_size=32, in_channels=1, num_classes=10, learn_sigma=False,
)
DIT_CONFIGS["DiT-lab-L"] = DiTConfig(
    depth=8, hidden_size=128, patch_size=4, num_heads=8,
    input_size=32, in_channels=1, num_classes=10, learn_sigma=False,
)
# A toy for tests and smoke runs (seconds per hundred steps).
DIT_CONFIGS["DiT-lab-T"] = DiTConfig(
    depth=2, hidden_size=32, patch_size=8, num_heads=4,
    input_size=32, in_channels=1, num_classes=10, learn_sigma=False,
)


def get_config(arch: str, **overrides) -> DiTConfig:
    """Return the config of ``arch`` with keyword overrides (official keyword names)."""
    if arch not in DIT_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(DIT_CONFIGS)}")
    fields = DiTConfig.__dataclass_fields__
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise TypeError(f"unknown model option(s) {unknown}; valid: {sorted(fields)}")
    values = {**DIT_CONFIGS[arch].__dict__, **overrides}
    cfg = DiTConfig(**values)
    if cfg.input_size % cfg.patch_size:
        raise ValueError(f"input_size {cfg.input_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    return cfg


def coarse_patch_sizes(config: DiTConfig, coarse_patches) -> tuple[int, ...]:
    """FlexiDiT's extra patch sizes, validated: None or 0 means 2 x native; one or several."""
    if coarse_patches is None or coarse_patches == 0:
        coarse_patches = [2 * config.patch_size]
    elif isinstance(coarse_patches, int):
        coarse_patches = [coarse_patches]
    out = []
    for q in coarse_patches:
        q = int(q)
        if q <= 0 or config.input_size % q:
            raise ValueError(f"patch size {q} does not tile the {config.input_size}x{config.input_size} input")
        if q == config.patch_size:
            raise ValueError(f"patch size {q} is the native one; give the extra sizes only")
        if q not in out:
            out.append(q)
    return tuple(out)
