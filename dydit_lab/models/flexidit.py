"""FlexiDiT (Anagnostidis et al., CVPR 2025): one DiT, several patch sizes.

Every transformer weight is shared; each extra patch size q gets its own patch embedding
(PI-resized from the native one), final linear, fixed position table and a learned size token,
and optionally low-rank adapters on every block's attention and MLP linears that only the
coarse path uses (the paper's LoRA variant, Sec. 3.2: the native path stays the parent's).
Sampling runs the coarse patch in the first, noisiest steps (:class:`PatchSchedule`). How this
follows the paper, point by point, is in notebook 05.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from . import flops
from ..diffusion import NUM_TIMESTEPS, guide_doubled_output, space_timesteps
from .adapters import LORA_TARGETS, BlockAdapter
from .configs import DiTConfig, coarse_patch_sizes
from .dit import DiT, ModelWrapper, PatchEmbed
from .positions import _1d_sincos, get_2d_sincos_pos_embed

FLEX_PREFIX = "flex_"
RESIZE_MODES = ("bilinear", "nearest")
POS_MODES = ("center", "grid")


# ---------------------------------------------------------------------------
# Resizing the patch (de-)embedding: FlexiViT's PI-resize
# ---------------------------------------------------------------------------


def resize_matrix(src: int, dst: int, mode: str = "bilinear") -> torch.Tensor:
    """The linear operator B (float64, shape ``(dst*dst, src*src)``) that resizes one
    ``src x src`` patch, flattened row-major, to ``dst x dst``.

    ``bilinear`` uses ``align_corners=False`` (pixel centres), with antialiasing when
    shrinking; ``nearest`` replicates pixels (its transpose sums blocks when dst = k*src).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    if src <= 0 or dst <= 0:
        raise ValueError(f"patch sizes must be positive, got {src} and {dst}")
    basis = torch.eye(src * src, dtype=torch.float64).reshape(src * src, 1, src, src)
    if mode == "bilinear":
        out = F.interpolate(basis, size=(dst, dst), mode="bilinear", align_corners=False,
                            antialias=dst < src)
    else:
        out = F.interpolate(basis, size=(dst, dst), mode="nearest-exact")
    return out.reshape(src * src, dst * dst).T.contiguous()


def pi_resize_kernel(weight: torch.Tensor, new_size: int, mode: str = "bilinear") -> torch.Tensor:
    """PI-resize a conv patch-embedding kernel ``(D, C, p, p)`` to ``(D, C, q, q)``.

    Solves FlexiViT's ``min_w' E_z <z, w> - <B z, w'>`` for the resize B: ``w' = pinv(B^T) w``.
    For q >= p (B injective) the match is exact: ``<B z, w'> = <z, w>`` for every patch z.
    """
    D, C, p, p2 = weight.shape
    if p != p2:
        raise ValueError(f"expected a square kernel, got {tuple(weight.shape)}")
    B = resize_matrix(p, new_size, mode)
    flat = weight.detach().to(torch.float64).reshape(D, C, p * p)
    new = flat @ torch.linalg.pinv(B.T).T  # (D, C, q*q)
    return new.reshape(D, C, new_size, new_size).to(weight.dtype)


def resize_output_linear(weight: torch.Tensor, bias: torch.Tensor | None, patch: int, new_size: int,
                         out_channels: int, mode: str = "bilinear"):
    """The final linear ``(p*p*c, D)`` (and bias) for patch ``new_size``: ``W' = B W``, so a
    token's q x q output patch is the resized p x p patch of the native linear (per channel).
    Rows are ordered (row, column, channel), as :meth:`DiT.unpatchify` reads them."""
    B = resize_matrix(patch, new_size, mode)
    hidden = weight.shape[1]
    w = weight.detach().to(torch.float64).reshape(patch * patch, out_channels * hidden)
    new_w = (B @ w).reshape(new_size * new_size * out_channels, hidden).to(weight.dtype)
    new_b = None
    if bias is not None:
        b = bias.detach().to(torch.float64).reshape(patch * patch, out_channels)
        new_b = (B @ b).reshape(-1).to(bias.dtype)
    return new_w, new_b


