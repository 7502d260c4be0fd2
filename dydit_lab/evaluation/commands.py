"""The classifier commands of ``python -m dydit_lab`` (registered by :mod:`dydit_lab.cli`):
``train-classifier`` (a LeNet judge, deterministic per seed) and ``rescore`` (rows of the
results table scored again with both judges, and which FD orderings hold under both); and the
``--classifier`` / ``--second-classifier`` flags that ``evaluate`` shares with ``rescore``."""

from __future__ import annotations

import argparse
import json

from ..paths import DEFAULT_CLASSIFIER, RESULTS_CSV, SECOND_CLASSIFIER, resolve_device
from .metrics import SampleEvaluator, train_classifier
from .report import rescore_results
from .results import describe_orderings, fd_orderings, read_results


def add_classifier_flags(parser: argparse.ArgumentParser) -> None:
    """``--classifier`` and ``--second-classifier`` (``none``: no second judge)."""
    parser.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER), help="the LeNet judge (default: %(default)s)")
    parser.add_argument("--second-classifier", default=str(SECOND_CLASSIFIER),
                        help="a second LeNet scoring the same samples (fd_lenet_alt, accuracy_alt): "
                             "the check of the metric; none to skip (default: %(default)s)")


def evaluator_from_args(args, device) -> SampleEvaluator:
    """The judges that :func:`add_classifier_flags` named, on ``device``."""
    second = None if args.second_classifier.lower() == "none" else args.second_classifier
    return SampleEvaluator.from_files(args.classifier, second, device=device)


def cmd_train_classifier(args):
    result = train_classifier(args.out, epochs=args.epochs, seed=args.seed, overwrite=args.overwrite)
    print(json.dumps(result))


def cmd_rescore(args):
    if not args.check_only:
        device = resolve_device(args.device)
        rescore_results(args.results, args.names, evaluator_from_args(args, device), device=device,
                        progress=False, tolerance=args.tolerance)  # one line per row instead
    print(describe_orderings(fd_orderings(read_results(args.results), args.names)))


def add_commands(sub) -> None:
    """Add the classifier commands to the CLI's sub-parsers."""
    p = sub.add_parser("train-classifier", help="train the LeNet used for FD-LeNet and accuracy (deterministic "
                       "per seed); prints its held-out accuracy and training seconds")
    p.add_argument("--out", default=str(DEFAULT_CLASSIFIER), help="the file to write (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and shifts (the second "
                   f"classifier, {SECOND_CLASSIFIER.name}, is seed 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("rescore", help="score rows of the results table again (same checkpoint, settings "
                       "and seed) with both classifiers, keeping their other columns; print which FD "
                       "orderings of the rows hold under both")
    p.add_argument("--names", nargs="+", required=True, help="row names in --results")
    p.add_argument("--results", default=str(RESULTS_CSV))
    add_classifier_flags(p)
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest relative change of the main FD-LeNet that still counts as the same samples")
    p.add_argument("--check-only", action="store_true", help="no sampling: the orderings of the rows as recorded")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_rescore)
