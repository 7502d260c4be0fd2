"""The formulas of partial forwards (dydit_lab.models.flops), by hand on DiT-lab-T and against the
static count on every preset."""

import pytest

from dydit_lab.models import flops
from dydit_lab.models.configs import DIT_CONFIGS, get_config
from tests.caching.test_policies import BLOCK, D, HIDDEN, N, OUTSIDE

CFG = get_config("DiT-lab-T")  # 4 heads, SDT router D -> D // 16 = 2 -> 1


@pytest.mark.parametrize("arch", sorted(DIT_CONFIGS))
def test_outside_plus_whole_blocks_is_the_static_total(arch):
    cfg = DIT_CONFIGS[arch]
    whole = flops.partial_block_flops(cfg, True, flops.num_tokens(cfg))
    assert whole == flops.block_overhead_flops(cfg) + sum(flops.block_flops(cfg, flops.num_tokens(cfg)).values())
    assert flops.outside_blocks_flops(cfg) + cfg.depth * whole == flops.analytic_flops(cfg)["total"]


def test_partial_blocks_by_hand():
    assert flops.outside_blocks_flops(CFG) == OUTSIDE and flops.partial_block_flops(CFG, True, N) == BLOCK
    assert flops.partial_block_flops(CFG, False, 5) == 6 * D * D + 5 * (4 * D + 2 * D * HIDDEN)
    assert flops.partial_block_flops(CFG, False, 0) == 6 * D * D  # adaLN only
    assert flops.modulated_input_flops(CFG) == 6 * D * D + N * D * 4
    # A DyDiT block: 2 of 4 heads, 3 of 4 MLP groups on 7 kept tokens, routers included.
    routers = N * (D * 2 + 2) + 2 * D * 3
    whole = (6 * D * D + 2 * N * D * 4 + N * D * 3 * 16 + 2 * N * N * 16 + N * 16 * D
             + 2 * 7 * D * 3 * (HIDDEN // 4) + routers)
    assert flops.partial_block_flops(CFG, True, N, (2, 3, 7)) == whole
    # ToCa's cache step on a DyDiT: attention reused; the token router scores the 5 fresh tokens.
    cache_step = 6 * D * D + 5 * D * 4 + 2 * 4 * D * 3 * (HIDDEN // 4) + 5 * (D * 2 + 2) + 2 * D * 3
    assert flops.partial_block_flops(CFG, False, 5, (0, 3, 4)) == cache_step
    with pytest.raises(ValueError, match="mlp_tokens must lie in"):
        flops.partial_block_flops(CFG, False, N + 1)
