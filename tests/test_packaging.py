"""Packaging: pyproject.toml and environment.yml list the same dependencies; CI calls make test."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert {_name(r) for r in pip} == {_name(r) for r in wanted}
    # Same pins too (torch must stay pinned in both: unpinned pulls CUDA wheels).
    assert {r for r in pip if "==" in r} == {r for r in wanted if "==" in r}
    assert "torch==2.13.0" in pip


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```")[1]
    assert "make test" in first_block and "make lab" in first_block


def test_no_torchvision_or_timm():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "torchvision" not in text and "timm" not in text
    for path in (ROOT / "dydit_lab").rglob("*.py"):  # every subpackage too
        assert not re.search(r"^\s*(import|from) (torchvision|timm)\b", path.read_text(), re.M), path


def test_notebook_kernels_import_this_checkout():
    """The kernel notebooks run in (cwd notebooks/, so not the repo root) must import this
    checkout's package: an editable install left pointing at another clone would test old code."""
    kernel = json.loads((Path(sys.prefix) / "share/jupyter/kernels/python3/kernel.json").read_text())
    found = subprocess.run([kernel["argv"][0], "-c", "import dydit_lab; print(dydit_lab.__file__)"],
                           cwd=ROOT / "notebooks", capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).resolve() == (ROOT / "dydit_lab" / "__init__.py").resolve(), (
        f"notebooks import {found}: run `make install` (or pip install -e .) in {ROOT}")
