"""What every LightningModule of the suite shares: the settings it receives from the data, and
how it is rebuilt from a checkpoint without running code from the file."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.views import View


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``: only tensors and
    plain settings, so a checkpoint shared by a colleague is safe to open.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint that loads that way.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"{path} is not a checkpoint that loads with weights_only=True ({error})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return checkpoint


class PlanktonModule(L.LightningModule):
    """Base of the suite's modules. The CLI links these settings from the data, and every
    checkpoint keeps them, so a checkpoint alone knows its classes and its images' format.

    A subclass takes its own settings and ``**data`` and passes ``**data`` here, which saves
    every setting of the whole constructor chain as hyperparameters (but ``not_saved``).

    Args:
        num_classes: linked from the data.
        class_names: linked from the data; stored for prediction.
        in_chans: image channels, linked from the data.
        image_size: image side, linked from the data; new images are preprocessed to it.
    """

    # Constructor arguments that are objects rather than settings.
    not_saved: tuple[str, ...] = ()

    def __init__(
        self,
        num_classes: int = 0,
        class_names: list[str] | None = None,
        in_chans: int = 1,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        # Here, not in the subclass, so that the data's defaults are saved too: Lightning reads
        # the arguments of every constructor up the call chain.
        self.save_hyperparameters(ignore=list(self.not_saved))
        self.class_names = list(class_names or [str(i) for i in range(num_classes)])

    def train_view(self, image_size: int, channels: int) -> View | None:
        """The augmentation of the training batches; None keeps the evaluation view."""
        return None

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> PlanktonModule:
        """The module built from stored hyperparameters, leaving out entries no constructor of
        the class takes (the CLI stores bookkeeping entries of its own)."""
        accepted = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                accepted |= set(inspect.signature(klass.__init__).parameters)
        return cls(**{k: v for k, v in settings.items() if k in accepted and k != "self"})

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> PlanktonModule:
        """The module with the weights of a checkpoint read by ``load_checkpoint``, in eval
        mode."""
        module = cls.from_settings(dict(checkpoint.get("hyper_parameters") or {}))
        module.load_state_dict(checkpoint["state_dict"])
        return module.eval()
