"""Label-free diffusion pretraining: the U-Net, its noise schedule, the LightningModule and its
sampling callback."""

from .module import DiffusionModule, diffusion_view, load_diffusion
from .noise_schedule import NoiseSchedule
from .unet import UNet

__all__ = ["DiffusionModule", "NoiseSchedule", "UNet", "diffusion_view", "load_diffusion"]
