"""Point labels that keep apart: a greedy placement in display coordinates (matplotlib only).

Each label, in the order given, takes the cheapest of some hundred spots around its point (beside
it, above, below, diagonally, at growing distances, or slid up or down a few label heights). A
spot costs, in this order of weight: overlapping a label already on the axes (ruled out while any
free spot is left), leaving the axes, covering a marker, crossing a line (an interval bar counts
less), and its distance from the point. A label set far from its point gets a thin leader line;
every label sits on a faint white backing, so a bar or line it must cross stays behind it.

    fig = plot_something(...)            # data, scales, legend and titles first: they move the axes
    place_labels(ax, [(1.0, 2.0)], ["λ = 0.5"], colours=["C0"])
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cbook import STEP_LOOKUP_MAP
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.text import Annotation

__all__ = ["place_labels", "label_boxes", "overlapping_labels"]

RADII = (5, 9, 14, 20, 28, 38, 50, 64)  # points between the point and the label's nearest edge
# E, NE, SE, W, NW, SW, N, S: the first directions are preferred when spots cost the same.
DIRECTIONS = ((1, 0), (1, 1), (1, -1), (-1, 0), (-1, 1), (-1, -1), (0, 1), (0, -1))
SLIDES = (1, -1, 2, -2, 3, -3, 4, -4)  # label heights up or down, beside the point (E and W)
OVERLAP, OUTSIDE, MARKER, LINE, BAR, PER_POINT = 10_000.0, 1_000.0, 40.0, 12.0, 6.0, 1.0
LEADER = 11.0  # points: a label farther than this from its point gets a leader line
PAD = 3.0  # points kept clear around every label (two labels in a row read as two)


def place_labels(ax: Axes, points, texts, colours=None, fontsize: float = 7.0) -> list[Annotation]:
    """Annotate ``points`` (data coordinates) with ``texts`` (``colours``: one per label, or
    None for the text colour) so that no two labels of the axes overlap; labels (texts) already
    on the axes and an axes legend count as taken. Points that are not finite get no label.

    Call it last, once data, scales, legends and titles are in place: it lays the figure out
    (constrained layout moves the axes) and measures in display units. Returns the annotations.
    """
    fig = ax.figure
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    scale = fig.dpi / 72.0  # points -> display pixels
    frame = ax.get_window_extent(renderer)
    segments, weights = _segments(ax, scale)
    markers = _markers(ax, scale)
    taken = [box.extents for box in label_boxes(ax, renderer)]
    if ax.get_legend() is not None:
        taken.append(ax.get_legend().get_window_extent(renderer).extents)
    colours = list(colours) if colours is not None else [None] * len(texts)
    placed = []
    for (x, y), text, colour in zip(points, texts, colours):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        style = dict(fontsize=fontsize, ha="left", va="bottom", textcoords="offset points", annotation_clip=False)
        if colour is not None:
            style["color"] = colour
        probe = ax.annotate(text, (x, y), xytext=(0, 0), **style)
        box = probe.get_window_extent(renderer)
        probe.remove()
        at = ax.transData.transform((x, y))
        spots = _spots(at, box.width, box.height, scale)
        cost = _costs(spots, at, np.array(taken).reshape(-1, 4), markers, segments, weights, frame, scale)
        best = spots[int(np.argmin(cost))]
        taken.append(best)
        dx, dy = (best[0] - box.x0) / scale, (best[1] - box.y0) / scale  # the probe sat at offset (0, 0)
        far = _distance(best[None], at)[0] / scale > LEADER
        arrow = dict(arrowstyle="-", lw=0.5, color=colour or "0.3", alpha=0.6, shrinkA=0, shrinkB=3)
        backing = dict(boxstyle="square,pad=0.08", fc="white", ec="none", alpha=0.6)  # lines under it stay faint
        placed.append(ax.annotate(text, (x, y), xytext=(dx, dy), arrowprops=arrow if far else None, bbox=backing,
                                  **style))
    return placed


def label_boxes(ax: Axes, renderer=None) -> list:
    """The display-unit boxes (Bbox) of the texts on ``ax``, without their leader lines."""
    renderer = renderer or ax.figure.canvas.get_renderer()
    return [super(Annotation, t).get_window_extent(renderer) if isinstance(t, Annotation)
            else t.get_window_extent(renderer) for t in ax.texts if t.get_visible() and t.get_text()]


def overlapping_labels(ax: Axes) -> list[tuple[str, str]]:
    """Pairs of label texts on ``ax`` whose boxes overlap, after a full draw (a check for figures)."""
    ax.figure.canvas.draw()
    shown = [t.get_text() for t in ax.texts if t.get_visible() and t.get_text()]
    boxes = label_boxes(ax)
    return [(shown[i], shown[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])]


def _spots(at, width: float, height: float, scale: float) -> np.ndarray:
    """Candidate label boxes (x0, y0, x1, y1) around the display point ``at``, nearest first."""
    x, y = at
    boxes = []
    for r in RADII:
        d = r * scale
        for sx, sy in DIRECTIONS:
            reach = d if sx == 0 or sy == 0 else d / np.sqrt(2)
            left = x + reach if sx > 0 else x - reach - width if sx < 0 else x - width / 2
            bottom = y - height / 2 if sy == 0 else y + reach if sy > 0 else y - reach - height
            boxes.append((left, bottom))
        if r <= RADII[2]:
            for k in SLIDES:
                shift = k * (height + PAD * scale)
                boxes += [(x + d, y - height / 2 + shift), (x - d - width, y - height / 2 + shift)]
    boxes = np.array(boxes)
    return np.column_stack([boxes, boxes[:, 0] + width, boxes[:, 1] + height])


def _distance(boxes: np.ndarray, at) -> np.ndarray:
    """Display distance from ``at`` to each box's nearest point."""
    x, y = at
    dx = np.maximum.reduce([boxes[:, 0] - x, np.zeros(len(boxes)), x - boxes[:, 2]])
    dy = np.maximum.reduce([boxes[:, 1] - y, np.zeros(len(boxes)), y - boxes[:, 3]])
    return np.hypot(dx, dy)


