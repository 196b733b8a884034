"""The plankton data pipeline: sources, splits, preprocessing, cache and per-method views."""

from .datamodule import DatasetSummary, PlanktonDataModule, PlanktonImages
from .preprocessing import Preprocessing
from .synthetic import SyntheticPlankton

__all__ = [
    "DatasetSummary",
    "PlanktonDataModule",
    "PlanktonImages",
    "Preprocessing",
    "SyntheticPlankton",
]
