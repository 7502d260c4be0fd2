"""The GPU-run helpers in .ci/: pack_runs.py merges the parallel sweeps' results and packs what a
device call may return (at most 8 files)."""

import csv
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pack_runs_merges_rows_and_packs_logs_and_wanted_weights(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (work / "results_0.csv").write_text("name,fd_lenet\na,1.5\n")
    (work / "results_1.csv").write_text("name,accuracy\nb,0.9\n")
    (work / "job_0.log").write_text("done\n")
    for run in ("lam0.5-seed1", "lam0.9-seed0", "lam0.3-seed0"):
        folder = tmp_path / "runs" / "sweep" / run
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"w" * 1000)
        (folder / "routing.csv").write_text("step\n0\n")
        (folder / "checkpoint.pt").write_bytes(b"c")  # training state: never packed
    wanted = ["runs/sweep/lam0.9-seed0", "runs/sweep/lam0.5-seed1", "runs/sweep/missing"]
    subprocess.run([sys.executable, str(ROOT / ".ci" / "pack_runs.py"), str(work), str(out), *wanted],
                   cwd=tmp_path, check=True, capture_output=True)
    rows = list(csv.DictReader(open(out / "results_rows.csv", newline="")))
    assert rows == [{"name": "a", "fd_lenet": "1.5", "accuracy": ""}, {"name": "b", "fd_lenet": "", "accuracy": "0.9"}]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/sweep/lam0.3-seed0/routing.csv" in names and not any(n.endswith(".pt") for n in names)
    with tarfile.open(out / "models_0.tar") as tar:
        assert tar.getnames() == ["runs/sweep/lam0.9-seed0/model.pt", "runs/sweep/lam0.5-seed1/model.pt"]
    assert len(list(out.iterdir())) <= 8
