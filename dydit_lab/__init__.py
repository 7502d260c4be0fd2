"""dydit_lab: Dynamic Diffusion Transformers (DyDiT) and their peers, for study and for speed."""

from .checkpoints import load_model
from .models import DIT_CONFIGS, DiT, DyDiT, FlexiDiT, create_model

__all__ = ["DIT_CONFIGS", "DiT", "DyDiT", "FlexiDiT", "create_model", "load_model"]
__version__ = "0.1.0"
