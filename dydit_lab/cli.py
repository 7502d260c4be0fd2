"""Command line: ``python -m dydit_lab <command> ...`` (``--help`` on each command)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .finetuning import FinetuneConfig
from .training import TrainConfig


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field, typed and defaulted by the field."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", default=field.default)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(field.type), field.type)
            parser.add_argument(flag, type=kind, default=field.default,
                                help=f"(default: {field.default})")


def _dataclass_from(args: argparse.Namespace, cls):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def cmd_train(args):
    from .training import train

    path = train(_dataclass_from(args, TrainConfig))
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {path}")


def cmd_train_classifier(args):
    from .evaluation import train_classifier

    result = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(json.dumps(result))


def cmd_export(args):
    from .checkpoints import export_checkpoint

    print(f"wrote {export_checkpoint(args.checkpoint, args.out, fp16=not args.fp32)}")


def cmd_evaluate(args):
    from .checkpoints import load_model
    from .evaluation import SampleEvaluator, load_classifier
    from .training import resolve_device

    device = resolve_device(args.device)
    model = load_model(args.checkpoint, device=device)
    evaluator = SampleEvaluator(load_classifier(args.classifier), device=device)
    metrics = evaluator.evaluate(model, num_samples=args.num_samples, steps=args.steps,
                                 method=args.method, cfg_scale=args.cfg_scale, seed=args.seed)
    metrics = {"checkpoint": args.checkpoint, "steps": args.steps, "method": args.method,
               "cfg_scale": args.cfg_scale, "num_samples": args.num_samples, **metrics}
    print(json.dumps(metrics))
    if args.results:
        from .results import record_result

        record_result(args.results, {**metrics, "name": args.name or args.checkpoint})


def cmd_finetune(args):
    from .finetuning import finetune

    print(f"checkpoint: {finetune(_dataclass_from(args, FinetuneConfig))}")


def cmd_flops(args):
    from .flops import count_flops_report, sampling_flops

    if args.checkpoint:
        from .checkpoints import load_model
        from .dydit import DyDiT
        from .training import resolve_device

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dydit_lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a DiT (resumable; DDP under torchrun)")
    _add_dataclass_flags(p, TrainConfig)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-classifier", help="train the LeNet used for FD-LeNet and accuracy")
    p.add_argument("--out", default="data/lenet_mnist.pt")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("export", help="shrink a training checkpoint to fp16 EMA weights")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="class accuracy and FD-LeNet of generated digits")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--classifier", default="data/lenet_mnist.pt")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--method", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--results", help="append the metrics to this CSV (e.g. data/results.csv)")
    p.add_argument("--name", help="row name in --results (default: the checkpoint path)")
    p.set_defaults(func=cmd_evaluate)

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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
