"""The caching commands of ``python -m dydit_lab`` (registered by :mod:`dydit_lab.cli`):
``calibrate-teacache`` (TeaCache's polynomial, JSON) and ``train-cache-router`` (an L2C router).
Both write to ``data/caching/`` by default, where cache specs look for their files."""

from __future__ import annotations

from ..checkpoints import load_model
from ..paths import resolve_device
from .calibration import calibrate_teacache, save_coefficients
from .l2c import save_router, train_cache_router
from .spec import CACHE_DIR


def _arch_name(arch: str | None) -> str:
    return (arch or "model").replace("/", "-")


def cmd_calibrate_teacache(args):
    device = resolve_device(args.device)
    result = calibrate_teacache(load_model(args.parent, device=device), steps=args.steps,
                                num_samples=args.num_samples, runs=args.runs, seed=args.seed, device=device)
    result["parent"] = str(args.parent)
    path = save_coefficients(args.out or CACHE_DIR / f"teacache-{_arch_name(result['arch'])}.json", result)
    print(f"wrote {path}: coefficients {result['coefficients']} (rms error {result['rms_error']:.3g})")


def cmd_train_cache_router(args):
    device = resolve_device(args.device)
    router = train_cache_router(load_model(args.parent, device=device), steps=args.steps,
                                num_samples=args.num_samples, iterations=args.iterations, l1=args.l1,
                                seed=args.seed, device=device, progress=not args.quiet)
    router["parent"] = str(args.parent)
    path = save_router(args.out or CACHE_DIR / f"l2c-{_arch_name(router['arch'])}-{args.steps}.pt", router)
    print(f"wrote {path}: final MSE {router['final_mse']:.3g} after {router['iterations']} iterations "
          f"({router['seconds']:.0f} s)")


def add_commands(sub) -> None:
    """Add the caching commands to the CLI's sub-parsers."""
    p = sub.add_parser("calibrate-teacache", help="fit TeaCache's rescaling polynomial on a model (JSON)")
    p.add_argument("--parent", required=True, help="the checkpoint to calibrate on")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=16, help="images per sampling run")
    p.add_argument("--runs", type=int, default=2, help="sampling runs (seeds --seed, --seed + 1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="(default: data/caching/teacache-<arch>.json)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_calibrate_teacache)

    p = sub.add_parser("train-cache-router", help="train a Learning-to-Cache router on a frozen model")
    p.add_argument("--parent", required=True, help="the checkpoint (frozen)")
    p.add_argument("--steps", type=int, default=50, help="the sampling steps the router is for")
    p.add_argument("--num-samples", type=int, default=32, help="sampling trajectories to learn from")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--l1", type=float, default=1e-3, help="weight of the push towards reuse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="(default: data/caching/l2c-<arch>-<steps>.pt)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_cache_router)
