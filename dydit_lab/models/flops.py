"""FLOPs of DiT and of dynamic (DyDiT) forwards, in the DiT paper's convention.

Convention: one multiply-add is one FLOP (i.e. we count MACs), for ONE sample (no CFG
doubling). The rules are fvcore's, with which the published DiT figures were made:

* a Linear costs ``in * out`` per row, a convolution ``prod(weight.shape) * out_pixels``;
  biases are free;
* a LayerNorm without affine parameters (DiT's) costs 4 per element (fvcore's ``norm_flop_counter``);
* elementwise ops (adds, modulate, gates, SiLU, GELU, softmax), the label-embedding lookup
  and the sinusoidal timestep features are free;
* the attention matmuls ``q @ k^T`` and ``attn @ v`` cost ``N * N * head_dim`` per head each.
  Stock fvcore misses them, because its JIT tracer has no handle for
  ``aten::scaled_dot_product_attention``: it reports 114.46 G for DiT-XL/2 instead of 118.69 G;
* the unpatchify ``einsum`` (a pure permutation) costs ``numel // 2``: fvcore prices it with
  ``np.einsum_path`` and halves the result. It is 4096 MACs on DiT-XL/2; we charge it so that
  the analytic count equals fvcore's to the last MAC.

Two independent counts are given and are tested to agree on every preset:
:func:`analytic_flops` (closed-form, per part) and :func:`fvcore_flops` (JIT trace).
DyDiT's dynamic cost is a pure function of routing records: :func:`dynamic_block_flops`,
:func:`dynamic_model_flops` and :func:`dynamic_flops_fraction`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Union

import torch
import torch.nn as nn

with warnings.catch_warnings():
    # fvcore.nn runs torch.jit.script on its focal losses at import; torch flags that as
    # deprecated, which is noise here (we only use its tracer-based FLOP counter).
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from .configs import FREQUENCY_EMBEDDING_SIZE, DiTConfig, coarse_patch_sizes, get_config

Number = Union[int, float]
LAYER_NORM_FLOPS_PER_ELEMENT = 4
# DyDiT's token router (SDT) is Linear(D, D // 16) -> ReLU -> Linear(D // 16, 1).
SDT_ROUTER_REDUCTION = 16
# Ops with no multiply-add in DiT's forward. Ignoring them by name (rather than switching
# fvcore's warnings off) keeps the warning for any genuinely unknown op a future model adds.
_FREE_OPS = (
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_",
    "aten::div", "aten::neg", "aten::exp", "aten::cos", "aten::sin", "aten::silu",
    "aten::gelu", "aten::relu", "aten::sigmoid", "aten::softmax", "aten::embedding",
    "aten::where", "aten::lt", "aten::rand", "aten::sum", "aten::mean",
)

# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------


def _as_config(config_or_model) -> DiTConfig:
    """A DiTConfig from a config, a model carrying ``.config``, or a preset name."""
    if isinstance(config_or_model, DiTConfig):
        return config_or_model
    if isinstance(config_or_model, str):
        return get_config(config_or_model)
    config = getattr(config_or_model, "config", None)
    if isinstance(config, DiTConfig):
        return config
    raise TypeError(f"expected a DiTConfig, a DiT or a preset name, got {type(config_or_model).__name__}")


def num_tokens(config: DiTConfig) -> int:
    """Patch tokens per sample: ``(input_size / patch_size) ** 2``."""
    return (config.input_size // config.patch_size) ** 2


def _mlp_hidden(config: DiTConfig) -> int:
    return int(config.hidden_size * config.mlp_ratio)  # as DiTBlock builds its Mlp


def _out_channels(config: DiTConfig) -> int:
    return config.in_channels * 2 if config.learn_sigma else config.in_channels


def _frequency_size(config_or_model) -> int:
    """Width of the sinusoidal timestep features fed to ``t_embedder.mlp``."""
    t_embedder = getattr(config_or_model, "t_embedder", None)
    if t_embedder is not None:
        return t_embedder.frequency_embedding_size
    return FREQUENCY_EMBEDDING_SIZE


# ---------------------------------------------------------------------------
# Analytic count
# ---------------------------------------------------------------------------


def _attention_parts(D: int, tokens: Number, width: Number) -> dict[str, Number]:
    """qkv, attention matmuls and proj when ``width`` (= heads * head_dim) channels run."""
    return {
        "qkv": tokens * D * 3 * width,
        "attn_matmul": 2 * tokens * tokens * width,  # q @ k^T and attn @ v
        "proj": tokens * width * D,
    }


def analytic_flops(config_or_model) -> dict[str, int]:
    """Per-part MACs of one static DiT forward for ONE sample, by formula.

    Accepts a :class:`DiTConfig`, a :class:`DiT` or a preset name. Keys: ``x_embedder``,
    ``t_embedder``, ``y_embedder`` (a lookup: 0), ``adaLN`` (all blocks), ``norm`` (all
    LayerNorms), ``qkv``, ``attn_matmul``, ``proj``, ``mlp_fc1``, ``mlp_fc2`` (summed over
    blocks), ``final_adaLN``, ``final_linear``, ``unpatchify`` (fvcore's einsum charge) and
    ``total`` (the sum of all the others; do not add it to them).
    """
    cfg = _as_config(config_or_model)
    D, depth, p = cfg.hidden_size, cfg.depth, cfg.patch_size
    N, hidden, freq = num_tokens(cfg), _mlp_hidden(cfg), _frequency_size(config_or_model)
    attn = _attention_parts(D, N, D)
    parts = {
        "x_embedder": N * D * cfg.in_channels * p * p,
        "t_embedder": freq * D + D * D,
        "y_embedder": 0,
        "adaLN": depth * D * 6 * D,
        # two norms per block plus the final one, on every token
        "norm": (2 * depth + 1) * N * D * LAYER_NORM_FLOPS_PER_ELEMENT,
        "qkv": depth * attn["qkv"],
        "attn_matmul": depth * attn["attn_matmul"],
        "proj": depth * attn["proj"],
        "mlp_fc1": depth * N * D * hidden,
        "mlp_fc2": depth * N * hidden * D,
        "final_adaLN": D * 2 * D,
        "final_linear": N * D * p * p * _out_channels(cfg),
        "unpatchify": _out_channels(cfg) * cfg.input_size**2 // 2,
    }
    parts["total"] = sum(parts.values())
    return parts


def block_flops(config, tokens: int) -> dict[str, int]:
    """MACs of one static DiT block for ONE sample, in the DyDiT paper's two parts.

    ``attn`` = qkv + attention matmuls + proj, ``mlp`` = fc1 + fc2. adaLN and the norms are
    left out, as in the paper's per-block figures (DiT-XL/2, 256 tokens: 1.5099 G / 2.7179 G).
    """
    cfg = _as_config(config)
    D = cfg.hidden_size
    return {
        "attn": sum(_attention_parts(D, tokens, D).values()),
        "mlp": 2 * tokens * D * _mlp_hidden(cfg),
    }


# ---------------------------------------------------------------------------
# Dynamic (DyDiT) accounting
# ---------------------------------------------------------------------------


def _check_count(name: str, value: Number, upper: Number) -> None:
    if not 0 <= value <= upper:
        raise ValueError(f"{name} must lie in [0, {upper}], got {value}")


def dynamic_block_flops(
    config, tokens: int, active_heads: Number, active_groups: Number, kept_tokens: Number
) -> dict[str, Number]:
    """MACs of one DyDiT block for ONE sample, from its routing record.

    * ``attn``: only ``active_heads`` of the H heads run on all ``tokens``; the qkv columns
      and proj rows of the other heads are sliced away.
    * ``mlp``: the hidden layer (``mlp_ratio * D``) is split in H equal groups; only
      ``active_groups`` of them run, and only on the ``kept_tokens`` the SDT router kept.
    * ``sdt_router``: the token router, Linear(D, D/16) -> ReLU -> Linear(D/16, 1), on all
      tokens.
    * ``tdw_router``: the two width routers (heads, MLP groups), Linear(D, H - 1) each, once
      per sample. They depend on the timestep only, so they can be precomputed.

    The values sum to the block's cost; drop the router keys to exclude routing overhead.
    Counts may be fractional means, but the MLP term is bilinear in ``active_groups`` and
    ``kept_tokens``: average the results over samples, not the inputs.
    """
    cfg = _as_config(config)
    D, H = cfg.hidden_size, cfg.num_heads
    hidden = _mlp_hidden(cfg)
    if hidden % H:
        raise ValueError(f"MLP hidden size {hidden} does not split in {H} equal groups")
    if tokens <= 0:
        raise ValueError(f"tokens must be positive, got {tokens}")
    _check_count("active_heads", active_heads, H)
    _check_count("active_groups", active_groups, H)
    _check_count("kept_tokens", kept_tokens, tokens)
    router_hidden = D // SDT_ROUTER_REDUCTION
    return {
        "attn": sum(_attention_parts(D, tokens, active_heads * (D // H)).values()),
        "mlp": 2 * kept_tokens * D * active_groups * (hidden // H),
        "sdt_router": tokens * (D * router_hidden + router_hidden * 1),
        "tdw_router": 2 * D * (H - 1),
    }


def _routing_values(record) -> tuple[Number, Number, Number]:
    if isinstance(record, Mapping):
        return record["active_heads"], record["active_groups"], record["kept_tokens"]
    active_heads, active_groups, kept_tokens = record
    return active_heads, active_groups, kept_tokens


def dynamic_model_flops(config, routing: Sequence, *, include_routers: bool = True) -> Number:
    """MACs of one DyDiT forward for ONE sample.

    ``routing`` holds one record per block, either ``(active_heads, active_groups,
    kept_tokens)`` or a mapping with those keys. The static parts (embedders, adaLN, all
    LayerNorms on every token, final layer, unpatchify) are charged in full; each block's
    attention and MLP come from :func:`dynamic_block_flops`, with its routers when
    ``include_routers``.
    """
    cfg = _as_config(config)
    if len(routing) != cfg.depth:
        raise ValueError(f"expected {cfg.depth} routing records (one per block), got {len(routing)}")
    static = analytic_flops(cfg)
    block_parts = ("qkv", "attn_matmul", "proj", "mlp_fc1", "mlp_fc2")
    total = static["total"] - sum(static[k] for k in block_parts)
    tokens = num_tokens(cfg)
    for record in routing:
        parts = dynamic_block_flops(cfg, tokens, *_routing_values(record))
        total += parts["attn"] + parts["mlp"]
        if include_routers:
            total += parts["sdt_router"] + parts["tdw_router"]
    return total


def dynamic_flops_fraction(config, routing: Sequence, *, include_routers: bool = True) -> float:
    """Cost of a dynamic forward as a fraction of the static DiT's (1.0 = no saving).

    The numerator is :func:`dynamic_model_flops`, the denominator ``analytic_flops()["total"]``.
    """
    cfg = _as_config(config)
    return dynamic_model_flops(cfg, routing, include_routers=include_routers) / analytic_flops(cfg)["total"]


# ---------------------------------------------------------------------------
# fvcore count
# ---------------------------------------------------------------------------


def _sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q @ k^T plus attn @ v.

    q is (..., L, E), k (..., S, E), v (..., S, Ev), the output (..., L, Ev): the two matmuls
    cost ``batch * L * S * E`` and ``batch * L * S * Ev`` MACs (softmax and scaling are free).
    """
    q, k, v = (get_shape(value) for value in inputs[:3])
    out = get_shape(outputs[0])
    batch = math.prod(out[:-2])  # broadcast batch and head dims
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _layer_norm_flop_jit(inputs, outputs) -> int:
    """``aten::layer_norm``: 4 per element, as for a LayerNorm without affine weights (DiT's;
    ``models.dit.LayerNorm`` passes a weight only because its kernel runs faster)."""
    return LAYER_NORM_FLOPS_PER_ELEMENT * math.prod(get_shape(inputs[0]))


def fvcore_counts(model: nn.Module, input_size: int | None, batch_size: int) -> Counter:
    """MACs by operator (fvcore names, e.g. ``linear``) of one traced forward of ``model``."""
    img_size = model.x_embedder.img_size
    if input_size is not None and input_size != img_size:
        raise ValueError(
            f"the model was built for input_size {img_size}, not {input_size}; "
            f"build it with create_model(arch, input_size={input_size})"
        )
    param = next(model.parameters())
    x = torch.randn(batch_size, model.in_channels, img_size, img_size, device=param.device, dtype=param.dtype)
    t = torch.randint(0, 1000, (batch_size,), device=param.device)
    y = torch.randint(0, model.num_classes, (batch_size,), device=param.device)
    analysis = FlopCountAnalysis(model, (x, t, y))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop_jit)
    analysis.set_op_handle("aten::layer_norm", _layer_norm_flop_jit)
    analysis.set_op_handle(*[item for op in _FREE_OPS for item in (op, None)])
    analysis.uncalled_modules_warnings(False)
    was_training = model.training
    model.eval()  # training mode would drop labels at random (CFG dropout)
    try:
        with torch.no_grad():
            return Counter(analysis.by_operator())  # the trace runs here, lazily
    finally:
        model.train(was_training)


