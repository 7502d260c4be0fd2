"""Low-rank adapters that change a DiT block's weights for one sampling mode only: FlexiDiT's
coarse patch (the paper's LoRA variant, Anagnostidis et al. 2025, Sec. 3.2).

An adapter holds ``B A`` per linear (``B`` zero at init, so a fresh adapter changes nothing);
:meth:`BlockAdapter.merged_weights` gives the block's weights with the updates added, to run the
unchanged block with :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .dit import DiTBlock


# Adapter name -> the block's linear it updates (self-attention and MLP, as in the paper).
LORA_TARGETS = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


class LowRankDelta(nn.Module):
    """A rank-r update ``B @ A`` of one linear's ``(out, in)`` weight. ``B`` starts at zero,
    so a fresh adapter changes nothing; ``A`` starts ~N(0, 1/in) so that ``A x`` keeps the
    scale of x and B's first steps already move the output."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self) -> torch.Tensor:
        return self.B @ self.A


class BlockAdapter(nn.Module):
    """The low-rank updates of one block's four linears (:data:`LORA_TARGETS`)."""

    def __init__(self, block: DiTBlock, rank: int):
        super().__init__()
        self.deltas = nn.ModuleDict({
            name: LowRankDelta(block.get_submodule(path).in_features, block.get_submodule(path).out_features, rank)
            for name, path in LORA_TARGETS.items()})

    @torch.no_grad()
    def reset(self) -> None:
        """Zero every ``B``: the adapter changes nothing again (``A`` keeps its draw)."""
        for delta in self.deltas.values():
            delta.B.zero_()

    def merged_weights(self, block: DiTBlock) -> dict[str, torch.Tensor]:
        """``{"attn.qkv.weight": W + B A, ...}``: the block's weights at this adapter's patch."""
        return {f"{path}.weight": block.get_submodule(path).weight + self.deltas[name]()
                for name, path in LORA_TARGETS.items()}


def lora_rank_in(state: dict) -> int:
    """The adapter rank a FlexiDiT state dict carries (0: no adapters)."""
    for k, v in state.items():
        if k.startswith("flex_lora.") and k.endswith(".A"):
            return int(v.shape[0])
    return 0