def _costs(spots, at, taken, markers, segments, weights, frame, scale) -> np.ndarray:
    """What each candidate box costs (see the module docstring), lowest best."""
    pad = PAD * scale
    grown = spots + np.array([-pad, -pad, pad, pad])
    overlaps = ((grown[:, None, 0] < taken[None, :, 2]) & (taken[None, :, 0] < grown[:, None, 2])
                & (grown[:, None, 1] < taken[None, :, 3]) & (taken[None, :, 1] < grown[:, None, 3])).sum(1)
    outside = ((spots[:, 0] < frame.x0) | (spots[:, 2] > frame.x1) | (spots[:, 1] < frame.y0)
               | (spots[:, 3] > frame.y1))
    mx, my, mr = (markers[None, :, i] for i in range(3))
    covered = ((spots[:, None, 0] - mr < mx) & (mx < spots[:, None, 2] + mr)
               & (spots[:, None, 1] - mr < my) & (my < spots[:, None, 3] + mr)).sum(1)
    crossed = _crossings(spots, segments) @ weights
    order = np.arange(len(spots)) * 1e-3  # ties: the earlier (nearer, preferred) spot
    return (OVERLAP * overlaps + OUTSIDE * outside + MARKER * covered + crossed
            + PER_POINT * _distance(spots, at) / scale + order)


def _crossings(boxes: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """(boxes, segments) booleans: whether each segment (x1, y1, x2, y2, half its line width)
    passes through each box, the box grown by the half width (Liang-Barsky clipping)."""
    if not len(segments):
        return np.zeros((len(boxes), 0))
    x1, y1, x2, y2, half = (segments[None, :, i] for i in range(5))
    dx, dy = x2 - x1, y2 - y1
    left, bottom, right, top = (boxes[:, None, 0] - half, boxes[:, None, 1] - half, boxes[:, None, 2] + half,
                                boxes[:, None, 3] + half)
    t0, t1 = np.zeros((len(boxes), len(segments))), np.ones((len(boxes), len(segments)))
    missed = np.zeros_like(t0, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for p, q in ((-dx, x1 - left), (dx, right - x1), (-dy, y1 - bottom), (dy, top - y1)):
            p, q = np.broadcast_to(p, t0.shape), np.broadcast_to(q, t0.shape)
            r = q / p
            t0 = np.where(p < 0, np.maximum(t0, r), t0)
            t1 = np.where(p > 0, np.minimum(t1, r), t1)
            missed |= (p == 0) & (q < 0)
    return (~missed & (t0 <= t1)).astype(float)


def _segments(ax: Axes, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Display segments (x1, y1, x2, y2, half the line width) of the axes' lines and line
    collections, and what crossing each costs (:data:`LINE`; :data:`BAR` for collections,
    e.g. interval bars)."""
    parts, weights = [], []
    for line in ax.lines:
        if not line.get_visible() or line.get_linestyle() in ("None", "none", " ", ""):
            continue
        x, y = (np.asarray(v, float) for v in line.get_data())
        x, y = (np.asarray(v, float) for v in STEP_LOOKUP_MAP[line.get_drawstyle()](x, y))
        xy = line.get_transform().transform(np.column_stack([x, y]))
        parts.append(np.column_stack([xy[:-1], xy[1:], np.full(len(xy) - 1, line.get_linewidth() / 2 * scale)]))
        weights.append(np.full(len(xy) - 1, LINE))
    for collection in ax.collections:
        if isinstance(collection, LineCollection) and collection.get_visible():
            transform = collection.get_transform()
            half = float(np.max(collection.get_linewidth(), initial=1)) / 2 * scale
            for seg in collection.get_segments():
                xy = transform.transform(np.asarray(seg, float))
                parts.append(np.column_stack([xy[:-1], xy[1:], np.full(len(xy) - 1, half)]))
                weights.append(np.full(len(xy) - 1, BAR))
    if not parts:
        return np.zeros((0, 5)), np.zeros(0)
    segments, weights = np.concatenate(parts), np.concatenate(weights)
    keep = np.isfinite(segments).all(1)
    return segments[keep], weights[keep]


def _markers(ax: Axes, scale: float) -> np.ndarray:
    """Display centre and radius (x, y, r) of every marker on the axes (lines and scatters)."""
    found = []
    for line in ax.lines:
        if line.get_visible() and line.get_marker() not in (None, "None", "none", "", " ", "_", "|"):
            xy = line.get_transform().transform(np.column_stack([np.asarray(v, float) for v in line.get_data()]))
            found.append(np.column_stack([xy, np.full(len(xy), line.get_markersize() / 2 * scale)]))
    for collection in ax.collections:
        if isinstance(collection, PathCollection) and collection.get_visible() and len(collection.get_offsets()):
            xy = collection.get_offset_transform().transform(np.asarray(collection.get_offsets(), float))
            sizes = np.asarray(collection.get_sizes(), float)  # marker areas in points²
            sizes = np.resize(sizes, len(xy)) if sizes.size else np.full(len(xy), 36.0)
            found.append(np.column_stack([xy, np.sqrt(sizes) / 2 * scale]))
    if not found:
        return np.zeros((0, 3))
    markers = np.concatenate(found)
    return markers[np.isfinite(markers).all(1)]