def fvcore_flops(
    model: nn.Module, input_size: int | None = None, *, batch_size: int = 1, count_sdpa: bool = True
) -> int:
    """MACs of one forward of ``model`` on ``batch_size`` samples, traced by fvcore.

    ``model`` is a DiT (or anything with its ``forward(x, t, y)`` and attributes); it runs on
    its own device and dtype, in eval mode, and is put back in its previous mode.
    ``input_size`` defaults to the model's and must match it. With ``count_sdpa=False`` the
    attention matmuls are left out, which is what stock fvcore reports.
    """
    counts = fvcore_counts(model, input_size, batch_size)
    if not count_sdpa:
        counts.pop("scaled_dot_product_attention", None)
    return int(round(sum(counts.values())))


# ---------------------------------------------------------------------------
# FlexiDiT sampling schedules
# ---------------------------------------------------------------------------


def schedule_flops(config, coarse_patch: int | None, coarse_steps: int, total_steps: int) -> dict:
    """Exact MACs (DiT convention, one image, one forward per step, no CFG doubling) of a
    sampling run whose ``coarse_steps`` noisiest of ``total_steps`` steps use ``coarse_patch``.

    A coarse forward costs exactly what :func:`analytic_flops` counts for the
    same config with ``patch_size`` replaced: its patch embedding (q x q conv on (H/q)^2
    tokens), blocks and norms on (H/q)^2 tokens, shared t-embedder and adaLN, its final linear
    (hidden -> q*q*out per token) and the same unpatchify charge. ``config``: a DiTConfig, a
    model with ``.config`` or a preset name; ``coarse_patch`` None/0: 2 x native.
    """
    cfg = _as_config(config)
    q = coarse_patch_sizes(cfg, coarse_patch)[0]
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= coarse_steps <= total_steps:
        raise ValueError(f"coarse_steps must lie in [0, {total_steps}], got {coarse_steps}")
    native = analytic_flops(cfg)["total"]
    coarse = analytic_flops(dataclasses.replace(cfg, patch_size=q))["total"]
    total = coarse_steps * coarse + (total_steps - coarse_steps) * native
    return {
        "native_patch": cfg.patch_size, "coarse_patch": q,
        "coarse_steps": coarse_steps, "total_steps": total_steps,
        "native_macs": native, "coarse_macs": coarse, "total_macs": total,
        "native_gflops": native / 1e9, "coarse_gflops": coarse / 1e9,
        "gflops_per_image_step": total / total_steps / 1e9,
        "total_gflops": total / 1e9,
        "flops_fraction": total / (total_steps * native),
    }


