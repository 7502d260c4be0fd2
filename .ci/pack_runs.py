"""Pack what .ci/gpu-sweep produced into at most 8 files of at most 15 MiB under OUT: the merged
results rows, the logs, then each finished run's exported weights until the room is gone."""
import csv, io, sys, tarfile
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
rows, fields = [], []
for f in sorted(work.glob("results_*.csv")):
    for r in csv.DictReader(open(f, newline="")):
        rows.append(r)
        fields += [k for k in r if k not in fields]
if rows:
    with open(out / "results_rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader(), w.writerows(rows)
with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
    for p in [*work.glob("job_*.log"), work / "jobs.txt", Path("data/sweep-logs")]:
        if p.exists():
            tar.add(p)
    for p in Path("runs").glob("*/*/*"):
        if p.name in ("log.csv", "config.txt", "routing.csv"):
            tar.add(p)
# Exported weights, most wanted first (argv[3:]: run folders), until 50 MiB in all.
limit, part, size, tar, total = 15 << 20, 0, 0, None, 0
for p in [Path(d) / "model.pt" for d in sys.argv[3:] if (Path(d) / "model.pt").exists()]:
    n = p.stat().st_size
    if total + n > 50 << 20:
        break
    total += n
    if tar is None or size + n > limit:
        if tar: tar.close()
        if part == 6: break
        tar, size, part = tarfile.open(out / f"models_{part}.tar", "w"), 0, part + 1
    tar.add(p); size += n
if tar: tar.close()
print("\n".join(f"{p.name} {p.stat().st_size}" for p in sorted(out.iterdir())))