def sincos_pos_embed_at(embed_dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """DiT's 2-D sin-cos embedding at arbitrary (possibly fractional) grid positions.

    Same layout as :func:`get_2d_sincos_pos_embed` (first half from the column coordinate,
    second from the row; tokens row-major), which it reproduces for integer grids.
    """
    r, c = np.meshgrid(np.asarray(rows, np.float64), np.asarray(cols, np.float64), indexing="ij")
    return np.concatenate([_1d_sincos(embed_dim // 2, c), _1d_sincos(embed_dim // 2, r)], axis=1)


def coarse_pos_embed(embed_dim: int, input_size: int, native_patch: int, patch: int,
                     mode: str = "center") -> np.ndarray:
    """Fixed position table ``(tokens, D)`` for patch ``patch`` (see the module docstring)."""
    if mode not in POS_MODES:
        raise ValueError(f"pos must be one of {POS_MODES}, got {mode!r}")
    grid = input_size // patch
    if mode == "grid":
        return get_2d_sincos_pos_embed(embed_dim, grid)
    centres = (np.arange(grid, dtype=np.float64) + 0.5) * patch / native_patch - 0.5
    return sincos_pos_embed_at(embed_dim, centres, centres)


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class FlexiDiT(DiT):
    """A DiT that also runs at the patch sizes ``coarse_patches`` (default: 2 x native).

    ``forward(x, t, y, patch_size=None)`` returns ``(N, out_channels, H, W)`` at any of
    :attr:`patch_sizes`; ``None`` (or the native size) runs the parent DiT's code unchanged.
    Extra parameters: ``flex_embedders.<q>.proj`` (conv), ``flex_final.<q>`` (linear), the
    learned patch-size token ``flex_size_embed.<q>`` and the fixed ``flex_pos_embed.<q>``;
    with ``lora_rank`` r > 0 also ``flex_lora.<q>.<block>``: rank-r updates of every block's
    attention and MLP weights, applied at patch q only (merged into the weights once per
    weight change, so a coarse step costs the same FLOPs with or without them).
    A freshly built model initialises them from its own
    (random) native layers; :meth:`from_dit` does so from a trained DiT.
    """

    def __init__(self, config: DiTConfig, arch: str | None = None,
                 coarse_patches: int | Iterable[int] | None = None,
                 resize: str = "bilinear", pos: str = "center", lora_rank: int = 0):
        super().__init__(config, arch=arch)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if pos not in POS_MODES:
            raise ValueError(f"pos must be one of {POS_MODES}, got {pos!r}")
        self.resize, self.pos = resize, pos
        self.coarse_patches = coarse_patch_sizes(config, coarse_patches)
        D = config.hidden_size
        self.flex_embedders = nn.ModuleDict({
            str(q): PatchEmbed(config.input_size, q, config.in_channels, D) for q in self.coarse_patches})
        self.flex_final = nn.ModuleDict({
            str(q): nn.Linear(D, q * q * self.out_channels) for q in self.coarse_patches})
        self.flex_pos_embed = nn.ParameterDict({
            str(q): nn.Parameter(torch.zeros(1, (config.input_size // q) ** 2, D), requires_grad=False)
            for q in self.coarse_patches})
        # A learned vector per patch size added to every token tells the shared blocks which
        # size they see (the paper's Sec. 3.1); zero at init, so flexifying changes nothing.
        self.flex_size_embed = nn.ParameterDict({
            str(q): nn.Parameter(torch.zeros(1, 1, D)) for q in self.coarse_patches})
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.lora_rank = int(lora_rank)
        if self.lora_rank:
            self.flex_lora = nn.ModuleDict({
                str(q): nn.ModuleList(BlockAdapter(block, self.lora_rank) for block in self.blocks)
                for q in self.coarse_patches})
        self._merged: dict[int, tuple[tuple, list[dict]]] = {}  # patch -> (weight versions, merged weights)
        self.init_flex_layers()

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return (self.patch_size, *self.coarse_patches)

    @classmethod
    def from_dit(cls, dit: DiT, coarse_patch: int | Iterable[int] | None = None,
                 resize: str = "bilinear", pos: str = "center", lora_rank: int = 0) -> "FlexiDiT":
        """Flexify a trained DiT: its weights copied, new layers PI-resized from its own.

        ``coarse_patch``: one size or several (default 2 x native); ``lora_rank``: coarse-only
        adapters (0: none). The native path of the result equals ``dit`` exactly.
        """
        if type(dit) is not DiT and not isinstance(dit, FlexiDiT):
            raise TypeError(f"from_dit needs a static DiT, got {type(dit).__name__}")
        param = next(dit.parameters())
        model = cls(dit.config, arch=dit.arch, coarse_patches=coarse_patch, resize=resize, pos=pos,
                    lora_rank=lora_rank)
        native = {k: v for k, v in dit.state_dict().items() if not k.startswith(FLEX_PREFIX)}
        missing, unexpected = model.load_state_dict(native, strict=False)
        if unexpected or any(not k.startswith(FLEX_PREFIX) for k in missing):
            raise ValueError(f"not a DiT state dict: missing {missing}, unexpected {unexpected}")
        model.init_flex_layers()
        return model.to(device=param.device, dtype=param.dtype).train(dit.training)

    @torch.no_grad()
    def init_flex_layers(self) -> None:
        """(Re)initialise every extra patch size from the current native layers (see module doc)."""
        p = self.patch_size
        for q in self.coarse_patches:
            emb, final = self.flex_embedders[str(q)].proj, self.flex_final[str(q)]
            emb.weight.copy_(pi_resize_kernel(self.x_embedder.proj.weight, q, self.resize))
            emb.bias.copy_(self.x_embedder.proj.bias)
            w, b = resize_output_linear(self.final_layer.linear.weight, self.final_layer.linear.bias,
                                        p, q, self.out_channels, self.resize)
            final.weight.copy_(w)
            final.bias.copy_(b)
            table = coarse_pos_embed(self.config.hidden_size, self.config.input_size, p, q, self.pos)
            self.flex_pos_embed[str(q)].copy_(torch.from_numpy(table).float().unsqueeze(0))
            self.flex_size_embed[str(q)].zero_()
            if self.lora_rank:
                for adapter in self.flex_lora[str(q)]:
                    adapter.reset()

    def new_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the parent DiT does not have (embedders, final linears,
        patch-size tokens, adapters)."""
        return [p for n, p in self.named_parameters() if n.startswith(FLEX_PREFIX) and p.requires_grad]

    def _resolve_patch(self, patch_size: int | None) -> int:
        if patch_size is None:
            return self.patch_size
        q = int(patch_size)
        if q not in self.patch_sizes:
            raise ValueError(f"patch_size {q} not available; this model runs {self.patch_sizes}")
        return q

    def embed_at(self, x, t, y, patch_size: int):
        """Tokens at ``patch_size``, the conditioning c and the timestep embedding."""
        if patch_size == self.patch_size:
            return self.embed(x, t, y)
        self._check_inputs(x, t, y)
        t = t.to(x.device)
        key = str(patch_size)
        tokens = self.flex_embedders[key](x) + self.flex_pos_embed[key] + self.flex_size_embed[key]
        t_emb = self.t_embedder(t)
        return tokens, t_emb + self.y_embedder(y, self.training), t_emb

    def final_at(self, tokens: torch.Tensor, c: torch.Tensor, patch_size: int) -> torch.Tensor:
        """The shared final norm + adaLN, then the linear of ``patch_size``."""
        if patch_size == self.patch_size:
            return self.final_layer(tokens, c)
        final = self.final_layer
        shift, scale = final.adaLN_modulation(c).chunk(2, dim=1)
        return self.flex_final[str(patch_size)](final.norm_final.modulated(tokens, shift, scale))

    def unpatchify_at(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        """(N, T, q*q*C) tokens -> (N, C, H, W) image, for any patch size."""
        c, q = self.out_channels, patch_size
        h = w = self.config.input_size // q
        x = x.reshape(x.shape[0], h, w, q, q, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * q, w * q)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                patch_size: int | None = None) -> torch.Tensor:
        q = self._resolve_patch(patch_size)
        if q == self.patch_size:
            return super().forward(x, t, y)
        tokens, c, _ = self.embed_at(x, t, y, q)
        weights = self.coarse_block_weights(q)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c) if weights is None else functional_call(block, weights[i], (tokens, c))
        return self.unpatchify_at(self.final_at(tokens, c, q), q)

    def coarse_block_weights(self, patch_size: int) -> list[dict[str, torch.Tensor]] | None:
        """Per block, the adapted weights at ``patch_size`` (None without adapters).

        Without autograd the merge is cached until a weight changes (in place or moved), so
        sampling merges once, not once per step."""
        if not self.lora_rank:
            return None
        adapters = self.flex_lora[str(patch_size)]
        if torch.is_grad_enabled():
            return [a.merged_weights(b) for a, b in zip(adapters, self.blocks)]
        tensors = [*adapters.parameters(), *(b.get_submodule(path).weight
                                             for b in self.blocks for path in LORA_TARGETS.values())]
        key = tuple((p.data_ptr(), p._version) for p in tensors)
        cached = self._merged.get(patch_size)
        if cached is None or cached[0] != key:
            cached = (key, [a.merged_weights(b) for a, b in zip(adapters, self.blocks)])
            self._merged[patch_size] = cached
        return cached[1]

    def forward_with_cfg(self, x, t, y, cfg_scale: float, patch_size: int | None = None):
        """:meth:`DiT.forward_with_cfg` at ``patch_size``."""
        half = x[: len(x) // 2]
        out = self(torch.cat([half, half]), t, y, patch_size=patch_size)
        return guide_doubled_output(out, self.in_channels, cfg_scale)

    def sampling_cost(self, steps: int, method: str = "ddim", device="cpu") -> dict:
        """Sampled as a plain model, every step runs the native patch: the parent's cost."""
        return super().sampling_cost(steps, method, device)


# ---------------------------------------------------------------------------
# Sampling schedule
# ---------------------------------------------------------------------------


class PatchSchedule(ModelWrapper):
    """A FlexiDiT that picks its patch size from the timestep: a sampler's model.

    With ``total_steps`` S (the respaced process ``GaussianDiffusion().respaced(S)``, whose
    model timesteps are ``space_timesteps(1000, S)``), the ``coarse_steps`` k noisiest of
    those timesteps use ``coarse_patch``; the others use the native patch. The rule is a
    threshold on the model timestep (``t >= k-th largest``), so it is defined for any t.
    A batch mixing both sides is split. ``calls`` records ``(max t, patch)`` per forward
    (``"mixed"`` for a split batch); :meth:`reset` clears it.
    Usable wherever a DiT is sampled: ``GaussianDiffusion.sample`` (also with CFG),
    :func:`dydit_lab.evaluation.sampling.generate`, ``SampleEvaluator.evaluate``.
    """

    def __init__(self, model: FlexiDiT, coarse_steps: int, total_steps: int,
                 coarse_patch: int | None = None, num_timesteps: int = NUM_TIMESTEPS):
        if not isinstance(model, FlexiDiT):
            raise TypeError(f"PatchSchedule needs a FlexiDiT, got {type(model).__name__}")
        if not 0 <= coarse_steps <= total_steps:
            raise ValueError(f"coarse_steps must lie in [0, {total_steps}], got {coarse_steps}")
        super().__init__(model)
        self.coarse_patch = model._resolve_patch(coarse_patch or model.coarse_patches[0])
        self.coarse_steps, self.total_steps = coarse_steps, total_steps
        self.timesteps = sorted(space_timesteps(num_timesteps, total_steps), reverse=True)
        self.threshold = self.timesteps[coarse_steps - 1] if coarse_steps else None
        self.calls: list[tuple[int, int | str]] = []

    def patch_for(self, t: int) -> int:
        """The patch size used at model timestep ``t``."""
        coarse = self.threshold is not None and t >= self.threshold
        return self.coarse_patch if coarse else self.model.patch_size

    def reset(self) -> None:
        self.calls.clear()

    def forward(self, x, t, y):
        if self.threshold is None:
            coarse = torch.zeros_like(t, dtype=torch.bool)
        else:
            coarse = t >= self.threshold
        n_coarse = int(coarse.sum())
        t_max = int(t.max())
        if n_coarse == len(t):
            self.calls.append((t_max, self.coarse_patch))
            return self.model(x, t, y, patch_size=self.coarse_patch)
        if n_coarse == 0:
            self.calls.append((t_max, self.model.patch_size))
            return self.model(x, t, y)
        self.calls.append((t_max, "mixed"))
        out_c = self.model(x[coarse], t[coarse], y[coarse], patch_size=self.coarse_patch)
        out_n = self.model(x[~coarse], t[~coarse], y[~coarse])
        out = out_n.new_empty((len(t), *out_n.shape[1:]))
        out[coarse], out[~coarse] = out_c, out_n
        return out

    def sampling_cost(self, steps: int, method: str = "ddim", device="cpu") -> dict:
        """The exact mix of coarse and native steps (no sampling run needed)."""
        run = flops.schedule_flops(self.model.config, self.coarse_patch, self.coarse_steps, self.total_steps)
        return {"gflops_per_step": run["gflops_per_image_step"], "flops_fraction": run["flops_fraction"]}


def scheduled_model(model: FlexiDiT, coarse_steps: int, total_steps: int,
                    coarse_patch: int | None = None) -> PatchSchedule:
    """``PatchSchedule(model, coarse_steps, total_steps, coarse_patch)``: the first (noisiest)
    ``coarse_steps`` of ``total_steps`` sampling steps at the coarse patch."""
    return PatchSchedule(model, coarse_steps, total_steps, coarse_patch)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def flex_patches_in(state: dict) -> list[int]:
    """The extra patch sizes a state dict carries (from ``flex_embedders.<q>.proj.weight``)."""
    sizes = {int(k.split(".")[1]) for k in state if k.startswith("flex_embedders.")}
    return sorted(sizes)
