"""The model families: DiT (official layout), DyDiT (TDW + SDT routers) and FlexiDiT.

Models know nothing of training, evaluation or plotting. Each answers for itself what one
sampling step costs (``model.sampling_cost(steps)``).
"""

from .configs import DIT_CONFIGS, DiTConfig, get_config
from .dit import DiT, create_model
from .dydit import CompleteModel, DyDiT, RoutingRecorder, sampling_flops
from .flexidit import FlexiDiT, PatchSchedule, scheduled_model
from .routers import Routing

__all__ = ["DIT_CONFIGS", "CompleteModel", "DiT", "DiTConfig", "DyDiT", "FlexiDiT", "PatchSchedule",
           "Routing", "RoutingRecorder", "create_model", "get_config", "sampling_flops", "scheduled_model"]
