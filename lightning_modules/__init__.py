"""The suite's LightningModules, one file each."""

from .supervised import SupervisedModule

__all__ = ["SupervisedModule"]