# ---------------------------------------------------------------------------
# Partial forwards (feature caching)
# ---------------------------------------------------------------------------


def block_overhead_flops(config) -> int:
    """MACs of one block besides :func:`block_flops` (ONE sample): adaLN (6 D^2) and two LayerNorms."""
    cfg = _as_config(config)
    return 6 * cfg.hidden_size**2 + 2 * num_tokens(cfg) * cfg.hidden_size * LAYER_NORM_FLOPS_PER_ELEMENT


def outside_blocks_flops(config) -> int:
    """MACs of one forward outside the blocks (ONE sample: embedders, final layer, unpatchify),
    paid even when every block is reused: the static total minus ``depth`` whole blocks."""
    cfg = _as_config(config)
    block = block_overhead_flops(cfg) + sum(block_flops(cfg, num_tokens(cfg)).values())
    return analytic_flops(cfg)["total"] - cfg.depth * block


def partial_block_flops(config, attention: bool, mlp_tokens: Number, width: tuple | None = None) -> Number:
    """MACs of one block run in part (ONE sample): adaLN always; norm1 and attention on every token
    when ``attention``; norm2 and the MLP on ``mlp_tokens`` tokens (ToCa's cache step: attention
    reused, the MLP on the fresh tokens; all on: the whole block). ``width`` = (active heads,
    active groups, kept tokens) makes it a DyDiT block (:func:`dynamic_block_flops`): the token
    router scores the ``mlp_tokens``, the MLP's active groups run on the kept ones of them."""
    cfg = _as_config(config)
    D, N = cfg.hidden_size, num_tokens(cfg)
    _check_count("mlp_tokens", mlp_tokens, N)
    total = 6 * D * D + ((N if attention else 0) + mlp_tokens) * D * LAYER_NORM_FLOPS_PER_ELEMENT
    if width is None:
        return total + (block_flops(cfg, N)["attn"] if attention else 0) + mlp_tokens * 2 * D * _mlp_hidden(cfg)
    heads, groups, kept = width
    parts = dynamic_block_flops(cfg, N, heads if attention else 0, groups, kept)
    return total + parts["attn"] + parts["mlp"] + parts["sdt_router"] * mlp_tokens / N + parts["tdw_router"]


def modulated_input_flops(config) -> int:
    """MACs of block 0's adaLN and norm1 on every token (ONE sample): TeaCache's probe (the
    distance it then takes is elementwise, free)."""
    cfg = _as_config(config)
    return 6 * cfg.hidden_size**2 + num_tokens(cfg) * cfg.hidden_size * LAYER_NORM_FLOPS_PER_ELEMENT


# ---------------------------------------------------------------------------
# DyDiT bounds
# ---------------------------------------------------------------------------


def dydit_flops_bounds(config: DiTConfig) -> tuple[float, float]:
    """(floor, all-on) FLOPs fractions of a DyDiT, routers included: the floor keeps only
    head 0 and group 0 and no token in every block; all-on runs everything (plus routers)."""
    total = analytic_flops(config)["total"]
    N, H = num_tokens(config), config.num_heads
    floor = dynamic_model_flops(config, [(1, 1, 0)] * config.depth) / total
    full = dynamic_model_flops(config, [(H, H, N)] * config.depth) / total
    return floor, full
