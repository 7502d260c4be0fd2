"""The ipywidgets router explorer: every control redraws the dashboard."""

import base64
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


def test_the_dashboard_is_the_output_widgets_state(traces):
    """Rendered by setting the output widget's outputs (no capture an executing nbclient would
    answer on its shell channel): one PNG of the current figure, replaced on every change."""
    explorer = RouterExplorer(traces)
    (first,) = explorer.output.outputs
    assert first["output_type"] == "display_data" and first["data"]["image/png"]
    assert base64.b64decode(first["data"]["image/png"]).startswith(b"\x89PNG")
    explorer.step.value = 3
    (second,) = explorer.output.outputs
    assert second["data"]["image/png"] != first["data"]["image/png"]
