"""ipywidgets explorer of DyDiT router schedules (notebook 03)."""

from __future__ import annotations

import base64
from typing import Mapping

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.core.pylabtools import print_figure
from IPython.display import display

from ..analysis.routing import RoutingTrace
from .routing_plots import plot_router_dashboard


class RouterExplorer:
    """Timestep slider, block, sample and checkpoint selectors over recorded sampling runs.

    ``traces`` maps a name (e.g. "lambda = 0.5") to a :class:`RoutingTrace`. Every change of
    a control redraws the dashboard into the output area; :attr:`figure` is the latest
    Figure, so tests (and a non-interactive run) can inspect what is shown.
    """

    def __init__(self, traces: Mapping[str, RoutingTrace], step: int = 0, layer: int = 0, sample: int = 0):
        if not traces:
            raise ValueError("RouterExplorer needs at least one RoutingTrace")
        self.traces = dict(traces)
        first = next(iter(self.traces.values()))
        self.checkpoint = widgets.Dropdown(options=list(self.traces), description="checkpoint")
        self.step = widgets.IntSlider(value=step, min=0, max=len(first.timesteps) - 1,
                                      description="step", continuous_update=False)
        self.layer = widgets.Dropdown(options=[(f"block {i}", i) for i in range(first.heads.shape[2])],
                                      value=layer, description="block")
        self.sample = widgets.Dropdown(
            options=[(f"#{i} (digit {int(y)})", i) for i, y in enumerate(first.labels)],
            value=sample, description="sample")
        self.t_label = widgets.Label()
        self.output = widgets.Output()
        self.figure = plt.figure(figsize=(12, 8), layout="constrained")
        plt.close(self.figure)  # shown through the output widget only, never twice
        for control in (self.checkpoint, self.step, self.layer, self.sample):
            control.observe(self._on_change, names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.checkpoint, self.layer, self.sample]),
            widgets.HBox([self.step, self.t_label]),
            self.output,
        ])
        self.render()

    @property
    def trace(self) -> RoutingTrace:
        return self.traces[self.checkpoint.value]

    def _on_change(self, _change=None) -> None:
        self.render()

    def render(self):
        """Redraw the dashboard for the current control values; returns the Figure."""
        trace = self.trace
        self.t_label.value = f"t = {trace.timesteps[self.step.value]}"
        plot_router_dashboard(trace, self.step.value, self.layer.value, self.sample.value, fig=self.figure)
        # The output widget's state is set, not captured into (``with self.output: display(...)``):
        # a capture makes an executing nbclient (nbconvert, papermill) answer on the shell channel
        # it is reading, which can stall the run (jupyter/nbclient#312).
        self.output.outputs = (figure_output(self.figure),)
        return self.figure

    @property
    def title(self) -> str:
        return self.figure._suptitle.get_text() if self.figure._suptitle else ""

    def _ipython_display_(self):
        display(self.widget)


def figure_output(fig) -> dict:
    """A Figure as one ``display_data`` output (PNG, as the inline backend draws it)."""
    png = base64.b64encode(print_figure(fig, "png", bbox_inches="tight")).decode("ascii")
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": png, "text/plain": repr(fig)}}
