"""The results table (``data/results.csv``): one row per named model/setting, upserted; and
which orderings of its rows hold under both classifiers (:func:`fd_orderings`)."""

from __future__ import annotations

import contextlib
import csv
import fcntl
import itertools
import math
from pathlib import Path


def record_result(path: str | Path, row: dict) -> None:
    """Insert ``row`` or replace the row with the same ``name``; columns are the union of all rows."""
    if "name" not in row:
        raise ValueError("a result row needs a 'name'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):  # sweeps run side by side: one read-modify-write at a time
        rows = read_results(path)
        rows = [r for r in rows if r.get("name") != str(row["name"])] + [{k: "" if v is None else str(v) for k, v in row.items()}]
        columns = ["name"] + sorted({k for r in rows for k in r} - {"name"})
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r["name"]))
        tmp.replace(path)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``<path>.lock`` for the block (POSIX ``flock``; released on exit or death)."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(row: dict, key: str) -> float | None:
    """``row[key]`` as a float (a CSV string or a number); None when absent, empty or NaN."""
    raw = row.get(key)
    if raw is None or raw == "":
        return None
    value = float(raw)
    return None if math.isnan(value) else value


def fd_orderings(rows: list[dict], names: list[str] | None = None, metric: str = "fd_lenet",
                 higher_is_better: bool = False) -> list[dict]:
    """Every pairwise ordering of ``metric`` among ``rows``, under the main classifier and
    under the second one (the row's ``<metric>_alt``, see :class:`~dydit_lab.evaluation.metrics.SampleEvaluator`).

    One dict per pair, in the order of ``names`` (default: every row scored by both classifiers,
    in table order), the better row under the main classifier first: ``better``, ``worse``,
    ``gap`` (how much better it is, >= 0), ``gap_alt`` (the same under the second classifier:
    negative when it flips), ``holds`` (both classifiers order the pair alike; an ordering that
    does not hold is no finding), and ``separated`` (the 95 % intervals of the two rows are
    disjoint under both classifiers; None where a row has no intervals). Lower is better unless
    ``higher_is_better`` (``metric="accuracy"``). A named row without both scores, or a name
    not in ``rows``, is a ``ValueError`` naming it.
    """
    alt = metric + "_alt"
    by_name = {r["name"]: r for r in rows}
    if names is None:
        names = [r["name"] for r in rows if _number(r, metric) is not None and _number(r, alt) is not None]
    unknown = [n for n in names if n not in by_name]
    unscored = [n for n in names if n in by_name and (_number(by_name[n], metric) is None or
                                                       _number(by_name[n], alt) is None)]
    if unknown or unscored:
        problems = ([f"rows not found {unknown}"] if unknown else []) + (
            [f"rows without {metric} and {alt} {unscored} (re-score them: python -m dydit_lab rescore "
             f"--names ...)"] if unscored else [])
        raise ValueError("; ".join(problems))
    sign = 1 if higher_is_better else -1
    orderings = []
    for a, b in itertools.combinations(names, 2):
        ra, rb = by_name[a], by_name[b]
        if sign * (_number(ra, metric) - _number(rb, metric)) < 0:
            (a, ra), (b, rb) = (b, rb), (a, ra)
        gap = sign * (_number(ra, metric) - _number(rb, metric))
        gap_alt = sign * (_number(ra, alt) - _number(rb, alt))
        orderings.append({"better": a, "worse": b, "gap": gap, "gap_alt": gap_alt,
                          "holds": gap_alt > 0 or gap == gap_alt == 0,
                          "separated": _separated(ra, rb, metric, higher_is_better)})
    return orderings


def _separated(better: dict, worse: dict, metric: str, higher_is_better: bool) -> bool | None:
    """Whether ``better``'s interval lies wholly on the better side of ``worse``'s, under both
    classifiers (None when an interval is missing)."""
    verdicts = []
    for key in (metric, metric + "_alt"):
        bounds = [_number(r, f"{key}_{end}") for r in (better, worse) for end in ("lo", "hi")]
        if None in bounds:
            return None
        b_lo, b_hi, w_lo, w_hi = bounds
        verdicts.append(b_lo > w_hi if higher_is_better else b_hi < w_lo)
    return all(verdicts)


def describe_orderings(orderings: list[dict], metric: str = "FD-LeNet") -> str:
    """One line per ordering of :func:`fd_orderings`: holds or flips, by how much under each
    classifier, and whether the intervals are disjoint under both."""
    lines = []
    for o in orderings:
        verdict = "holds" if o["holds"] else "FLIPS"
        extra = {True: "; intervals disjoint under both", None: "",
                 False: "; intervals overlap under one classifier or both"}[o["separated"]]
        lines.append(f"{verdict}: {o['better']} better than {o['worse']} on {metric} by {o['gap']:.3g} "
                     f"(second classifier: {o['gap_alt']:+.3g}){extra}")
    return "\n".join(lines)
