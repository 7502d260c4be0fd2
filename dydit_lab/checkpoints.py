"""Every read and write of a checkpoint: official DiT / DyDiT weights, our training and
exported checkpoints, written atomically in one format and loaded by kind.

Kinds (recorded as ``args["kind"]`` by our writers, inferred from the weights otherwise):
``dit``, ``dydit`` (router weights present) and ``flexidit`` (``flex_*`` weights present).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .models.adapters import lora_rank_in
from .models.configs import DIT_CONFIGS, get_config
from .models.dit import DiT
from .models.dydit import DyDiT, is_router_key
from .models.flexidit import FLEX_PREFIX, FlexiDiT, flex_patches_in
from .models.routers import set_router_release



class CheckpointError(ValueError):
    """A checkpoint that does not fit the requested architecture."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``; official checkpoints' ``argparse.Namespace``
    is allow-listed instead of unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt file or a pickle with foreign objects
            raise CheckpointError(f"cannot read {path} as a weights-only checkpoint: {_load_reason(err)}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint")
    return obj


def _load_reason(err: Exception) -> str:
    """One sentence of torch.load's error: its several-paragraph weights-only message names the
    actual cause in an ``Unsupported ...`` sentence; other errors (a junk file) say it first."""
    text = str(err).strip() or type(err).__name__
    start = text.find("Unsupported")
    return text[max(start, 0):].splitlines()[0].split(". ")[0]


def split_checkpoint(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, args) from a raw state dict or a ``{"model", "ema", "opt", "args"}`` checkpoint.

    The EMA weights are preferred: they are what the official code samples from.
    """
    args = obj.get("args", {})
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    for key in ("ema", "model"):
        if key in obj and isinstance(obj[key], dict):
            return _strip_prefixes(obj[key]), dict(args or {})
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefixes(obj), {}
    raise CheckpointError(
        f"not a state dict nor a training checkpoint: top-level keys {sorted(obj)[:8]}")


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def infer_options(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Data-dependent constructor options read off the weights' shapes."""
    opts: dict[str, Any] = {}
    if "x_embedder.proj.weight" in state:
        w = state["x_embedder.proj.weight"]
        opts["in_channels"], opts["patch_size"] = w.shape[1], w.shape[2]
        if "pos_embed" in state:
            grid = int(round(state["pos_embed"].shape[1] ** 0.5))
            opts["input_size"] = grid * w.shape[2]
        if "final_layer.linear.weight" in state:
            out_channels = state["final_layer.linear.weight"].shape[0] // w.shape[2] ** 2
            opts["learn_sigma"] = out_channels == 2 * w.shape[1]
    if "y_embedder.embedding_table.weight" in state:
        # The table has one extra row (the CFG null class) when trained with label dropout.
        opts["num_classes"] = state["y_embedder.embedding_table.weight"].shape[0] - 1
    return opts


def _arch_from_args(args: dict[str, Any]) -> str | None:
    return args.get("arch") or args.get("model")


def official_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The official DiT preset (``DiT-XL/2`` ... ``DiT-S/8``) whose depth, width and patch size
    a state dict has, or None. Released checkpoints are raw state dicts that record no arch;
    the 12 presets differ in those three numbers, so the shapes name one (lab presets are
    not matched: our own checkpoints record their arch)."""
    w = state.get("x_embedder.proj.weight")
    if w is None or w.ndim != 4:
        return None
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    for name, cfg in DIT_CONFIGS.items():
        if "lab" not in name and (cfg.depth, cfg.hidden_size, cfg.patch_size) == (depth, w.shape[0], w.shape[2]):
            return name
    return None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """Raise one :class:`CheckpointError` naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {arch} ({model.config}):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))


def router_release(state: dict[str, torch.Tensor], num_heads: int) -> str:
    """Which DyDiT release a state dict's TDW routers follow, by their output size: H - 1
    (``"2025"``, alibaba-damo-academy/DyDiT: unit 0 always on) or H (``"2024"``,
    NUS-HPC-AI-Lab's ``dydit_0.7.pth``: a gate per unit). Any other size, or a mix of the
    two, is a :class:`CheckpointError` naming the key."""
    accepted = {num_heads - 1: "2025", num_heads: "2024"}
    found = {}
    for key, value in sorted(state.items()):
        if key.endswith(("attn_rate.router.weight", "mlp_rate.router.weight")):
            if value.ndim != 2 or value.shape[0] not in accepted:
                raise CheckpointError(
                    f"{key} has shape {tuple(value.shape)}; a DyDiT router with {num_heads} heads is "
                    f"({num_heads - 1}, D) (2025 release) or ({num_heads}, D) (December 2024 release)")
            found.setdefault(accepted[value.shape[0]], key)
    if len(found) > 1:
        raise CheckpointError(f"routers of both DyDiT releases in one checkpoint: {found['2025']} has "
                              f"{num_heads - 1} outputs, {found['2024']} has {num_heads}")
    return next(iter(found), "2025")


def _match_router_release(model: DyDiT, state: dict[str, torch.Tensor], arch: str) -> None:
    """Give ``model`` the routers of the release ``state`` follows. A router of neither shape is
    reported with every other misfit of the state dict (a wrong arch shows as such)."""
    try:
        release = router_release(state, model.config.num_heads)
    except CheckpointError as router_err:
        try:
            check_state_dict(model, state, arch)
        except CheckpointError as err:
            raise CheckpointError(f"{err}\n  {router_err}") from None
        raise
    set_router_release([r for b in model.blocks for r in (b.attn_rate, b.mlp_rate)], release)


