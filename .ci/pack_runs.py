"""Pack what .ci/gpu-sweep produced for the trip back from a device call (at most 8 files).

    python .ci/pack_runs.py WORK OUT [RUN_FOLDER ...]

Writes under OUT: results_rows.csv (every WORK/results_*.csv merged, columns unioned),
logs.tar.gz (the job logs, data/sweep-logs and each run folder's small logs) and models_N.tar
(the exported weights of the RUN_FOLDERs, most wanted first, until 50 MiB; training
checkpoints never travel). Paths are relative to the working directory, the repository root.
"""

import csv
import sys
import tarfile
from pathlib import Path

SMALL_LOGS = ("log.csv", "config.txt", "routing.csv")
PART_BYTES, TOTAL_BYTES, MAX_PARTS = 15 << 20, 50 << 20, 6  # a call returns 16 MiB a file, 64 MiB in all


def merge_results(work: Path, out: Path) -> None:
    rows, fields = [], []
    for path in sorted(work.glob("results_*.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                rows.append(row)
                fields += [k for k in row if k not in fields]
    if rows:
        with open(out / "results_rows.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)


def pack_logs(work: Path, out: Path) -> None:
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in [*sorted(work.glob("job_*.log")), work / "jobs.txt", Path("data/sweep-logs")]:
            if path.exists():
                tar.add(path)
        for path in sorted(Path("runs").glob("*/*/*")):
            if path.name in SMALL_LOGS:
                tar.add(path)


def pack_weights(folders: list[str], out: Path) -> None:
    weights = [Path(d) / "model.pt" for d in folders if (Path(d) / "model.pt").exists()]
    tar, part_size, parts, total = None, 0, 0, 0
    for path in weights:
        size = path.stat().st_size
        if total + size > TOTAL_BYTES:
            break
        if tar is None or part_size + size > PART_BYTES:
            if tar is not None:
                tar.close()
            if parts == MAX_PARTS:
                tar = None
                break
            tar, part_size, parts = tarfile.open(out / f"models_{parts}.tar", "w"), 0, parts + 1
        tar.add(path)
        part_size, total = part_size + size, total + size
    if tar is not None:
        tar.close()


if __name__ == "__main__":
    work_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    merge_results(work_dir, out_dir)
    pack_logs(work_dir, out_dir)
    pack_weights(sys.argv[3:], out_dir)
    print("\n".join(f"{p.name} {p.stat().st_size}" for p in sorted(out_dir.iterdir())))
