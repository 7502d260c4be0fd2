"""FlexiDiT (Anagnostidis et al., CVPR 2025): one DiT, several patch sizes.

A pre-trained DiT is "flexified": every transformer weight (blocks, t/y embedders, the final
layer's norm and adaLN) is shared, and each extra patch size q gets only its own lightweight
tokenizer and de-tokenizer, i.e. a patch embedding (a q x q strided conv) and a final-layer
linear (hidden -> q*q*out_channels), plus a fixed position table for its coarser grid. After
a short fine-tune the model runs a coarse patch (4x fewer tokens for q = 2p: a "weak" but
cheap model) in the early, noisy sampling steps, where it predicts almost what the native
("powerful") patch would, and the native patch in the late steps that add the details.

What the paper says (checked against the arXiv v1 text, 2502.20126: section numbers below are
the paper's) and what we follow:

* Shared weights (Sec. 3.1; Sec. 4.1 for the ImageNet DiT-XL/2): when the training data is
  at hand the paper fine-tunes one set of transformer weights for all patch sizes, no LoRA;
  only the tokenizer / de-tokenizer change with the patch size (Fig. 4). Done: new
  parameters live under ``flex_embedders.<q>``, ``flex_final.<q>`` and ``flex_pos_embed.<q>``;
  the native path keeps the official state-dict keys and runs the parent's code, so it is
  numerically identical to the parent DiT. Sec. 3.1 also adds a learned patch-size
  embedding to every token: done, ``flex_size_embed.<q>`` (zero at init). Not done: its
  patch-size-dependent layer norms (DiT's norms have no affine parameters to specialise;
  adaLN supplies the scale and shift for every size alike); and for
  the class-conditional model it keeps a single underlying embedding / de-embedding (kernel
  size p' = 4, App. C.2) projected to every patch size, where we keep separate layers per
  size (the LoRA variant of Sec. 3.2 also uses separate new layers per size).
* New embedding (Sec. 3.1): weights are projected with a fixed matrix that is the
  pseudo-inverse of the bilinear-interpolation projection, i.e. FlexiViT's PI-resize (Beyer
  et al. 2023), chosen for norm preservation; the bias is copied; the init is built from the
  pre-trained weights so that the pre-trained patch size keeps its function. Done, see
  :func:`pi_resize_kernel`: with B the resize operator from a p x p patch to a q x q patch,
  the new kernel is ``pinv(B^T) w``, so that ``<B z, w_new> = <z, w>`` for every p x p patch
  z when q > p: a coarse token of an image made of resized patches equals the native token
  of the original patch. ``resize="bilinear"`` (the paper's and FlexiViT's choice) or
  ``"nearest"`` (ours); with ``nearest`` and q = 2p the coarse embedding is exactly the
  native embedding of the 2x average-pooled image. Caveat: the paper writes the init as the
  pseudo-inverse of its p' -> p projection applied to the native kernel (a p'-kernel whose
  projection to p gives back w), not as a direct p -> q PI-resize; for bilinear the two give
  different (both native-preserving) coarse kernels, and the text does not pin down the
  resize details further.
* New de-embedding (Sec. 3.1): the same construction with the projection's dimensions
  flipped, applied to weights and bias. Ours: the resize applied to the output patch,
  ``W_new = B W`` (and the bias), so a coarse token's q x q output is the resized p x p output
  the native linear gives for the same token. With ``nearest`` and ``pos="grid"`` the whole
  coarse forward equals the native DiT run at half resolution on the pooled image,
  upsampled (tested).
* Position embeddings (Sec. 3.1, App. C.2): each patch gets the positional encoding of its
  pixel coordinates in the original image (following PixArt-alpha); the exact anchor
  (patch corner or centre) is shown only in a schematic. Ours, ``pos="center"`` (default):
  DiT's fixed 2-D sin-cos evaluated at each coarse token's centre in native-grid units,
  ``(i + 1/2) q/p - 1/2``. ``pos="grid"`` (the sin-cos table of the coarse grid itself, what a
  DiT built for a smaller image has) is not the paper's choice; kept as an ablation. Either
  is stored in the state dict (``requires_grad=False``, like ``pos_embed``).
* Fine-tuning, ImageNet (Sec. 4.1, App. B.1, B.4, C.2): the whole model is fine-tuned with
  DiT's own recipe (Table 4: lr 1e-4, no weight decay, EMA 0.9999 every step); each training
  example is noised as usual and denoised at one of the available patch sizes, and every
  patch size is trained over all timesteps (App. B.4 notes that training for one fixed
  schedule would do better). The ImageNet model also gets a bootstrapped
  distribution-matching (MMD) loss against exposure bias: a short chain of weak-then-powerful
  DDPM steps whose end samples are matched to noised real images (App. B.1); we do not
  implement it. Fine-tuning costs under 5% of pre-training compute (Sec. 3); no step count
  is given. Done in :func:`flexi_finetune`: coarse with probability ``p_coarse`` per batch
  (paper: not specified), stratified timesteps and min-SNR-weighted eps loss (ours; the
  paper uses DiT's loss), ``train="all"`` (default, the paper's ImageNet choice) or ``"new"``
  (only the new layers; not in the paper).
* Distillation (Sec. 3.2): used in the LoRA variant (frozen base, LoRAs of rank 32-64 on
  self-attention and MLP, text-to-image and video models), where the weak model is trained
  only to match the frozen pre-trained model's native prediction with an L2 loss; a few
  thousand images suffice (App. B.5). Ours: optional ``distill_weight`` adds that L2 term
  towards the frozen parent on coarse batches, on top of the diffusion loss; 0 by default.
* Sampling (Sec. 3.3): the weak model denoises the first T_weak steps from noise, the
  powerful one the remaining T - T_weak; the weak patch is 2x the native one. Weak-last is
  worse (App. B.4, Fig. 19). Not done: Sec. 3.4's guidance variant, in which the
  unconditional branch may stay weak longer than the conditional one and then guides with
  the weak conditional prediction. Reported for DiT-XL/2, ImageNet 256, 250 DDPM steps
  (Fig. 21 / App. B.4): FID-50k 2.25 at 100% and at 64% of the FLOPs (130 of 250 steps
  native), 2.64 at 46% (70 native) and 3.24 at ~29%; pre-trained DiT-XL/2: 2.27. The best
  CFG scale grows as more steps run weak (Fig. 6).

``python -m dydit_lab flexi-finetune --parent data/checkpoints/DiT-lab-L.pt --out runs/flexi-L``
``python -m dydit_lab flexi-flops --arch DiT-lab-L --coarse-patch 8 --steps 50 --coarse-steps 0,12,24,36``
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .diffusion import NUM_TIMESTEPS, GaussianDiffusion, min_snr_weights, space_timesteps
from .models import DiT, DiTConfig, PatchEmbed, _1d_sincos, get_2d_sincos_pos_embed, modulate

CHECKPOINT_NAME = "checkpoint.pt"
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
    learned patch-size token ``flex_size_embed.<q>`` and the fixed ``flex_pos_embed.<q>``.
    A freshly built model initialises them from its own
    (random) native layers; :meth:`from_dit` does so from a trained DiT.
    """

    def __init__(self, config: DiTConfig, arch: str | None = None,
                 coarse_patches: int | Iterable[int] | None = None,
                 resize: str = "bilinear", pos: str = "center"):
        super().__init__(config, arch=arch)
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if pos not in POS_MODES:
            raise ValueError(f"pos must be one of {POS_MODES}, got {pos!r}")
        self.resize, self.pos = resize, pos
        self.coarse_patches = _coarse_list(config, coarse_patches)
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
        self.init_flex_layers()

    @property
    def patch_sizes(self) -> tuple[int, ...]:
        return (self.patch_size, *self.coarse_patches)

    @classmethod
    def from_dit(cls, dit: DiT, coarse_patch: int | Iterable[int] | None = None,
                 resize: str = "bilinear", pos: str = "center") -> "FlexiDiT":
        """Flexify a trained DiT: its weights copied, new layers PI-resized from its own.

        ``coarse_patch``: one size or several (default 2 x native). The native path of the
        result equals ``dit`` exactly.
        """
        if type(dit) is not DiT and not isinstance(dit, FlexiDiT):
            raise TypeError(f"from_dit needs a static DiT, got {type(dit).__name__}")
        param = next(dit.parameters())
        model = cls(dit.config, arch=dit.arch, coarse_patches=coarse_patch, resize=resize, pos=pos)
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

    def new_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters the parent DiT does not have (embedders, final linears,
        patch-size tokens)."""
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
        return self.flex_final[str(patch_size)](modulate(final.norm_final(tokens), shift, scale))

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
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify_at(self.final_at(tokens, c, q), q)

    def forward_with_cfg(self, x, t, y, cfg_scale: float, patch_size: int | None = None):
        """:meth:`DiT.forward_with_cfg` at ``patch_size``."""
        if patch_size is None or int(patch_size) == self.patch_size:
            return super().forward_with_cfg(x, t, y, cfg_scale)
        return _PatchBound(self, int(patch_size)).forward_with_cfg(x, t, y, cfg_scale)


class _PatchBound(nn.Module):
    """A FlexiDiT with its patch size fixed (so DiT.forward_with_cfg can call forward)."""

    def __init__(self, model: FlexiDiT, patch_size: int):
        super().__init__()
        self.model, self.patch_size = model, patch_size
        self.in_channels, self.num_classes, self.config = model.in_channels, model.num_classes, model.config

    def forward(self, x, t, y):
        return self.model(x, t, y, patch_size=self.patch_size)

    forward_with_cfg = DiT.forward_with_cfg


def _coarse_list(config: DiTConfig, coarse_patches) -> tuple[int, ...]:
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


# ---------------------------------------------------------------------------
# Sampling schedule
# ---------------------------------------------------------------------------


class PatchSchedule(nn.Module):
    """A FlexiDiT that picks its patch size from the timestep: a sampler's model.

    With ``total_steps`` S (the respaced process ``GaussianDiffusion().respaced(S)``, whose
    model timesteps are ``space_timesteps(1000, S)``), the ``coarse_steps`` k noisiest of
    those timesteps use ``coarse_patch``; the others use the native patch. The rule is a
    threshold on the model timestep (``t >= k-th largest``), so it is defined for any t.
    A batch mixing both sides is split. ``calls`` records ``(max t, patch)`` per forward
    (``"mixed"`` for a split batch); :meth:`reset` clears it.
    Usable wherever a DiT is sampled: ``GaussianDiffusion.sample`` (also with CFG),
    :func:`dydit_lab.evaluation.generate`, ``SampleEvaluator.evaluate``.
    """

    def __init__(self, model: FlexiDiT, coarse_steps: int, total_steps: int,
                 coarse_patch: int | None = None, num_timesteps: int = NUM_TIMESTEPS):
        super().__init__()
        if not isinstance(model, FlexiDiT):
            raise TypeError(f"PatchSchedule needs a FlexiDiT, got {type(model).__name__}")
        if not 0 <= coarse_steps <= total_steps:
            raise ValueError(f"coarse_steps must lie in [0, {total_steps}], got {coarse_steps}")
        self.model = model
        self.coarse_patch = model._resolve_patch(coarse_patch or model.coarse_patches[0])
        self.coarse_steps, self.total_steps = coarse_steps, total_steps
        self.timesteps = sorted(space_timesteps(num_timesteps, total_steps), reverse=True)
        self.threshold = self.timesteps[coarse_steps - 1] if coarse_steps else None
        self.config, self.num_classes, self.in_channels = model.config, model.num_classes, model.in_channels
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

    # Guidance is the parent's, computed through this wrapper's forward.
    forward_with_cfg = DiT.forward_with_cfg


def scheduled_model(model: FlexiDiT, coarse_steps: int, total_steps: int,
                    coarse_patch: int | None = None) -> PatchSchedule:
    """``PatchSchedule(model, coarse_steps, total_steps, coarse_patch)``: the first (noisiest)
    ``coarse_steps`` of ``total_steps`` sampling steps at the coarse patch."""
    return PatchSchedule(model, coarse_steps, total_steps, coarse_patch)


# ---------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------


def schedule_flops(config, coarse_patch: int | None, coarse_steps: int, total_steps: int) -> dict:
    """Exact MACs (DiT convention, one image, one forward per step, no CFG doubling) of a
    sampling run whose ``coarse_steps`` noisiest of ``total_steps`` steps use ``coarse_patch``.

    A coarse forward costs exactly what :func:`dydit_lab.flops.analytic_flops` counts for the
    same config with ``patch_size`` replaced: its patch embedding (q x q conv on (H/q)^2
    tokens), blocks and norms on (H/q)^2 tokens, shared t-embedder and adaLN, its final linear
    (hidden -> q*q*out per token) and the same unpatchify charge. ``config``: a DiTConfig, a
    model with ``.config`` or a preset name; ``coarse_patch`` None/0: 2 x native.
    """
    from .flops import _as_config, analytic_flops

    cfg = _as_config(config)
    q = _coarse_list(cfg, coarse_patch)[0]
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
# Loading
# ---------------------------------------------------------------------------


def flex_patches_in(state: dict) -> list[int]:
    """The extra patch sizes a state dict carries (from ``flex_embedders.<q>.proj.weight``)."""
    sizes = {int(k.split(".")[1]) for k in state if k.startswith("flex_embedders.")}
    return sorted(sizes)


def load_flexidit(path_or_obj, arch: str | None = None, device: str | torch.device = "cpu",
                  **options) -> FlexiDiT:
    """Load a FlexiDiT checkpoint (path, or an already read checkpoint / state dict), eval mode.

    The native part is built exactly as :func:`dydit_lab.checkpoints.load_model` builds a DiT
    (recorded arch and config, options read off the weights; ``options`` as there); the
    extra patch sizes are read off the ``flex_*`` keys. EMA weights are preferred.
    """
    from .checkpoints import check_state_dict, load_model, read_checkpoint, split_checkpoint

    obj = path_or_obj if isinstance(path_or_obj, dict) else read_checkpoint(path_or_obj)
    state, args = split_checkpoint(obj)
    patches = flex_patches_in(state)
    if not patches:
        raise ValueError("not a FlexiDiT checkpoint: no flex_embedders.<patch> weights")
    native = {k: v for k, v in state.items() if not k.startswith(FLEX_PREFIX)}
    dit = load_model({"ema": native, "args": args}, arch=arch, **options)
    model = FlexiDiT(dit.config, arch=dit.arch, coarse_patches=patches,
                     resize=args.get("resize", "bilinear"), pos=args.get("pos", "center"))
    check_state_dict(model, state, dit.arch)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def _load_parent(path) -> DiT:
    from .checkpoints import load_model, read_checkpoint, split_checkpoint

    obj = read_checkpoint(path)
    state, _ = split_checkpoint(obj)
    if flex_patches_in(state):
        return load_flexidit(obj)
    return load_model(obj)


# ---------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------


@dataclass
class FlexiFinetuneConfig:
    """Options of :func:`flexi_finetune` (each is a ``--flag`` of ``flexi-finetune``)."""

    parent: str = "data/checkpoints/DiT-lab-L.pt"  # the trained DiT to flexify
    out: str = "runs/flexi-L"
    data: str = "mnist"
    coarse_patch: int = 0  # 0: 2 x the parent's patch
    p_coarse: float = 0.5  # probability that a batch runs at the coarse patch
    steps: int = 1200  # 10 % of DiT-lab-L's pre-training, the same budget as a DyDiT fine-tune
    batch_size: int = 64
    lr: float = 1e-4  # shared (parent) weights
    new_lr: float = 1e-3  # the new embedding / de-embedding layers start from a resize
    train: str = "all"  # all: every weight; new: only the new layers (transformer frozen, every batch coarse)
    resize: str = "bilinear"  # PI-resize operator: bilinear (FlexiViT) or nearest
    pos: str = "center"  # coarse positions: center (sin-cos at patch centres) or grid
    uniform_timesteps: bool = False  # default: stratified over four equal bands
    coarse_t_min: int = 0  # coarse batches draw t in [coarse_t_min, 1000) (paper, App. B.4: all t)
    distill_weight: float = 0.0  # + w * |coarse eps - frozen parent's native eps|^2
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_minutes: float = 4.0
    device: str = "auto"
    resume: bool = False  # go on from OUT/checkpoint.pt


def _validate(cfg: FlexiFinetuneConfig) -> None:
    if not 0 <= cfg.p_coarse <= 1:
        raise ValueError(f"p_coarse must lie in [0, 1], got {cfg.p_coarse}")
    if cfg.train not in ("all", "new"):
        raise ValueError(f"train must be 'all' or 'new', got {cfg.train!r}")
    if not 0 <= cfg.coarse_t_min < NUM_TIMESTEPS:
        raise ValueError(f"coarse_t_min must lie in [0, {NUM_TIMESTEPS}), got {cfg.coarse_t_min}")
    if cfg.distill_weight < 0:
        raise ValueError(f"distill_weight must be >= 0, got {cfg.distill_weight}")


def _timesteps(cfg: FlexiFinetuneConfig, batch: int, low: int, gen: torch.Generator) -> torch.Tensor:
    """Timesteps in [low, 1000): stratified over four equal bands, or uniform."""
    span = NUM_TIMESTEPS - low
    if cfg.uniform_timesteps or span < 4:
        return low + torch.randint(span, (batch,), generator=gen)
    band = span // 4
    offsets = (torch.arange(batch) % 4) * band
    return low + offsets + torch.randint(band, (batch,), generator=gen)


def flexi_finetune(cfg: FlexiFinetuneConfig) -> Path:
    """Fine-tune a DiT (or resume a FlexiDiT run) and return the checkpoint path.

    Each step draws one patch size for the batch (coarse with probability ``p_coarse``), then
    timesteps, noise and the min-SNR-weighted eps loss as in training. AdamW with ``lr`` on
    the parent's weights and ``new_lr`` on the new layers, EMA, resumable ``out/checkpoint.pt``
    (``{"model", "ema", "opt", "args", "step"}``), one ``log.csv`` row per step.
    """
    from .data import load_dataset
    from .training import append_log, optimizer_step, resolve_device, restore_or_refuse

    _validate(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    parent = _load_parent(cfg.parent)
    teacher = None
    if cfg.distill_weight > 0:
        teacher = copy.deepcopy(parent).requires_grad_(False).eval().to(device)
    if isinstance(parent, FlexiDiT):
        model = parent
    else:
        model = FlexiDiT.from_dit(parent, coarse_patch=cfg.coarse_patch or None,
                                  resize=cfg.resize, pos=cfg.pos)
    model = model.to(device)
    q = model.coarse_patches[0] if not cfg.coarse_patch else model._resolve_patch(cfg.coarse_patch)
    new = model.new_parameters()
    new_ids = set(map(id, new))
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in new_ids]
    if cfg.train == "new":
        for p in shared:
            p.requires_grad_(False)
        groups = [{"params": new, "lr": cfg.new_lr}]
    else:
        groups = [{"params": shared, "lr": cfg.lr}, {"params": new, "lr": cfg.new_lr}]
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    step = restore_or_refuse(ckpt_path, cfg.resume, model, ema, opt, device)

    dataset = load_dataset(cfg.data, "train") if cfg.data == "mnist" else load_dataset(
        cfg.data, image_size=model.config.input_size, channels=model.in_channels)
    images, labels = (x.to(device) for x in dataset.tensors)
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step * 7919)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.txt").write_text(repr(cfg) + "\n")
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"flexi-finetune p={model.patch_size}/{q}")
    last_save = time.time()
    # With the transformer frozen a native batch has nothing to train: every batch is coarse.
    p_coarse = 1.0 if cfg.train == "new" else cfg.p_coarse
    while step < cfg.steps:
        coarse = bool(torch.rand((), generator=gen) < p_coarse)
        patch = q if coarse else model.patch_size
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen).to(device)
        x0, y = images[idx], labels[idx]
        t = _timesteps(cfg, cfg.batch_size, cfg.coarse_t_min if coarse else 0, gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        weights = (min_snr_weights(diffusion.alphas_cumprod, t.cpu(), cfg.min_snr_gamma).float().to(device)
                   if cfg.min_snr_gamma > 0 else None)
        x_t = diffusion.q_sample(x0, t, noise)
        output = model(x_t, t, y, patch_size=patch)
        diff = diffusion.losses_from_output(output, x0, x_t, t, noise, weights)["loss"].mean()
        loss, distill = diff, torch.zeros(())
        if teacher is not None and coarse:
            with torch.no_grad():
                target = teacher(x_t, t, y)[:, : model.in_channels]
            distill = ((output[:, : model.in_channels] - target) ** 2).mean()
            loss = loss + cfg.distill_weight * distill
        optimizer_step(loss, [p for g in groups for p in g["params"]], opt, cfg.grad_clip, ema, model,
                       cfg.ema_decay)
        step += 1
        bar.update(1)
        bar.set_postfix(patch=patch, loss=f"{diff.item():.4f}")
        append_log(out / "log.csv", {"step": step, "patch": patch, "loss": diff.item(),
                                     "distill": distill.item(), "time": f"{time.time():.0f}"})
        if time.time() - last_save > 60 * cfg.ckpt_minutes or step == cfg.steps:
            save_flexi_checkpoint(ckpt_path, model, ema, opt, cfg, step)
            last_save = time.time()
    bar.close()
    return ckpt_path


def save_flexi_checkpoint(path, model: FlexiDiT, ema: FlexiDiT, opt, cfg: FlexiFinetuneConfig,
                          step: int) -> None:
    """The resumable checkpoint; ``args`` record arch, config and the patch sizes."""
    from .training import atomic_save

    args = dataclasses.asdict(cfg) | {
        "arch": model.arch, "model_config": dataclasses.asdict(model.config), "kind": "flexidit",
        "coarse_patches": list(model.coarse_patches), "resize": model.resize, "pos": model.pos}
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "args": args, "step": step}, path)


__all__ = [
    "FlexiDiT", "PatchSchedule", "scheduled_model", "schedule_flops", "load_flexidit",
    "FlexiFinetuneConfig", "flexi_finetune", "pi_resize_kernel", "resize_matrix",
    "resize_output_linear", "coarse_pos_embed", "sincos_pos_embed_at", "flex_patches_in",
    "save_flexi_checkpoint",
]
