"""The ipywidgets router explorer: every control redraws the dashboard."""

import io

import pytest

from dydit_lab.viz.widgets import RouterExplorer


def test_explorer_callbacks_update_the_plots(traces):
    explorer = RouterExplorer(traces)
    first_title, first_png = explorer.title, _png(explorer.figure)
    explorer.step.value = 3  # as if the slider were moved
    assert "t = 250" in explorer.title and explorer.t_label.value == "t = 250"
    assert _png(explorer.figure) != first_png
    explorer.layer.value = 1
    assert "block 1" in explorer.title
    explorer.checkpoint.value = "model 1"
    assert explorer.title.startswith("model 1") and explorer.title != first_title
    explorer.sample.value = 2
    assert "digit 3" in explorer.figure.axes[2].get_title()
    with pytest.raises(ValueError):
        RouterExplorer({})


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
