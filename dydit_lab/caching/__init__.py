"""Training-free peers that spend less per image by reusing features across sampling steps:
FORA, the first/dual-block caches, TeaCache, ToCa and Learning-to-Cache, over any DiT of the
package, a DyDiT included (a computed block still runs at its dynamic width).

``cached_model(model, "fora:2")`` wraps a model for sampling; its ``sampling_cost(steps)`` is
counted from what a real sampling run computed (reused blocks free, probes charged).
"""

from .calibration import calibrate_teacache, load_coefficients, save_coefficients
from .drift import CachingDrift, caching_drift, relative_distance
from .l2c import LearningToCache, load_router, save_router, train_cache_router
from .model import CachedModel, CallRecord, Step, summarise
from .policies import FORA, CachePolicy, FirstBlockCache, TeaCache, relative_l1
from .spec import CACHE_DIR, SPECS, cache_file, cached_model, parse_cache_spec
from .toca import ToCa

__all__ = ["CACHE_DIR", "FORA", "SPECS", "CachePolicy", "CachedModel", "CachingDrift", "CallRecord", "FirstBlockCache",
           "LearningToCache", "Step", "TeaCache", "ToCa", "cache_file", "cached_model", "caching_drift", "calibrate_teacache",
           "load_coefficients", "load_router", "parse_cache_spec", "relative_l1", "save_coefficients",
           "relative_distance", "save_router", "summarise", "train_cache_router"]
