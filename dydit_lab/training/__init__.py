"""Training: one loop (:mod:`.loop`) and one objective per model family (:mod:`.pretrain`,
:mod:`.dydit`, :mod:`.flexidit`)."""
