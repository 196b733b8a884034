"""The registry of the suite's pretraining methods.

``METHODS`` is the one list of methods: the experiment's stages, the report's rows, the probes'
encoder reading, clustering and ``classify``'s messages all derive from it. Adding a method is
one file in ``baselines/``, one config and one line here (see the README, "Adding a method").
Modules are named by class path and imported when first used, so the probes can read the
registry without importing the modules that import them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .common.module import PlanktonModule


@dataclass(frozen=True)
class Method:
    """One pretraining method.

    Attributes:
        class_path: its LightningModule, ``package.module.Class`` (imported when first used,
            so a registry line is all a new method adds here).
        display_name: its name in reports and messages.
        per_regime: True when it learns from labels, so it is trained once per regime (and is
            itself a classifier); False when it is label-free and trained once.
        marker: a state-dict prefix that only this method's checkpoints have: how a checkpoint
            is recognised.
        probe: how its frozen encoder is read: ``diffusion`` (``DiffusionFeatures``, a grid of
            layers x timesteps) or ``encoder`` (``EncoderFeatures``: the module's
            ``encoders()``, the first by default).
    """

    class_path: str
    display_name: str
    per_regime: bool
    marker: str
    probe: Literal["diffusion", "encoder"] = "encoder"

    @property
    def module(self) -> type[PlanktonModule]:
        package, name = self.class_path.rsplit(".", 1)
        return getattr(importlib.import_module(package), name)


METHODS: Mapping[str, Method] = {
    "diffusion": Method(
        "lightning_modules.DiffusionModule", "diffusion", False, "ema.", probe="diffusion"
    ),
    "supervised": Method("lightning_modules.SupervisedModule", "supervised", True, "model."),
    "simclr": Method("lightning_modules.SimCLRModule", "SimCLR", False, "projection_head."),
    "dino": Method("lightning_modules.DINOModule", "DINO", False, "teacher_backbone."),
    "mae": Method("lightning_modules.baselines.mae.MAEModule", "MAE", False, "decoder."),
}
# The methods the diffusion features are compared with.
BASELINES = tuple(name for name, method in METHODS.items() if method.probe == "encoder")


def method_of(state_dict: Mapping[str, object]) -> str | None:
    """The registered method whose checkpoint this state dict is, or None."""
    for name, method in METHODS.items():
        if any(key.startswith(method.marker) for key in state_dict):
            return name
    return None
