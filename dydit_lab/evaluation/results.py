"""The results table (``data/results.csv``): one row per named model/setting, upserted."""

from __future__ import annotations

import csv
from pathlib import Path


def record_result(path: str | Path, row: dict) -> None:
    """Insert ``row`` or replace the row with the same ``name``; columns are the union of all rows."""
    if "name" not in row:
        raise ValueError("a result row needs a 'name'")
    path = Path(path)
    rows = read_results(path)
    rows = [r for r in rows if r.get("name") != str(row["name"])] + [{k: "" if v is None else str(v) for k, v in row.items()}]
    columns = ["name"] + sorted({k for r in rows for k in r} - {"name"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["name"]))
    tmp.replace(path)


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
