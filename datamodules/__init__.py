"""The plankton data pipeline: sources, splits, preprocessing, cache and per-method views."""

from .datamodule import PlanktonDataModule
from .images import PlanktonImages
from .preprocessing import Preprocessing
from .summary import DatasetSummary
from .synthetic import SyntheticPlankton

__all__ = [
    "DatasetSummary",
    "PlanktonDataModule",
    "PlanktonImages",
    "Preprocessing",
    "SyntheticPlankton",
]
