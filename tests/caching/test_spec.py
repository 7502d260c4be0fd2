"""Cache specs: each policy by name, its settings checked, one-line errors naming bad values."""

import pytest

from dydit_lab.caching import FORA, FirstBlockCache, LearningToCache, TeaCache, ToCa, parse_cache_spec
from dydit_lab.evaluation.strategies import STRATEGIES


def test_specs_build_their_policies():
    assert parse_cache_spec("fora:3").interval == 3
    fb = parse_cache_spec("fbcache:0.1")
    assert isinstance(fb, FirstBlockCache) and (fb.threshold, fb.first, fb.last) == (0.1, 1, 0)
    db = parse_cache_spec("dbcache:0.2, first=2, last=1, warmup=3")
    assert (db.first, db.last, db.warmup) == (2, 1, 3) and "DualBlockCache" in repr(db)
    assert isinstance(parse_cache_spec("TeaCache:0.3"), TeaCache)
    toca = parse_cache_spec("toca:0.25,interval=4")
    assert isinstance(toca, ToCa) and (toca.fraction, toca.interval) == (0.25, 4)


@pytest.mark.parametrize("spec, message", [
    ("bogus:1", "unknown cache policy 'bogus'"),
    ("fora", "needs its interval"),
    ("fora:x", "interval must be an integer, got 'x'"),
    ("fora:0", "FORA interval must be a positive integer, got 0"),
    ("fbcache:-0.1", "cache threshold must be a finite number >= 0, got -0.1"),
    ("fbcache:0.1,foo=1", "unknown option 'foo=1'"),
    ("dbcache:0.1,first=0", r"first \(blocks always computed first\) must be >= 1, got 0"),
    ("toca:1.5", r"ToCa fraction must be in \[0, 1\], got 1.5"),
    ("toca:0.5,interval=0", "ToCa interval must be a positive integer, got 0"),
    ("teacache:nan", "TeaCache threshold must be a finite number >= 0, got nan"),
    ("teacache:0.1,coef=missing.json", "no TeaCache coefficients at"),
    ("l2c:0.5", "l2c needs router=FILE"),
    ("l2c:1.5,router=l2c-DiT-lab-L-50.pt", r"L2C threshold must be in \[0, 1\), got 1.5"),
    ("", "a cache spec names a policy"),
])
def test_bad_specs_name_the_bad_value(spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_cache_spec(spec)


def test_every_caching_strategy_parses_with_the_committed_files():
    cached = [s for s in STRATEGIES if s.cache]
    assert {s.family for s in cached} == {"caching", "DyDiT + caching"}
    kinds = {type(parse_cache_spec(s.cache)) for s in cached}
    assert kinds == {FORA, FirstBlockCache, TeaCache, ToCa, LearningToCache}
    per_policy = {}
    for s in cached:
        if s.family == "caching":
            per_policy[s.cache.split(":")[0]] = per_policy.get(s.cache.split(":")[0], 0) + 1
    assert all(3 <= n <= 4 for n in per_policy.values()), per_policy
