"""Low-rank adapters: a fresh adapter is a no-op, the merged weights are W + B A, the rank is
read back from a state dict."""

import torch
from torch.func import functional_call

from dydit_lab.models.adapters import LORA_TARGETS, BlockAdapter, LowRankDelta, lora_rank_in
from dydit_lab.models.dit import DiTBlock


def test_a_fresh_delta_is_zero_and_a_trained_one_is_b_times_a():
    delta = LowRankDelta(in_features=6, out_features=4, rank=2)
    assert delta.A.shape == (2, 6) and delta.B.shape == (4, 2) and not delta().any()
    with torch.no_grad():
        delta.B.normal_()
    assert torch.equal(delta(), delta.B @ delta.A)


def test_block_adapter_merges_into_the_four_linears_and_runs_the_plain_block():
    block = DiTBlock(hidden_size=16, num_heads=2)
    adapter = BlockAdapter(block, rank=3)
    assert set(adapter.deltas) == set(LORA_TARGETS) and adapter.deltas["fc1"].B.shape == (64, 3)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    with torch.no_grad():
        block.adaLN_modulation[-1].weight.normal_(0, 0.1)  # non-zero gates: the block is not the identity
        merged = adapter.merged_weights(block)
        assert all(torch.equal(merged[f"{path}.weight"], block.get_submodule(path).weight) for path in LORA_TARGETS.values())
        assert torch.equal(functional_call(block, merged, (x, c)), block(x, c))  # a fresh adapter: no-op
        for delta in adapter.deltas.values():
            delta.B.normal_(0, 0.1)
        assert not torch.allclose(functional_call(block, adapter.merged_weights(block), (x, c)), block(x, c))
    adapter.reset()  # back to a no-op
    assert all(not delta().any() for delta in adapter.deltas.values())


def test_lora_rank_is_read_off_the_state_dict():
    block = DiTBlock(hidden_size=16, num_heads=2)
    state = {f"flex_lora.16.0.{k}": v for k, v in BlockAdapter(block, rank=5).state_dict().items()}
    assert lora_rank_in(state) == 5 and lora_rank_in(block.state_dict()) == 0
