"""Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero conditioning.

Parameter names and shapes follow the official DiT state-dict layout, so an official
checkpoint (e.g. ``DiT-XL-2-256x256.pt``) loads into :class:`DiT` unchanged. PatchEmbed,
Attention and Mlp are written here (timm is not a dependency) with timm's parameter names.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import conditioning, flops
from ..diffusion import guide_doubled_output
from .configs import DIT_CONFIGS, FREQUENCY_EMBEDDING_SIZE, DiTConfig, get_config  # noqa: F401 (re-exported)
from .positions import get_2d_sincos_pos_embed


# ---------------------------------------------------------------------------
# Layers (timm parameter names)
# ---------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: ``x * (1 + scale) + shift`` per sample (x (B, N, C), shift and scale (B, C)),
    in one fused pass (a separate multiply and add cost a second pass over the activations)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's residual ``x + gate * update`` per sample (gate (B, C)), in one fused pass."""
    return torch.addcmul(x, gate.unsqueeze(1), update)


class LayerNorm(nn.LayerNorm):
    """DiT's LayerNorm: no learned parameters (nothing in the state dict), eps 1e-6.

    It runs ``layer_norm``'s affine kernel with a weight of ones: the same values bit for bit
    (and the same gradients), and on CPU faster than the kernel without a weight.
    :meth:`modulated` also folds adaLN's modulation into that kernel where it can.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__(dim, eps=eps, elementwise_affine=False)
        self.register_buffer("ones", torch.ones(dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.ones if self.ones.dtype == x.dtype else None  # x in another dtype than the module's
        return F.layer_norm(x, self.normalized_shape, weight, None, self.eps)

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """adaLN: ``norm(x) * (1 + scale) + shift`` per sample (x (B, N, C), shift and scale
        (B, C)); with one sample (or x the rows (M, C) of one) the kernel's own affine does the
        modulation in the same pass, with the same values as :func:`modulate`."""
        if shift.shape[0] > 1:
            return modulate(self(x), shift, scale)
        if shift.dtype == x.dtype:
            return F.layer_norm(x, self.normalized_shape, 1 + scale[0], shift[0], self.eps)
        return torch.addcmul(shift[0], self(x), 1 + scale[0])  # autocast: bf16 shift, fp32 tokens


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided convolution (``x_embedder.proj``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head attention output, shape (B, heads, N, head_dim), before ``proj``."""
        return self.attend(self.qkv(x))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention of a fused qkv tensor (B, N, 3 * h * head_dim) with any number of heads h
        (a sliced DyDiT passes its active heads only): (B, h, N, head_dim)."""
        B, N, _ = qkv.shape
        q, k, v = qkv.reshape(B, N, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return self.proj(self.heads(x).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as in DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------
# Embedders
# ---------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal frequencies, then a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = FREQUENCY_EMBEDDING_SIZE):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. The extra last row is the 'null' class used for CFG dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the conditioning vector c sets shift/scale/gate."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = LayerNorm(hidden_size)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # 1. adaLN-Zero: shift, scale and gate of both branches, per sample
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        # 2. attention branch: x + gate * attn(modulated norm1(x))
        x = gated_residual(x, gate_msa, self.attn(self.attention_input(x, shift_msa, scale_msa)))
        # 3. MLP branch: x + gate * mlp(modulated norm2(x))
        return self.mlp_residual(x, gate_mlp, self.mlp(self.mlp_input(x, shift_mlp, scale_mlp)))

    # The stages are methods so that ``bench --profile stages`` can time each one on its own.

    def modulation(self, c: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
        """(shift, scale, gate) of the attention branch, then of the MLP branch: six (B, C).
        ``c`` may be those six already (planned for a sampling run: :mod:`.conditioning`)."""
        if isinstance(c, tuple):
            return c
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attention_input(self, x, shift, scale):
        """norm1(x), modulated: what the attention reads."""
        return self.norm1.modulated(x, shift, scale)

    def mlp_input(self, x, shift, scale):
        """norm2(x), modulated: what the MLP reads."""
        return self.norm2.modulated(x, shift, scale)

    def mlp_residual(self, x, gate, out):
        """x + gate * the MLP's output."""
        return gated_residual(x, gate, out)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(self.norm_final.modulated(x, shift, scale))


# ---------------------------------------------------------------------------
# DiT
# ---------------------------------------------------------------------------


