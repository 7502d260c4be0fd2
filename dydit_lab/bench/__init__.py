"""Speed benchmark: static DiT vs DyDiT (sliced, masked) at a FLOPs target, routers set
without training (:mod:`.setup`), timed and swept over batch sizes (:mod:`.run`); a trained
DyDiT checkpoint timed on the inputs of its own sampling run (:mod:`.checkpoint`)."""
