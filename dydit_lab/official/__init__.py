"""Official scale: the released ImageNet DiT / DyDiT checkpoints in latent space.

``vae`` loads a user's diffusers ``AutoencoderKL`` folder (diffusers is the optional extra
``pip install -e .[official]``; nothing else in the lab needs it), ``latents`` encodes an image
folder into the latent shards that ``train`` / ``finetune --data`` read, and ``sample`` draws
images (pixel-space lab models, or latents decoded by the VAE) to PNGs and ADM's ``.npz``, on
one process or sharded under ``torchrun``.
"""