class DiT(nn.Module):
    """Class-conditional diffusion transformer: ``model(x, t, y) -> (N, out_channels, H, W)``.

    With ``learn_sigma`` the output holds eps (first ``in_channels``) and the interpolation
    values of the learned variance (last ``in_channels``), as in DiT/ADM.
    """

    block_class = DiTBlock  # DyDiT swaps in its dynamic block

    def __init__(self, config: DiTConfig, arch: str | None = None):
        super().__init__()
        self.config = config
        self.arch = arch
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * 2 if config.learn_sigma else config.in_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes
        D = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed (not learned) sin-cos positions; a buffer-like Parameter so it sits in the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [self.block_class(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(D, config.patch_size, self.out_channels)
        self.initialize_weights()
        self._conditioning: conditioning.ConditioningPlan | None = None

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches**0.5)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        # Patch embedding initialised like a Linear layer, as in the official code.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens -> (N, C, H, W) image."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected x of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"t and y must have shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}"
            )
        if not y.is_cuda and len(y) and not 0 <= int(y.min()) <= int(y.max()) <= self.num_classes:
            # (skipped on CUDA, where reading the labels would cost a host sync per forward)
            bad = y[(y < 0) | (y > self.num_classes)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has {self.num_classes} "
                             f"classes (0..{self.num_classes - 1}, and {self.num_classes} for the CFG null label)")

    def embed(self, x, t, y):
        """Tokens, conditioning vector c = t_emb + y_emb, and the timestep embedding alone."""
        self._check_inputs(x, t, y)
        t = t.to(x.device)  # samplers may hand over host timesteps (see DyDiT's width plans)
        tokens = self.x_embedder(x) + self.pos_embed
        t_emb = self.t_embedder(t)
        c = t_emb + self.y_embedder(y, self.training)
        return tokens, c, t_emb

    def plan_conditioning(self, timesteps=None, y: torch.Tensor | None = None) -> None:
        """Plan every block's adaLN modulation for a sampling run over ``timesteps`` (model timesteps)
        called with labels ``y`` (:mod:`.conditioning`); no ``timesteps``: drop the plan."""
        self._conditioning = None if timesteps is None else conditioning.make_plan(self, timesteps, y)

    def block_conditioning(self, c: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list:
        """What each block's adaLN reads in this call: its planned modulation, else c."""
        planned = conditioning.lookup(self, self._conditioning, t, y)
        return [c] * len(self.blocks) if planned is None else planned

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c, _ = self.embed(x, t, y)
        for block, block_c in zip(self.blocks, self.block_conditioning(c, t, y)):
            tokens = block(tokens, block_c)
        return self.unpatchify(self.final_layer(tokens, c))

    def sampling_cost(self, steps: int, method: str = "ddim", device="cpu") -> dict:
        """What one sampling step costs per image: ``gflops_per_step`` and ``flops_fraction`` of
        the static model. Each model family answers for itself; a static DiT by formula."""
        return {"gflops_per_step": flops.analytic_flops(self.config)["total"] / 1e9, "flops_fraction": 1.0}

    def forward_with_cfg(self, x, t, y, cfg_scale: float):
        """The official API: a batch whose second half carries the null label, both halves
        returned guided (see :func:`dydit_lab.diffusion.guide_doubled_output`)."""
        half = x[: len(x) // 2]
        return guide_doubled_output(self(torch.cat([half, half]), t, y), self.in_channels, cfg_scale)


class ModelWrapper(nn.Module):
    """Base of wrappers that are sampled in place of the model they wrap (a routing recorder, a
    patch schedule, ...): they answer ``config``, ``num_classes``, ``in_channels`` and ``arch``
    as the wrapped model does. Guidance needs nothing from them: it is the sampler's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def plan_timesteps(self, timesteps):
        """A sampler's plan of its run, forwarded to the wrapped model (a DyDiT plans widths)."""
        plan = getattr(self.model, "plan_timesteps", None)
        return plan(timesteps) if callable(plan) else None

    def plan_conditioning(self, timesteps=None, y=None) -> None:
        """Forwarded like :meth:`plan_timesteps` (a DiT plans its adaLN modulation)."""
        plan = getattr(self.model, "plan_conditioning", None)
        if callable(plan):
            plan(timesteps, y)

    config = property(lambda self: self.model.config)
    num_classes = property(lambda self: self.model.num_classes)
    in_channels = property(lambda self: self.model.in_channels)
    arch = property(lambda self: self.model.arch)


def create_model(arch: str, **kwargs) -> DiT:
    """Build a DiT by preset name (``DiT-XL/2`` ... ``DiT-S/8``, ``DiT-lab-S``, ``DiT-lab-L``).

    Keyword arguments override the preset with the official constructor's names, e.g.
    ``create_model("DiT-XL/2", input_size=32, num_classes=1000, learn_sigma=True)``.
    """
    return DiT(get_config(arch, **kwargs), arch=arch)
