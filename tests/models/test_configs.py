"""DiT configs: the official presets, validated overrides, FlexiDiT's extra patch sizes."""

import pytest

from dydit_lab.models.configs import DIT_CONFIGS, coarse_patch_sizes, get_config

OFFICIAL_ARCHS = [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)]


def test_all_official_configs_exist():
    assert set(OFFICIAL_ARCHS) <= set(DIT_CONFIGS)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="unknown arch"):
        get_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="divisible"):
        get_config("DiT-S/8", input_size=20)
    with pytest.raises(TypeError, match="unknown model option"):
        get_config("DiT-S/2", hidden=3)


def test_coarse_patch_sizes_default_one_or_several():
    cfg = get_config("DiT-lab-T")  # patch 8 on 32x32
    assert coarse_patch_sizes(cfg, None) == coarse_patch_sizes(cfg, 0) == (16,)
    assert coarse_patch_sizes(cfg, 4) == (4,)
    assert coarse_patch_sizes(cfg, [16, 4, 16]) == (16, 4)  # order kept, duplicates dropped
    with pytest.raises(ValueError, match="native"):
        coarse_patch_sizes(cfg, 8)
    with pytest.raises(ValueError, match="tile"):
        coarse_patch_sizes(cfg, 12)
