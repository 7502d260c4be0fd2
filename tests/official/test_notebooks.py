"""Notebooks 03 and 04 on a user's checkpoint, run with papermill as the README shows: a
released-format DyDiT (2025 layout, latent, random weights) and a VAE folder, both written by
the fixtures. What the notebooks record is checked against the same calls made here."""

import base64
import io
import os
from pathlib import Path

import pytest
from PIL import Image

from dydit_lab.analysis.routing import trace_sampling, width_schedule, width_summary
from dydit_lab.checkpoints import load_model
from dydit_lab.official.vae import load_vae

papermill = pytest.importorskip("papermill", reason="papermill runs the notebooks (pip install -e '.[dev]')")
pytest.importorskip("diffusers", reason="the VAE needs diffusers (pip install -e '.[official]')")
nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CLASSES, STEPS, CFG = [0, 2], 3, 1.5
CELL_TIMEOUT_S = 300  # a stalled cell fails the test instead of hanging it


@pytest.fixture(scope="module")
def kernel_env():
    """The kernel imports this checkout's dydit_lab, uses one thread (tiny models) and draws
    inline (the tests' Agg backend would show no figure)."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MPLBACKEND", raising=False)
        env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env.setenv("OMP_NUM_THREADS", "1")
        yield


def run_notebook(name: str, out_dir: Path, **parameters):
    """Execute ``notebooks/<name>`` in its own folder with ``parameters`` injected; the result."""
    out = out_dir / name
    papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, cwd=str(NOTEBOOKS),
                               progress_bar=False, execution_timeout=CELL_TIMEOUT_S)
    return nbformat.read(out, as_version=4)


def outputs_of(nb, snippet: str) -> list:
    """The outputs of the one code cell whose source holds ``snippet``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and snippet in c.source]
    assert len(cells) == 1, f"{len(cells)} cells hold {snippet!r}"
    return cells[0].outputs


def text_of(nb, snippet: str) -> str:
    return "".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
                   for o in outputs_of(nb, snippet))


def table_rows(text: str, columns: int) -> list[list[float]]:
    """The last ``columns`` numbers of each data row of a printed DataFrame."""
    return [[float(v) for v in line.split()[-columns:]] for line in text.splitlines()[1:]]


def pngs(nb) -> list[Image.Image]:
    """Every PNG a cell shows, decoded."""
    return [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
            for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]


@pytest.fixture(scope="module")
def checkpoint(released):
    return released["dydit-2025"]


@pytest.fixture(scope="module")
def notebook03(checkpoint, vae_dir, tmp_path_factory, kernel_env):
    return run_notebook("03_router_schedules.ipynb", tmp_path_factory.mktemp("nb03"), checkpoint=str(checkpoint),
                        vae=str(vae_dir), classes=CLASSES, steps=STEPS, cfg_scale=CFG, device="cpu")


@pytest.fixture(scope="module")
def notebook04(checkpoint, tmp_path_factory, kernel_env):
    return run_notebook("04_speedup.ipynb", tmp_path_factory.mktemp("nb04"), checkpoint=str(checkpoint),
                        batch_size=2, steps=STEPS, repeats=1, device="cpu")


def test_03_loads_the_released_file_and_its_vae(notebook03):
    described = text_of(notebook03, "describe_models(")
    assert "dydit-2025" in described and "DiT-S/4" in described and "2025 release" in described
    assert "3x16x16, VAE-decoded" in described


def test_03_shows_the_learned_width_schedule(notebook03, checkpoint):
    expected = width_summary({"dydit-2025": width_schedule(load_model(checkpoint))})
    shown = table_rows(text_of(notebook03, "width_summary(schedules)"), 2)
    assert len(shown) == 4  # quarters of the timesteps
    assert sum(shown, []) == pytest.approx(expected[["heads_active", "groups_active"]].values.ravel().tolist(),
                                           abs=6e-4)


def test_03_records_the_keep_rates_of_a_latent_sampling_run(notebook03, checkpoint, vae_dir):
    trace = trace_sampling(load_model(checkpoint), CLASSES, steps=STEPS, cfg_scale=CFG, vae=load_vae(vae_dir),
                           progress=False)
    assert text_of(notebook03, "trace.heads.shape") == "{'dydit-2025': torch.Size([3, 2, 12, 6])}"
    (shown,) = table_rows(text_of(notebook03, "routing.round(3)"), 4)
    expected = [trace.mean_flops_fraction] + [float(getattr(trace, k).float().mean())
                                              for k in ("heads", "groups", "tokens")]
    assert shown == pytest.approx(expected, abs=6e-4)
    assert 0 < shown[3] < 1  # mixed token routing: a map with tokens kept and skipped


def test_03_draws_its_figures_and_the_explorer(notebook03):
    # width schedule, router schedules, token maps over the decoded samples, keep rate on bright
    # vs dark cells, the explorer's static view
    images = pngs(notebook03)
    assert len(images) == 5 and all(min(i.size) > 300 for i in images)
    state = notebook03.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [o for w in state.values() if w["model_name"] == "OutputModel" for o in w["state"]["outputs"]]
    assert len(shown) == 1 and "image/png" in shown[0]["data"]  # the dashboard inside the widget


def test_04_times_the_checkpoint_on_the_device(notebook04, checkpoint):
    record = dict(line.split(None, 1) for line in text_of(notebook04, "pd.Series(measured)").splitlines()[:-1])
    assert record["name"].strip() == "DiT-S/4" and record["device"].strip() == "cpu"
    assert int(record["batch_size"]) == 2 and int(record["steps"]) == STEPS
    trace = trace_sampling(load_model(checkpoint), [0, 1], steps=STEPS, progress=False)
    assert float(record["flops_ratio"]) == pytest.approx(trace.mean_flops_fraction, rel=1e-5)
    for key in ("static_seconds", "dynamic_seconds", "masked_seconds", "speedup", "masked_speedup"):
        assert float(record[key]) > 0
    (bars,) = [o for o in outputs_of(notebook04, "checkpoint_speedup(") if "image/png" in o.get("data", {})]
    assert "650x400" in "".join(bars.data["text/plain"])


def test_04_keeps_the_lab_sections(notebook04):
    committed = nbformat.read(NOTEBOOKS / "04_speedup.ipynb", as_version=4)
    flops = "print(flops_table()"
    assert text_of(notebook04, flops) == text_of(committed, flops)  # the nbval-checked cell
    assert len(pngs(notebook04)) == len(pngs(committed)) + 1  # and the measured speed-up
