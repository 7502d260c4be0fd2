"""The caching-drift figure: the compute map is the per-step FLOPs table, one colour per policy."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dydit_lab.caching import CachingDrift  # noqa: E402
from dydit_lab.evaluation.strategies import policy_name  # noqa: E402
from dydit_lab.viz.caching_plots import ERROR_FLOOR, plot_caching_drift  # noqa: E402


def drift():
    settings = {"FORA N = 2": "fora:2", "FORA N = 3": "fora:3", "ToCa 30% every 3": "toca:0.3,interval=3"}
    fractions = {"FORA N = 2": [1, 0.05, 1, 0.05], "FORA N = 3": [1, 0.05, 0.05, 1], "ToCa 30% every 3": [1, 0.4, 0.4, 1]}
    per_step = pd.DataFrame([{"setting": s, "step": i, "t": 999 - 333 * i, "error": 0.01 * i, "blocks": 2,
                              "flops_fraction": f} for s, fs in fractions.items() for i, f in enumerate(fs)])
    summary = pd.DataFrame([{"setting": s, "spec": spec, "flops_fraction": np.mean(fractions[s]),
                             "blocks_computed": 0.5, "final_error": 0.03} for s, spec in settings.items()])
    return CachingDrift(summary, per_step)


def test_policy_names():
    assert policy_name("fora:2") == "FORA" and policy_name("toca:0.3,interval=3") == "ToCa"
    assert policy_name("DBCache:0.1,first=1") == "DBCache"


def test_the_figure_draws_each_setting_and_policy():
    fig = plot_caching_drift(drift())
    ax_map, ax_err, ax_final = fig.axes[:3]
    shown = ax_map.images[0].get_array()
    assert shown.shape == (3, 4) and list(shown[2]) == [1, 0.4, 0.4, 1]
    assert [t.get_text() for t in ax_map.get_yticklabels()] == ["FORA N = 2", "FORA N = 3", "ToCa 30% every 3"]
    assert len(ax_err.lines) == 3
    assert ax_err.lines[0].get_ydata()[0] == pytest.approx(ERROR_FLOOR)  # step 0: exact, drawn at the floor
    assert ax_err.lines[0].get_color() == ax_err.lines[1].get_color() != ax_err.lines[2].get_color()
    assert [t.get_text() for t in ax_final.get_legend().get_texts()] == ["FORA", "ToCa"]
