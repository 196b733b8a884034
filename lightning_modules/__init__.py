"""The suite's LightningModules, one file each, and what they are built from."""

from .diffusion import DiffusionModule, load_diffusion
from .features import DiffusionFeatures, FeatureSource
from .noise_schedule import NoiseSchedule
from .probe import ProbeModule
from .supervised import SupervisedModule
from .unet import UNet

__all__ = [
    "DiffusionFeatures",
    "DiffusionModule",
    "FeatureSource",
    "NoiseSchedule",
    "ProbeModule",
    "SupervisedModule",
    "UNet",
    "load_diffusion",
]
