"""Speed benchmark: static DiT vs DyDiT (sliced, masked) at a FLOPs target, on random-weight
models and inputs (:mod:`.workload`) with routers set without training (:mod:`.router_setting`),
both put together by :mod:`.setup`; timed and swept over batch sizes (:mod:`.run`) or profiled
(:mod:`.profile`); a trained DyDiT checkpoint timed on the inputs of its own sampling run
(:mod:`.checkpoint`)."""
