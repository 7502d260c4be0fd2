"""`make lab` starts JupyterLab as root (containers, cloud GPU boxes) and as a normal user."""

import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def test_make_lab_passes_allow_root_exactly_when_root():
    cmd = subprocess.run(["make", "-n", "lab"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lab_line = [line for line in cmd.splitlines() if "jupyter lab" in line][-1]
    assert ("--allow-root" in lab_line) == (os.getuid() == 0)
    assert lab_line.rstrip().endswith("notebooks/")


def test_make_lab_serves_the_notebooks(tmp_path):
    """The real target starts a server that answers (as whatever user runs the tests)."""
    if not (ROOT / ".venv" / "bin" / "jupyter").exists():
        pytest.skip("no .venv: `make lab` would install it first")
    port = 18000 + os.getpid() % 1000
    extra = f"--no-browser --port={port} --ServerApp.token=t --ServerApp.port_retries=0"
    args = "--allow-root " + extra if os.getuid() == 0 else extra
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(["make", "lab", f"LAB_ARGS={args}"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "lab.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token=t", timeout=2) as r:
                    names = {item["name"] for item in __import__("json").load(r)["content"]}
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("make lab did not answer within 120 s:\n" + (tmp_path / "lab.log").read_text()[-2000:])
        assert "01_loss_gap.ipynb" in names
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
