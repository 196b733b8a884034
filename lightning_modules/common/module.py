"""What every LightningModule of the suite shares: the settings it receives from the data, and
how it is rebuilt from a checkpoint without running code from the file."""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.views import View

from .checkpoint_io import check_finite


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``: only tensors and
    plain settings, so a checkpoint shared by a colleague is safe to open.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint that loads that way, or its weights are not
            finite (a diverged run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise  # the file could not be read, or is too large: the error says so
    except Exception as error:  # random bytes make the unpickler raise almost anything
        raise ValueError(
            f"{path} is not a checkpoint that loads safely ({_load_failure(error)}): plankton "
            "reads only tensors and plain settings (torch.load with weights_only=True); give "
            "a last.ckpt written by plankton fit"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no state_dict)")
    check_finite(checkpoint, path)
    return checkpoint


def _load_failure(error: Exception) -> str:
    """The one informative sentence of a ``torch.load`` failure: its message spans a dozen lines
    of advice that does not apply (loading with weights_only=False would run the file's code)."""
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+?)(?:\. |\n|$)", str(error))
    if found:
        return found.group(1)
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def _abbreviated(names: list[str], shown: int = 6) -> str:
    """``names`` for a one-line message: the first few, then how many more."""
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return "[" + ", ".join(names[:shown]) + more + "]"


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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another number of classes and warn about one of other class
        names, before its weights are loaded: the data decides the classes (the CLI links them
        here), and a checkpoint of other classes would either fail on a tensor's size or score
        its predictions against the wrong labels.

        Raises:
            ValueError: the checkpoint has another number of classes than the data.
        """
        saved = (checkpoint.get("hyper_parameters") or {}).get("class_names")
        if saved is None:
            return
        saved, current = [str(name) for name in saved], [str(n) for n in self.class_names]
        path = self._trainer.ckpt_path if self._trainer is not None else None
        checkpoint_name = f"checkpoint {path}" if path else "the checkpoint"
        if len(saved) != len(current):
            raise ValueError(
                f"{checkpoint_name} was trained on {len(saved)} classes {_abbreviated(saved)} but "
                f"the data has {len(current)} {_abbreviated(current)}: give data with the "
                "classes the checkpoint was trained on (data.source, data.class_map, "
                "data.min_per_class)"
            )
        if saved != current:
            only_saved = [name for name in saved if name not in current]
            only_data = [name for name in current if name not in saved]
            difference = (
                f"only in the checkpoint {_abbreviated(only_saved)}, only in the data "
                f"{_abbreviated(only_data)}"
                if only_saved or only_data
                else f"the same names in another order: checkpoint {_abbreviated(saved)}, data "
                f"{_abbreviated(current)}"
            )
            warnings.warn(
                f"the class names of {checkpoint_name} differ from the data's ({difference}): "
                "output i of the model is scored as the data's class i, so check that the "
                "classes correspond",
                stacklevel=2,
            )

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
