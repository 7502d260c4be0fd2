"""The analysis commands of ``python -m dydit_lab`` (registered by :mod:`dydit_lab.cli`):
``loss-per-t``, the paired noise-prediction loss of several checkpoints at every timestep, to a
CSV a notebook can read without the checkpoints (run folders are not committed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoints import load_model
from ..data import load_dataset
from ..diffusion import NUM_TIMESTEPS
from ..paths import resolve_device
from .loss_gap import loss_gap, per_timestep_loss


def parse_named_paths(items: list[str]) -> dict[str, str]:
    """``["parent=a.pt", "dydit=b.pt"]`` -> ``{"parent": "a.pt", "dydit": "b.pt"}``, in order."""
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--model {item!r}: expected NAME=PATH")
        if name in named:
            raise ValueError(f"--model: the name {name!r} is given twice")
        named[name] = path
    if len(named) < 2:
        raise ValueError("--model: need at least two (the first is the reference the others are compared with)")
    return named


def evenly_spaced_timesteps(count: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """``count`` timesteps spread over [0, num_timesteps), the middle of equal bins."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"--timesteps must be in [1, {num_timesteps}], got {count}")
    width = num_timesteps / count
    return [int(width * (i + 0.5)) for i in range(count)]


def cmd_loss_per_t(args):
    paths = parse_named_paths(args.model)
    device = resolve_device(args.device)
    models = {name: load_model(path, device=device) for name, path in paths.items()}
    images, labels = load_dataset(args.data, "val").tensors
    table = per_timestep_loss(models, images, labels, timesteps=evenly_spaced_timesteps(args.timesteps),
                              samples_per_t=args.samples_per_t, seed=args.seed, device=device,
                              progress=not args.quiet)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    reference, *others = paths
    print(f"wrote {args.out}: {len(table)} rows; loss relative to {reference!r} by quarter of t:")
    for name in others:
        gap = loss_gap(table, small=name, large=reference)
        # The mean of per-t ratios, not summarize_gap's ratio of means: within a quarter the
        # loss falls 100-fold, and a ratio of means would hide a blow-up at its noisy end.
        quarters = gap.groupby(np.arange(len(gap)) * 4 // len(gap))
        print(f"  {name}: " + "  ".join(f"t {int(q.t.min())}-{int(q.t.max())} {1 + q.relative_gap.mean():.2f}x"
                                       for _, q in quarters))


def add_commands(sub) -> None:
    """Add the analysis commands to the CLI's sub-parsers."""
    p = sub.add_parser("loss-per-t", help="paired noise-prediction loss of checkpoints per timestep (CSV)")
    p.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                   help="a checkpoint and its name in the CSV (repeat; the first is the reference)")
    p.add_argument("--out", required=True, help="the CSV: model, t, sample, mse")
    p.add_argument("--timesteps", type=int, default=20, help="evenly spaced timesteps")
    p.add_argument("--samples-per-t", type=int, default=32, help="validation images (and noises) per timestep")
    p.add_argument("--data", default="mnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_loss_per_t)
