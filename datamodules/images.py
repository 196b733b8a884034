"""The images of one split as a Dataset that reads and transforms a whole batch at a time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .views import View


class PlanktonImages(Dataset):
    """Images of one split, read from the cache a whole batch at a time.

    Items are ``(image, label, index)``; ``index`` is the image's position in this split, a
    stable identity for per-image randomness. A DataLoader's batch is read with one access to the
    cache and transformed with one call of the (batched) view, on the device the images are on:
    ``__getitems__`` returns the collated batch ``(images, labels, indices)``, so read it through
    ``loader`` (or a DataLoader with ``collate_fn=keep_batch``).

    Args:
        images: the dataset's cache file (read memory-mapped, opened once per worker), or the
            split's images already in memory, ``(len(rows), C, S, S)`` uint8 on any device: then
            batches are drawn and augmented on that device, without workers.
        rows: each image's row in the cache file.
        labels: each image's class index.
        transform: the batched view applied to every batch.
    """

    def __init__(
        self,
        images: Path | torch.Tensor,
        rows: np.ndarray,
        labels: np.ndarray,
        transform: View,
    ) -> None:
        self.rows = rows
        self.labels = labels
        self.transform = transform
        self.resident = isinstance(images, torch.Tensor)
        self.cache_path = None if self.resident else images
        self._images = images if self.resident else None
        self._labels = torch.as_tensor(labels, device=images.device) if self.resident else None

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.resident:
            at = torch.as_tensor(positions, device=self._images.device)
            return self._images[at], self._labels[at], at
        if self._images is None:  # opened lazily, once per DataLoader worker
            self._images = np.load(self.cache_path, mmap_mode="r")
        images = torch.from_numpy(np.array(self._images[self.rows[positions]]))
        return images, torch.as_tensor(self.labels[positions]), torch.as_tensor(positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | list[torch.Tensor], int, int]:
        images, _, _ = self._read([index])
        views = self.transform(images)
        image = [view[0] for view in views] if isinstance(views, list) else views[0]
        return image, int(self.labels[index]), index

    def __getitems__(self, positions: list[int]) -> tuple:
        images, labels, positions = self._read(positions)
        return self.transform(images), labels, positions

    def loader(self, batch_size: int, **options: object) -> DataLoader:
        """A DataLoader of whole batches; ``options`` are DataLoader arguments."""
        return DataLoader(self, batch_size=batch_size, collate_fn=keep_batch, **options)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": self._images if self.resident else None}


def keep_batch(batch: tuple) -> tuple:
    """The collate function of ``PlanktonImages``: its batches come collated already."""
    return batch


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
