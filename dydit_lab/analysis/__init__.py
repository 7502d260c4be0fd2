"""Analyses behind DyDiT's premise: the loss gap over timesteps (Fig. 1a), where the loss sits
in the image (Fig. 1b), and what a trained DyDiT's routers do over a sampling run."""
