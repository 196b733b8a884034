"""What a probe's heads read: every key's features of a batch or a split, zero-padded to one width
and stacked, from the feature cache (``cached`` mode) or the backbone (``online`` mode)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from datamodules.cache import default_cache_dir

from .feature_cache import load_or_extract
from .features import FeatureKey, FeatureSource


class ProbeInputs:
    """The features of ``source``'s ``keys`` as ``(keys, batch, width)`` float32 tensors.

    Both modes round the features to float16, as the feature cache stores them, so cached and
    online probes train on identical inputs. A cached split is read once, then kept in memory
    (``cached``). The trainer gives the data, the strategy (every rank extracts its shard) and
    where the heads are.
    """

    def __init__(
        self,
        source: FeatureSource,
        keys: list[FeatureKey],
        width: int,
        mode: str,
        batch_size: int,
        cache_dir: str | None,
    ) -> None:
        self.source, self.keys, self.width = source, keys, width
        self.mode, self.batch_size, self.cache_dir = mode, batch_size, cache_dir
        self.cached: dict[str, torch.Tensor] = {}

    def cache_folder(self, datamodule: object) -> Path:
        """Where the features are cached: ``cache_dir``, else the data's cache folder."""
        return Path(self.cache_dir or getattr(datamodule, "cache_dir", None) or default_cache_dir())

    def stack(self, features: dict[FeatureKey, torch.Tensor]) -> torch.Tensor:
        """``(batch, keys, width)`` zero-padded, rounded to float16 like the cache."""
        batch = next(iter(features.values())).shape[0]
        out = torch.zeros(batch, len(self.keys), self.width, dtype=torch.float16)
        for i, key in enumerate(self.keys):
            out[:, i, : features[key].shape[1]] = features[key].to(torch.float16).cpu()
        return out

    def split(self, split: str, trainer: L.Trainer) -> torch.Tensor:
        """All features of ``split`` ``(N, keys, width)``, from the feature cache."""
        if split not in self.cached:
            features = load_or_extract(
                self.source,
                trainer.datamodule.dataset(split),
                self.cache_folder(trainer.datamodule),
                self.batch_size,
                trainer.lightning_module.device,
                progress=trainer.is_global_zero,
                strategy=trainer.strategy,
            )
            self.cached[split] = self.stack(features)
        return self.cached[split]

    def of_images(
        self, images: torch.Tensor, indices: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """``(keys, batch, width)`` features of images by the backbone; ``indices`` key the
        per-image diffusion noise."""
        return self._on(self.stack(self.source(images, indices)), device)

    def batch(self, batch: tuple, split: str, trainer: L.Trainer) -> torch.Tensor:
        """``(keys, batch, width)`` features of a batch of ``split``."""
        images, _, indices = batch
        device = trainer.lightning_module.device
        if self.mode == "cached":
            return self._on(self.split(split, trainer)[indices.cpu()], device)
        return self.of_images(images, indices, device)

    def collect(self, split: str, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor]:
        """Every feature ``(keys, N, width)`` and label of ``split``, in the evaluation view."""
        dataset = trainer.datamodule.dataset(split)
        device = trainer.lightning_module.device
        labels = torch.as_tensor(dataset.labels, device=device)
        if self.mode == "cached":
            return self._on(self.split(split, trainer), device), labels
        loader = dataset.loader(self.batch_size, generator=torch.Generator())
        parts = [self.batch(batch, split, trainer) for batch in loader]
        return torch.cat(parts, dim=1), labels

    @staticmethod
    def _on(stacked: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Stacked ``(batch, keys, width)`` float16 as the heads read them."""
        return stacked.to(device, torch.float32).transpose(0, 1)
