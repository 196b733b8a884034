"""The methods the diffusion features are compared with, each beside its training view."""

from .dino import DINOModule
from .self_supervised import SelfSupervisedModule
from .simclr import SimCLRModule
from .supervised import SupervisedModule

__all__ = ["DINOModule", "SelfSupervisedModule", "SimCLRModule", "SupervisedModule"]