def load_model(path_or_state_dict, arch: str | None = None, input_size: int | None = None,
               in_channels: int | None = None, num_classes: int | None = None,
               learn_sigma: bool | None = None, device: str | torch.device = "cpu") -> DiT:
    """Load a DiT (or a DyDiT, when router weights are present) in eval mode.

    ``path_or_state_dict``: a path or an already loaded object; either a raw state dict
    (like the official ``DiT-XL-2-256x256.pt``) or a training checkpoint
    ``{"model", "ema", "opt", "args"}`` (its ``ema`` weights are used). ``arch`` defaults to
    the one recorded in the checkpoint's args, else the official preset its shapes fit
    (:func:`official_arch`); the other options, when not given, come from
    the recorded config or are read off the weights' shapes. A DyDiT's routers may follow
    either official release (:func:`router_release`).
    """
    obj = path_or_state_dict if isinstance(path_or_state_dict, dict) else read_checkpoint(path_or_state_dict)
    state, args = split_checkpoint(obj)
    if checkpoint_kind(state) == "flexidit":
        return load_flexidit(obj, arch=arch, device=device, input_size=input_size,
                             in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma)
    arch = arch or _arch_from_args(args) or official_arch(state)
    if arch is None:
        raise CheckpointError("the checkpoint records no architecture and its shapes fit no official DiT: "
                              "pass arch=, e.g. 'DiT-XL/2'")
    options = infer_options(state)
    options.pop("patch_size", None)  # fixed by the arch; a mismatch is reported as a shape error
    recorded = args.get("model_config") or {}
    options.update({k: v for k, v in recorded.items() if k in ("input_size", "in_channels",
                                                               "num_classes", "learn_sigma")})
    explicit = {"input_size": input_size, "in_channels": in_channels, "num_classes": num_classes,
                "learn_sigma": learn_sigma}
    options.update({k: v for k, v in explicit.items() if v is not None})
    try:
        config = get_config(arch, **options)
    except (ValueError, TypeError) as err:
        raise CheckpointError(str(err)) from err
    model = (DyDiT if checkpoint_kind(state) == "dydit" else DiT)(config, arch=arch)
    if isinstance(model, DyDiT):
        _match_router_release(model, state, arch)
    check_state_dict(model, state, arch)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


def export_checkpoint(src: str | Path, dst: str | Path, fp16: bool = True, weights: str = "ema") -> Path:
    """Shrink a training checkpoint to one set of weights (fp16 by default) for committing.

    ``weights``: "ema" (default, what one samples from) or "model" (the online weights:
    better than an EMA that has not caught up yet early in a run).
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    obj = read_checkpoint(src)
    if weights == "model":
        if "model" not in obj:
            raise CheckpointError(f"{src} holds no online 'model' weights")
        obj = {"model": obj["model"], "args": obj.get("args", {}), "step": obj.get("step")}
    state, args = split_checkpoint(obj)
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    keep = {k: v for k, v in args.items() if isinstance(v, (str, int, float, bool, dict, type(None)))}
    keep["step"] = obj.get("step", args.get("step"))
    keep["weights"] = weights
    atomic_save({"ema": state, "args": keep}, dst)
    return Path(dst)


def checkpoint_kind(state: dict[str, torch.Tensor]) -> str:
    """``flexidit``, ``dydit`` or ``dit``, read off a state dict's keys."""
    if any(k.startswith(FLEX_PREFIX) for k in state):
        return "flexidit"
    if any(is_router_key(k) for k in state):
        return "dydit"
    return "dit"


def load_flexidit(path_or_obj, arch: str | None = None, device: str | torch.device = "cpu",
                  **options) -> FlexiDiT:
    """Load a FlexiDiT checkpoint (path, or an already read checkpoint / state dict), eval mode.

    The native part is built exactly as :func:`load_model` builds a DiT (recorded arch and
    config, options read off the weights; ``options`` as there); the extra patch sizes and the
    adapter rank are read off the ``flex_*`` keys. EMA weights are preferred.
    """
    obj = path_or_obj if isinstance(path_or_obj, dict) else read_checkpoint(path_or_obj)
    state, args = split_checkpoint(obj)
    patches = flex_patches_in(state)
    if not patches:
        raise ValueError("not a FlexiDiT checkpoint: no flex_embedders.<patch> weights")
    native = {k: v for k, v in state.items() if not k.startswith(FLEX_PREFIX)}
    dit = load_model({"ema": native, "args": args}, arch=arch, **options)
    model = FlexiDiT(dit.config, arch=dit.arch, coarse_patches=patches,
                     resize=args.get("resize", "bilinear"), pos=args.get("pos", "center"),
                     lora_rank=lora_rank_in(state))
    check_state_dict(model, state, dit.arch)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def atomic_save(obj, path: str | Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_training_checkpoint(path: str | Path, model: DiT, ema: DiT, opt: torch.optim.Optimizer,
                             config, step: int, **extra) -> None:
    """The one resumable checkpoint format: ``{"model", "ema", "opt", "args", "step"}``.

    ``args`` holds the run's config (a dataclass), the model's arch, config and kind, and
    ``extra`` (e.g. FlexiDiT's patch sizes), so :func:`load_model` rebuilds the model alone.
    """
    args = dataclasses.asdict(config) | {"arch": model.arch, "model_config": dataclasses.asdict(model.config),
                                         "kind": checkpoint_kind(model.state_dict())} | extra
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "args": args, "step": step}, path)
