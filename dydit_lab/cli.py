"""Command line: ``python -m dydit_lab <command> ...`` (``--help`` on each command)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys

from .analysis.commands import add_commands as add_analysis_commands
from .bench.checkpoint import checkpoint_sweep
from .bench.profile import PROFILE_KINDS, describe_profile, profile_checkpoint, run_profile
from .bench.run import median_of_runs, parse_batch_list, run_benchmark, run_sweep, sweep_name, warn_noise, write_csv
from .caching.commands import add_commands as add_caching_commands
from .checkpoints import export_checkpoint, load_model
from .data import mnist_split
from .evaluation.commands import add_classifier_flags, evaluator_from_args
from .evaluation.commands import add_commands as add_classifier_commands
from .evaluation.report import classifier_files, count_flops_report, evaluate_checkpoint
from .evaluation.results import record_result
from .evaluation.strategies import compare_strategies
from .models.flops import schedule_flops
from .models.configs import get_config
from .models.dydit import DyDiT, sampling_flops
from .official.latents import extract_latents
from .official.sample import sample_to_files
from .paths import BENCH_DIR, CHECKPOINT_DIR, FIGURES_DIR, RESULTS_CSV, resolve_device
from .sweep import parse_only, read_spec, run_spec
from .training.dydit import FinetuneConfig, finetune
from .training.flexidit import FlexiFinetuneConfig, flexi_finetune
from .training.pretrain import TrainConfig, train
from .viz.figures import build_figures, describe


def _field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each dataclass field (the subclass's wins): the config's
    own explanation."""
    comments: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        lines = inspect.getsource(klass).splitlines()
        found = (re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line) for line in lines)
        comments.update({m.group(1): m.group(2) for m in found if m})
    return comments


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field, typed and defaulted by the field, its comment as help."""
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        note = comments.get(field.name, "").replace("%", "%%")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=field.default, help=note or None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), field.type)
            parser.add_argument(flag, type=kind, default=field.default,
                                help=f"{note} (default: {field.default})".strip())


def _dataclass_from(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _print_checkpoint(path) -> None:
    """The run's checkpoint path, said once: by rank 0 under torchrun."""
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {path}")


def cmd_train(args):
    _print_checkpoint(train(_dataclass_from(args, TrainConfig)))


def cmd_export(args):
    print(f"wrote {export_checkpoint(args.checkpoint, args.out, fp16=not args.fp32, weights=args.weights)}")


def cmd_evaluate(args):
    device = resolve_device(args.device)
    evaluator = evaluator_from_args(args, device)
    if args.checkpoint == "real-val":  # the floor: real validation digits vs the train split
        metrics = {"checkpoint": "real-val", "bootstrap": args.bootstrap, **classifier_files(evaluator),
                   **evaluator.score(*mnist_split("val").tensors, bootstrap=args.bootstrap)}
    else:
        metrics = evaluate_checkpoint(args.checkpoint, num_samples=args.num_samples, steps=args.steps,
                                      method=args.method, cfg_scale=args.cfg_scale, seed=args.seed,
                                      coarse_steps=args.coarse_steps, complete_model=args.complete_model,
                                      complete_from_t=args.complete_from_t, evaluator=evaluator,
                                      device=device, bootstrap=args.bootstrap, cache=args.cache)
    print(json.dumps(metrics))
    if args.results:
        record_result(args.results, {**metrics, "name": args.name or args.checkpoint})


def cmd_compare(args):
    table = compare_strategies(args.only, num_samples=args.num_samples, seed=args.seed,
                               checkpoint_dir=args.checkpoint_dir, results=args.results,
                               timing_rounds=args.timing_rounds, timing_samples=args.timing_samples,
                               quality=not args.timing_only, bootstrap=args.bootstrap,
                               device=resolve_device(args.device))
    columns = ["name", "gflops_per_image", "seconds_per_image", "fd_lenet", "accuracy"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def cmd_finetune(args):
    _print_checkpoint(finetune(_dataclass_from(args, FinetuneConfig)))


def cmd_flops(args):
    if args.checkpoint:
        device = resolve_device(args.device)
        model = load_model(args.checkpoint, device=device)
        if not isinstance(model, DyDiT):
            raise ValueError(f"{args.checkpoint} is a static DiT: use --arch for its FLOPs")
        report = sampling_flops(model, steps=args.steps, num_samples=args.num_samples,
                                method=args.method, device=device, progress=not args.json)
        report["checkpoint"] = args.checkpoint
    elif args.arch:
        report = count_flops_report(args.arch, input_size=args.input_size)
    else:
        raise ValueError("give --arch (static count) or --checkpoint (dynamic count of a DyDiT)")
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>16}: {value}")


