"""The suite's LightningModules, and the registry of its pretraining methods
(``registry.py``)."""

from __future__ import annotations

from .baselines import DINOModule, SimCLRModule, SupervisedModule
from .common.module import PlanktonModule
from .diffusion import DiffusionModule, NoiseSchedule, UNet, load_diffusion
from .probes import (
    DiffusionFeatures,
    EncoderFeatures,
    FeatureSource,
    OnlineProbe,
    PixelFeatures,
    ProbeModule,
)
from .registry import BASELINES, METHODS, Method, method_of

__all__ = [
    "BASELINES",
    "DINOModule",
    "DiffusionFeatures",
    "DiffusionModule",
    "EncoderFeatures",
    "FeatureSource",
    "METHODS",
    "Method",
    "NoiseSchedule",
    "PixelFeatures",
    "PlanktonModule",
    "OnlineProbe",
    "ProbeModule",
    "SimCLRModule",
    "SupervisedModule",
    "UNet",
    "load_diffusion",
    "method_of",
]
