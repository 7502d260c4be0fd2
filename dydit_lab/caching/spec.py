"""Cache specs: one short string names a policy and its settings (``evaluate --cache SPEC``, the
``cache`` of a comparison strategy).

``NAME[:VALUE][,KEY=VALUE...]``, e.g. ``fora:2``, ``fbcache:0.1``, ``dbcache:0.1,first=2,last=1``,
``teacache:0.2,coef=teacache-DiT-lab-L.json``, ``toca:0.3,interval=3``,
``l2c:0.5,router=l2c-DiT-lab-L-50.pt``. A file that is not found as given is looked up in
``data/caching/`` (where the calibration commands write by default).
"""

from __future__ import annotations

from pathlib import Path

from ..paths import DATA_DIR
from .calibration import load_coefficients
from .l2c import LearningToCache
from .model import CachedModel
from .policies import FORA, CachePolicy, FirstBlockCache, TeaCache
from .toca import ToCa

CACHE_DIR = DATA_DIR / "caching"  # TeaCache coefficients and L2C routers of the lab models

# name -> (main value's meaning, its type, options with their types)
SPECS = {
    "fora": ("interval", int, {}),
    "fbcache": ("threshold", float, {"warmup": int}),
    "dbcache": ("threshold", float, {"first": int, "last": int, "warmup": int}),
    "teacache": ("threshold", float, {"coef": str}),
    "toca": ("fraction", float, {"interval": int}),
    "l2c": ("threshold", float, {"router": str}),
}


def cache_file(name: str) -> Path:
    """``name`` as given when it exists, else under ``data/caching/``."""
    path = Path(name)
    return path if path.exists() or path.is_absolute() else CACHE_DIR / path


def _value(spec: str, key: str, text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"cache spec {spec!r}: {key} must be {'an integer' if kind is int else 'a number'}, "
                         f"got {text!r}") from None


def parse_cache_spec(spec: str) -> CachePolicy:
    """The policy a spec string names (see the module docstring); a one-line ValueError names
    anything unknown or out of range."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a cache spec names a policy ({', '.join(SPECS)}), got {spec!r}")
    head, *options = [part.strip() for part in spec.split(",")]
    name, _, main = head.partition(":")
    name = name.strip().lower()
    if name not in SPECS:
        raise ValueError(f"unknown cache policy {name!r} in {spec!r}; choose one of {', '.join(SPECS)}")
    main_key, main_kind, allowed = SPECS[name]
    if not main:
        raise ValueError(f"cache spec {spec!r} needs its {main_key}, e.g. {name}:{'2' if main_kind is int else '0.1'}")
    value = _value(spec, main_key, main, main_kind)
    kwargs = {}
    for option in options:
        key, eq, text = option.partition("=")
        key = key.strip()
        if not eq or key not in allowed:
            raise ValueError(f"cache spec {spec!r}: unknown option {option!r} for {name} "
                             f"(options: {', '.join(allowed) or 'none'})")
        kwargs[key] = text.strip() if allowed[key] is str else _value(spec, key, text.strip(), allowed[key])
    if name == "fora":
        return FORA(value)
    if name in ("fbcache", "dbcache"):
        first, last = (kwargs.get("first", 1), kwargs.get("last", 0 if name == "fbcache" else 1))
        return FirstBlockCache(value, first=first, last=last, warmup=kwargs.get("warmup", 0))
    if name == "teacache":
        coefficients = load_coefficients(cache_file(kwargs["coef"])) if "coef" in kwargs else None
        return TeaCache(value, coefficients)
    if name == "toca":
        return ToCa(value, kwargs.get("interval", 3))
    if "router" not in kwargs:
        raise ValueError(f"cache spec {spec!r}: l2c needs router=FILE (python -m dydit_lab train-cache-router)")
    return LearningToCache(cache_file(kwargs["router"]), value)


def cached_model(model, spec: str | CachePolicy) -> CachedModel:
    """``model`` (a DiT or DyDiT) sampled with the policy ``spec`` names (or a policy object)."""
    policy = spec if isinstance(spec, CachePolicy) else parse_cache_spec(spec)
    return CachedModel(model, policy)
