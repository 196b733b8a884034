"""Frozen features and what reads them: feature sources, the feature cache, the probe grid, its
reports and clustering."""

from .features import (
    DiffusionFeatures,
    EncoderFeatures,
    FeatureKey,
    FeatureSource,
    PixelFeatures,
    UNetFeatures,
)
from .online import OnlineProbe
from .probe import ProbeModule

__all__ = [
    "DiffusionFeatures",
    "EncoderFeatures",
    "FeatureKey",
    "FeatureSource",
    "OnlineProbe",
    "PixelFeatures",
    "ProbeModule",
    "UNetFeatures",
]
