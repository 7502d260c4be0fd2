"""Training-free caching policies that reuse whole blocks: FORA (a fixed interval), the first-
and dual-block caches (FBCache / DBCache: a probe block's residual decides) and TeaCache (the
timestep-modulated input decides).

A policy runs the block loop of one call on a :class:`~dydit_lab.caching.model.CachedModel`
(``run(executor, tokens, c, step) -> tokens``): it asks the executor to compute blocks, and
reuses a block (or a stack of blocks) by adding the residual it left the last time it ran, so
a reused block costs nothing. Caches live in the policy and are cleared by :meth:`reset`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models import flops


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean |new - old| / mean |old|: how far a feature moved since it was cached."""
    return ((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12)).item()


def _check(name: str, value, ok: bool, rule: str):
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


class CachePolicy:
    """Base of the policies: per-block residual caches and the plain loop."""

    def __init__(self):
        self._residuals: list[torch.Tensor | None] = []

    def reset(self) -> None:
        """Forget every cached feature (a new sampling run starts)."""
        self._residuals = []

    def run(self, executor, x: torch.Tensor, c: torch.Tensor, step) -> torch.Tensor:
        raise NotImplementedError

    def run_blocks(self, executor, x: torch.Tensor, compute: list[bool]) -> torch.Tensor:
        """The block loop with one decision per block: a computed block refreshes its cached
        residual (output - input); a reused one adds it. A block never computed is computed."""
        if len(self._residuals) != executor.depth:
            self._residuals = [None] * executor.depth
        for i, fresh in enumerate(compute):
            if fresh or self._residuals[i] is None:
                out = executor.compute_block(i, x)
                self._residuals[i] = out - x
                x = out
            else:
                x = x + self._residuals[i]
        return x


class FORA(CachePolicy):
    """FORA (Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer
    Acceleration"): every block runs at every ``interval``-th step (the first included) and
    is reused in between. ``interval`` 1 reuses nothing: the plain model."""

    def __init__(self, interval: int):
        super().__init__()
        ok = isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1
        self.interval = _check("FORA interval", interval, ok, "a positive integer")

    def __repr__(self) -> str:
        return f"FORA(interval={self.interval})"

    def run(self, executor, x, c, step):
        return self.run_blocks(executor, x, [step.index % self.interval == 0] * executor.depth)


class FirstBlockCache(CachePolicy):
    """First-block cache (ParaAttention's FBCache) and, with ``last`` > 0 or ``first`` > 1,
    cache-dit's dual-block cache (DBCache): the ``first`` blocks always run; when their
    residual moved less than ``threshold`` (relative L1) from the one seen at the last full
    step, the middle blocks are reused as one residual, else they run and the reference is
    renewed; the ``last`` blocks always run on the result. The first ``warmup`` steps run
    in full. ``threshold`` 0 reuses nothing."""

    def __init__(self, threshold: float, first: int = 1, last: int = 0, warmup: int = 0):
        super().__init__()
        self.threshold = _check("cache threshold", threshold,
                                isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0,
                                "a finite number >= 0")
        self.first = _check("first (blocks always computed first)", first, isinstance(first, int) and first >= 1, ">= 1")
        self.last = _check("last (blocks always computed last)", last, isinstance(last, int) and last >= 0, ">= 0")
        self.warmup = _check("warmup", warmup, isinstance(warmup, int) and warmup >= 0, ">= 0")
        self.reset()

    def __repr__(self) -> str:
        name = "FirstBlockCache" if (self.first, self.last) == (1, 0) else "DualBlockCache"
        return f"{name}(threshold={self.threshold}, first={self.first}, last={self.last}, warmup={self.warmup})"

    def reset(self) -> None:
        super().reset()
        self._probe: torch.Tensor | None = None
        self._middle: torch.Tensor | None = None
        self.last_distance: float | None = None

    def run(self, executor, x, c, step):
        depth = executor.depth
        if self.first + self.last > depth:
            raise ValueError(f"first + last = {self.first + self.last} blocks, but the model has only {depth}")
        start = x
        x = executor.compute_blocks(range(self.first), x)
        probe = x - start
        reuse = False
        if self.threshold > 0 and step.index >= self.warmup and self._probe is not None and self._middle is not None:
            self.last_distance = relative_l1(probe, self._probe)
            reuse = self.last_distance < self.threshold
        if reuse:
            x = x + self._middle
        else:
            self._probe = probe  # the reference moves only when the middle runs (as FBCache)
            middle_in = x
            x = executor.compute_blocks(range(self.first, depth - self.last), x)
            self._middle = x - middle_in
        return executor.compute_blocks(range(depth - self.last, depth), x)


class TeaCache(CachePolicy):
    """TeaCache (Liu et al. 2024/2025, "Timestep Embedding Tells: It's Time to Cache for Video
    Diffusion Model"): the first block's timestep-modulated input (adaLN shift/scale applied
    to norm1 of the tokens) is compared with the previous step's; the relative L1 distance,
    rescaled by a polynomial (``coefficients``, highest power first, fitted by
    :func:`~dydit_lab.caching.calibration.calibrate_teacache`; None: no rescaling), is
    accumulated, and while the sum stays below ``threshold`` the whole block stack is reused as
    one residual. The first and last steps always run; ``threshold`` 0 reuses nothing (and
    needs no probe). The probe (adaLN + norm1 of block 0) is charged on every call."""

    def __init__(self, threshold: float, coefficients=None):
        super().__init__()
        self.threshold = _check("TeaCache threshold", threshold,
                                isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0,
                                "a finite number >= 0")
        if coefficients is not None:
            coefficients = [float(v) for v in coefficients]
            if not coefficients or not all(math.isfinite(v) for v in coefficients):
                raise ValueError(f"TeaCache coefficients must be finite numbers, got {coefficients!r}")
        self.coefficients = coefficients
        self._rescale = np.poly1d(coefficients) if coefficients else (lambda d: d)
        self.reset()

    def __repr__(self) -> str:
        fitted = "fitted" if self.coefficients else "none"
        return f"TeaCache(threshold={self.threshold}, coefficients={fitted})"

    def reset(self) -> None:
        super().reset()
        self._previous: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None
        self._accumulated = 0.0

    def modulated_input(self, executor, x) -> torch.Tensor:
        """Block 0's adaLN-modulated norm1 of ``x``, charged to the policy."""
        block = executor.blocks[0]
        shift, scale = executor.modulation(0)[:2]
        executor.charge(flops.modulated_input_flops(executor.model.config))
        return block.attention_input(x, shift, scale)

    def run(self, executor, x, c, step):
        if self.threshold == 0:  # nothing is ever reused: no probe either
            return executor.compute_blocks(range(executor.depth), x)
        current = self.modulated_input(executor, x)
        compute = True
        if not (step.index == 0 or step.is_last or self._previous is None or self._residual is None):
            self._accumulated += float(self._rescale(relative_l1(current, self._previous)))
            compute = not self._accumulated < self.threshold
        self._previous = current
        if not compute:
            return x + self._residual
        self._accumulated = 0.0
        out = executor.compute_blocks(range(executor.depth), x)
        self._residual = out - x
        return out
