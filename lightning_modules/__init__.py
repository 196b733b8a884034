"""The suite's LightningModules, one file each, and what they are built from."""

from .diffusion import DiffusionModule, load_diffusion
from .features import DiffusionFeatures
from .noise_schedule import NoiseSchedule
from .supervised import SupervisedModule
from .unet import UNet

__all__ = [
    "DiffusionFeatures",
    "DiffusionModule",
    "NoiseSchedule",
    "SupervisedModule",
    "UNet",
    "load_diffusion",
]
