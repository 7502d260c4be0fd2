"""Stage breakdown files, their summary table and figure (dydit_lab.viz.stage_plots)."""

import json

import pytest
import torch

from dydit_lab.bench.profile import run_profile
from dydit_lab.bench.stages import STAGE_SCALING
from dydit_lab.viz.stage_plots import (STAGES_DIR, load_stage_breakdowns, plot_stage_breakdown, setting_label,
                                       stage_ratios, stage_summary)
from tests.helpers import BENCH_ARCH


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("stages")
    for batch in (1, 2):
        result = run_profile(BENCH_ARCH, batch_size=batch, steps=2, device="cpu", threads=1, kind="stages", repeats=1)
        (folder / f"b{batch}.json").write_text(json.dumps(result))
    torch.set_num_threads(threads)
    return folder


def test_breakdowns_load_in_file_order_and_summarise(folder):
    results = load_stage_breakdowns(folder)
    assert [r["batch_size"] for r in results] == [1, 2]
    table = stage_summary(results)
    assert list(table["setting"]) == [f"{BENCH_ARCH}, target 0.5, batch 1", f"{BENCH_ARCH}, target 0.5, batch 2"]
    for row, result in zip(table.itertuples(), results):
        assert row.speedup == pytest.approx(result["static_ms"] / result["sliced_ms"])
        assert row.of_flops_ideal == pytest.approx(row.stage_ceiling * row.of_stage_ideal)
        assert row.masked_speedup == pytest.approx(result["static_ms"] / result["masked_ms"])
        assert (row.heads_on, row.tokens_kept, row.mlp_elements) == tuple(
            result["fractions"][k] for k in ("heads", "tokens", "mlp"))
    ratios = stage_ratios(results)
    assert list(ratios.index) == list(table["setting"])
    # The static pass never routes tokens or plans widths: those stages have no ratio.
    assert list(ratios.columns) == [s for s in STAGE_SCALING if s not in ("token routing", "width plan")]
    mlp = {r["stage"]: r for r in results[0]["stages"]}["MLP"]
    assert ratios.iloc[0]["MLP"] == pytest.approx(mlp["sliced_ms"] / mlp["static_ms"])


def test_a_breakdown_without_the_masked_path_summarises_with_nan(folder):
    result = {k: v for k, v in load_stage_breakdowns(folder)[0].items() if k != "masked_ms"}
    assert stage_summary([result])["masked_speedup"].isna().all()


def test_a_checkpoint_breakdown_is_labelled_by_its_name():
    assert setting_label({"arch": "DyDiT-lab-L-0.5", "batch_size": 100}) == "DyDiT-lab-L-0.5, batch 100"


def test_one_panel_per_breakdown_with_a_bar_per_path_and_stage(folder):
    results = load_stage_breakdowns(folder)
    fig = plot_stage_breakdown(results)
    assert len(fig.axes) == 4
    top, bottom = fig.axes[:2], fig.axes[2:]
    for ax_time, ax_gap, result in zip(top, bottom, results):
        rows = result["stages"]
        for ax in (ax_time, ax_gap):
            assert len(ax.get_yticks()) == len(STAGE_SCALING)
        assert len(ax_time.patches) == 3 * len(STAGE_SCALING) and ax_time.get_xscale() == "log"
        assert [p.get_width() for p in ax_time.containers[1]] == pytest.approx([r["sliced_ms"] for r in rows])
        assert "stage ceiling" in ax_time.get_title()
        # The lower panel: the sliced pass minus the stage ideal, per stage.
        gaps = [p.get_width() for p in ax_gap.containers[0]]
        assert gaps == pytest.approx([r["sliced_ms"] - r["ideal_ms"] for r in rows])
    for ax in (top[0], bottom[0]):  # the stage names, on the shared y axis of the first column
        assert [t.get_text() for t in ax.get_yticklabels()] == list(STAGE_SCALING)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["static", "sliced", "stage ideal"]


def test_missing_or_foreign_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="--profile stages"):
        load_stage_breakdowns(tmp_path)
    (tmp_path / "ops.json").write_text(json.dumps({"kind": "ops"}))
    with pytest.raises(ValueError, match="not a stage breakdown"):
        load_stage_breakdowns(tmp_path)
    with pytest.raises(ValueError, match="no stage breakdowns"):
        plot_stage_breakdown([])


def test_the_committed_breakdowns_load():
    results = load_stage_breakdowns(STAGES_DIR)
    assert {r["num_threads"] for r in results} == {2}
    assert all(0 < r["stage_ceiling"] and 0 < r["efficiency"] for r in results)
