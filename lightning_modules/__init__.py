"""The suite's LightningModules, one file each, and what they are built from."""

from .diffusion import DiffusionModule, load_diffusion
from .dino import DINOModule
from .features import DiffusionFeatures, EncoderFeatures, FeatureSource
from .noise_schedule import NoiseSchedule
from .probe import ProbeModule
from .simclr import SimCLRModule
from .supervised import SupervisedModule
from .unet import UNet

__all__ = [
    "DINOModule",
    "DiffusionFeatures",
    "DiffusionModule",
    "EncoderFeatures",
    "FeatureSource",
    "NoiseSchedule",
    "ProbeModule",
    "SimCLRModule",
    "SupervisedModule",
    "UNet",
    "load_diffusion",
]