def cmd_figures(args):
    print(describe(build_figures(args.out, only=args.only, device=args.device)))


def cmd_bench(args):
    common = dict(input_size=args.input_size, target_ratio=args.target_ratio, steps=args.steps, repeats=args.repeats,
                  device=args.device, seed=args.seed, keep_rate=args.keep_rate, threads=args.threads,
                  verbose=not args.quiet, plan_conditioning=not args.per_step_conditioning)
    def measured(measure):  # --runs separate measurements, one row per batch size from the median run
        return warn_noise(median_of_runs([measure() for _ in range(args.runs)]))

    if bool(args.arch) == bool(args.checkpoint):
        raise ValueError("give --arch (random weights, routers set to --target-ratio) or --checkpoint "
                         "(a trained DyDiT on its own sampling run), not both")
    if args.profile:
        if args.runs != 1 or args.sweep_batch:
            raise ValueError("--profile is one pass at one --batch-size; --runs and --sweep-batch are for timing")
        result = (profile_checkpoint(load_model(args.checkpoint, device=resolve_device(args.device)),
                                     batch_size=args.batch_size, steps=args.steps, seed=args.seed, device=args.device,
                                     threads=args.threads, name=os.path.splitext(os.path.basename(args.checkpoint))[0],
                                     kind=args.profile, repeats=args.repeats)
                  if args.checkpoint else
                  run_profile(args.arch, input_size=args.input_size, target_ratio=args.target_ratio,
                              batch_size=args.batch_size, steps=args.steps, device=args.device, seed=args.seed,
                              threads=args.threads, kind=args.profile, repeats=args.repeats))
        print(describe_profile(result))
    elif args.checkpoint:
        batches = parse_batch_list(args.sweep_batch or str(args.batch_size))
        rows = measured(lambda: checkpoint_sweep(args.checkpoint, batches, steps=args.steps, repeats=args.repeats,
                                                 device=args.device, threads=args.threads, progress=not args.quiet,
                                                 plan_conditioning=common["plan_conditioning"]))
        if args.sweep_batch:
            name = args.name or f"{rows[0]['device']}_{rows[0]['name']}_sweep".replace("-", "_").lower()
            print(f"wrote {write_csv(rows, BENCH_DIR / 'lab' / (name + '.csv'))}")
            result = rows
        else:
            result = rows[0]
            print(json.dumps(result, indent=1))
    elif args.sweep_batch:
        batches = parse_batch_list(args.sweep_batch)
        rows = measured(lambda: run_sweep(args.arch, batches, **common))
        name = args.name or sweep_name(args.arch, rows[0]["device"], args.target_ratio)
        print(f"wrote {write_csv(rows, BENCH_DIR / (name + '.csv'))}")
        result = rows
    else:
        result = measured(lambda: [run_benchmark(args.arch, batch_size=args.batch_size, **common)])[0]
        print(json.dumps(result, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


def cmd_sweep(args):
    spec = read_spec(args.spec)
    rows = run_spec(spec, dry_run=args.dry_run, device=resolve_device(args.device), only=parse_only(args.only, spec))
    if not args.dry_run:
        print(f"{len(rows)} new result row(s)")


def cmd_flexi_finetune(args):
    _print_checkpoint(flexi_finetune(_dataclass_from(args, FlexiFinetuneConfig)))


def cmd_flexi_flops(args):
    cfg = get_config(args.arch, **({"input_size": args.input_size} if args.input_size else {}))
    ks = [int(k) for k in args.coarse_steps.split(",") if k.strip()]
    rows = [schedule_flops(cfg, args.coarse_patch or None, k, args.steps) for k in ks]
    if args.json:
        print(json.dumps({"arch": args.arch, "input_size": cfg.input_size, "schedules": rows}))
        return
    first = schedule_flops(cfg, args.coarse_patch or None, 0, args.steps)
    print(f"{args.arch}: patch {first['native_patch']} {first['native_gflops']:.6f} GFLOPs, "
          f"patch {first['coarse_patch']} {first['coarse_gflops']:.6f} GFLOPs per image per step")
    print(f"{'coarse steps':>12} {'GFLOPs/step':>12} {'GFLOPs/image':>13} {'fraction':>9}")
    for r in rows:
        print(f"{r['coarse_steps']:>5} / {r['total_steps']:<4} {r['gflops_per_image_step']:>12.6f} "
              f"{r['total_gflops']:>13.6f} {r['flops_fraction']:>9.4f}")


def cmd_sample(args):
    summary = sample_to_files(args.checkpoint, args.out, arch=args.arch, vae=args.vae, classes=args.classes,
                              num_samples=args.num_samples, steps=args.steps, method=args.method,
                              cfg_scale=args.cfg_scale, seed=args.seed, batch_size=args.batch_size,
                              device=args.device, out_dir=args.out_dir, npz=args.npz, progress=not args.json)
    if os.environ.get("RANK", "0") != "0":
        return
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{summary['num_samples']} images of {summary['model']} {summary['arch']} on {summary['processes']} "
          f"process(es): grid {summary['out']}" + "".join(f", {k} {summary[k]}" for k in ("out_dir", "npz")
                                                         if k in summary))
    print(f"FLOPs fraction (measured, of the static DiT): {summary['flops_fraction']:.4f}")
    print(f"seconds per image: {summary['seconds_per_image']:.4g}")


def cmd_extract_latents(args):
    manifest = extract_latents(args.images, args.vae, args.out, image_size=args.image_size,
                               batch_size=args.batch_size, device=args.device, seed=args.seed)
    if os.environ.get("RANK", "0") == "0":
        print(f"{manifest['num_latents']} latents {tuple(manifest['shape'])} of {len(manifest['classes'])} "
              f"classes in {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dydit_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DiT (resumable; DDP under torchrun)")
    _add_dataclass_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    add_classifier_commands(sub)  # train-classifier, rescore

    p = sub.add_parser("export", help="shrink a training checkpoint to fp16 EMA weights")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="EMA (default) or the online weights (better early in a run)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="class accuracy and FD-LeNet of generated digits")
    p.add_argument("--checkpoint", required=True,
                   help="a model checkpoint, or real-val to score the real validation digits (the floor)")
    add_classifier_flags(p)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--method", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coarse-steps", type=int,
                   help="FlexiDiT only: run the first k of --steps steps at the coarse patch")
    p.add_argument("--complete-model", action="store_true",
                   help="DyDiT only: every head, group and token on (the fine-tuned weights at full cost)")
    p.add_argument("--complete-from-t", type=int, default=0,
                   help="with --complete-model: gates on only at timesteps >= T, routed below "
                        "(which noise levels the routing's quality cost comes from)")
    p.add_argument("--cache", help="feature-caching policy, e.g. fora:2, teacache:0.1,coef=FILE, "
                   "toca:0.3,interval=3 (dydit_lab.caching.spec)")
    p.add_argument("--bootstrap", type=int, default=500,
                   help="bootstrap rounds for 95%% intervals of FD-LeNet and accuracy (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--results", help="append the metrics to this CSV (e.g. data/results.csv)")
    p.add_argument("--name", help="row name in --results (default: the checkpoint path)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="quality vs GFLOPs and wall-clock of static steps, DyDiT, "
                       "FlexiDiT and feature caching (notebook 05); rows go to data/results.csv")
    p.add_argument("--only", nargs="*", help="strategy names or families (default: all)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timing-rounds", type=int, default=3, help="round-robin timing passes (median)")
    p.add_argument("--timing-samples", type=int, default=100, help="images per timed sampling run")
    p.add_argument("--timing-only", action="store_true", help="re-time the existing rows, keep their quality")
    p.add_argument("--bootstrap", type=int, default=500,
                   help="resamples of the generated samples for 95 %% intervals of FD and accuracy (0: none)")
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument("--results", default=str(RESULTS_CSV))
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_compare)

    add_caching_commands(sub)  # calibrate-teacache, train-cache-router
    add_analysis_commands(sub)  # loss-per-t

    p = sub.add_parser("finetune", help="FLOPs-constrained fine-tuning of a DiT into a DyDiT")
    _add_dataclass_flags(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("flops", help="exact FLOPs of a DiT (one multiply-add = one FLOP), or "
                       "the dynamic FLOPs a DyDiT checkpoint uses while sampling")
    p.add_argument("--arch")
    p.add_argument("--checkpoint", help="a DyDiT checkpoint: count its routing over a sampling run")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (with --checkpoint)")
    p.add_argument("--num-samples", type=int, default=20, help="images sampled (with --checkpoint)")
    p.add_argument("--method", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--device", default="auto")
    p.add_argument("--input-size", type=int, default=32, help="latent/image side (32 = 256 px latent)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flops)
    p = sub.add_parser("figures", help="regenerate figures/*.png from the committed checkpoints")
    p.add_argument("--out", default=str(FIGURES_DIR))
    p.add_argument("--only", nargs="*", help="figure names (default: all)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_figures)
    p = sub.add_parser("bench", help="wall-clock speed of DyDiT (sliced, masked) vs its DiT at a "
                       "FLOPs target (random weights, routers set without training)")
    p.add_argument("--arch", help="a DiT config, random weights (or --checkpoint)")
    p.add_argument("--checkpoint", help="a trained DyDiT instead, timed on its own DDIM run (--steps steps, "
                   "--batch-size images); --sweep-batch writes data/bench/lab/")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--target-ratio", type=float, default=0.5, help="DyDiT FLOPs / DiT FLOPs")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="sampled timesteps (respaced process)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (median reported)")
    p.add_argument("--runs", type=int, default=1, help="separate measurements, one after another (fresh "
                   "models, inputs and warm-up each); each row is the run with the median speed-up")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-rate", type=float, default=0.75, help="SDT token keep rate to start from")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--sweep-batch", help="comma-separated batch sizes: CSV in data/bench/")
    p.add_argument("--name", help="CSV name for --sweep-batch (default from arch/device/target)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--per-step-conditioning", action="store_true", help="each forward computes its own "
                   "adaLN modulation (the bench before session 26; default: planned per pass, as samplers do)")
    p.add_argument("--profile", nargs="?", const="ops", choices=PROFILE_KINDS, help="instead of timing, where the "
                   "time goes: ops (torch.profiler) or stages (wall clock); noise: can this machine read the bench")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("flexi-finetune", help="fine-tune a DiT into a FlexiDiT (extra coarse patch)")
    _add_dataclass_flags(p, FlexiFinetuneConfig)
    p.set_defaults(func=cmd_flexi_finetune)
    p = sub.add_parser("sweep", help="a grid of training runs from a TOML spec: train what is missing, "
                       "resume what was interrupted, evaluate, one results row per run")
    p.add_argument("--spec", required=True, help="the TOML spec (see dydit_lab.sweep)")
    p.add_argument("--dry-run", action="store_true", help="list each run and its state, do nothing")
    p.add_argument("--only", action="append", metavar="KEY=VALUE",
                   help="only the grid points with this value (repeatable), e.g. --only seed=0")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("flexi-flops", help="FLOPs of FlexiDiT sampling schedules (first k steps coarse)")
    p.add_argument("--arch", required=True)
    p.add_argument("--coarse-patch", type=int, default=0, help="(default: 2 x native)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps S")
    p.add_argument("--coarse-steps", default="0,10,20,30", help="comma-separated k (first k of S coarse)")
    p.add_argument("--input-size", type=int, default=None, help="(default: the preset's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_flexi_flops)
    p = sub.add_parser("sample", help="sample a checkpoint to a PNG grid (and single PNGs, ADM's .npz): lab "
                       "models in pixel space, released latent models through a VAE folder; torchrun shards")
    p.add_argument("--checkpoint", required=True, help="ours, or a released DiT / DyDiT (either DyDiT release)")
    p.add_argument("--arch", help="the architecture (default: recorded, or the official preset the weights fit)")
    p.add_argument("--vae", help="a local diffusers AutoencoderKL folder (needed by latent models, 4 channels)")
    p.add_argument("--classes", help="comma-separated class labels, taken in turn (default: 0, 1, 2, ...)")
    p.add_argument("--num-samples", type=int, help="(default: one per --classes entry, else min(classes, 16))")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--method", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=0, help="batch k draws its noise from seed + k")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (per process)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="the PNG grid (the first 64 images)")
    p.add_argument("--out-dir", help="also write every image as DIR/000000.png, ...")
    p.add_argument("--npz", help="ADM's .npz of every image (default under torchrun: --out with .npz)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("extract-latents", help="encode an image folder (one sub-folder per class) into VAE "
                       "latents once, for train / finetune / flexi-finetune --data (torchrun shards)")
    p.add_argument("--images", required=True, help="root/<class>/<image>; classes numbered in sorted order")
    p.add_argument("--vae", required=True, help="a local diffusers AutoencoderKL folder")
    p.add_argument("--out", required=True, help="the latent folder to write")
    p.add_argument("--image-size", type=int, default=256, help="centre crop side in pixels (the model's image size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seeds the posterior samples")
    p.set_defaults(func=cmd_extract_latents)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
