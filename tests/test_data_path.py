"""The device-resident data path and cheap validation: batches drawn from a split held in memory
are the batches read from the disk cache; a split is held only where it fits; the diffusion
validation reads a fixed subset, one timestep per image, whatever the batch size."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from test_diffusion import TINY_UNET

from datamodules import PlanktonDataModule
from datamodules import datamodule as datamodule_module
from lightning_modules import DiffusionModule

CPU = torch.device("cpu")


@pytest.fixture
def data(tiny_spec):
    return PlanktonDataModule(synthetic=tiny_spec, image_size=16, batch_size=8, progress=False)


def _attach(data, module=None):
    data.trainer = SimpleNamespace(
        lightning_module=module, strategy=SimpleNamespace(root_device=CPU), world_size=1
    )


def _epoch(loader, seed):
    torch.manual_seed(seed)
    return [tuple(part.clone() for part in batch) for batch in loader]


def test_resident_and_streamed_batches_are_the_same(data):
    class Supervised:
        def train_view(self, image_size, channels):
            from lightning_modules.baselines.supervised import supervised_view

            return supervised_view(image_size, channels)

    _attach(data, Supervised())
    resident = data.train_dataloader()
    assert resident.dataset.resident and resident.num_workers == 0
    data.resident_fraction = 0
    data._on_device.clear()
    streamed = data.train_dataloader()
    assert not streamed.dataset.resident
    # Same seed: the same shuffle and the same augmentation of the same images.
    for a, b in zip(_epoch(resident, 3), _epoch(streamed, 3), strict=True):
        for part_a, part_b in zip(a, b, strict=True):
            assert torch.equal(part_a, part_b)
    # Another seed draws other batches.
    assert not torch.equal(_epoch(resident, 4)[0][0], _epoch(resident, 3)[0][0])


def test_a_split_is_held_only_where_it_fits(data, monkeypatch, caplog):
    _attach(data)
    train_bytes = len(data.dataset("train")) * 16 * 16
    monkeypatch.setattr(datamodule_module, "device_memory", lambda device: 4 * train_bytes)
    data.resident_fraction = 0.25  # exactly the training split
    assert data.dataset("train", device=CPU).resident
    # The validation split would take the device past the fraction: it is streamed, and said so.
    with caplog.at_level(logging.INFO):
        assert not data.dataset("val", device=CPU).resident
    assert any("val:" in r.getMessage() and "streamed" in r.getMessage() for r in caplog.records)
    # Held once: a second request reuses the same tensor.
    again = data.dataset("train", device=CPU)
    assert again._images is data._on_device[("train", "cpu")]
    data.resident_fraction = 0.1
    data._on_device.clear()
    assert not data.dataset("train", device=CPU).resident


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_a_bad_resident_fraction_is_refused(tiny_spec, fraction):
    with pytest.raises(ValueError, match="resident_fraction"):
        PlanktonDataModule(synthetic=tiny_spec, resident_fraction=fraction)


def test_validation_reads_a_fixed_evenly_spread_subset(data):
    _attach(data, SimpleNamespace(val_images=5))
    size = len(data.dataset("val"))
    assert size > 5
    seen = [torch.cat([batch[2] for batch in data.val_dataloader()]) for _ in range(2)]
    assert torch.equal(seen[0], seen[1]) and len(seen[0]) == 5
    assert seen[0][0] == 0 and seen[0][-1] == size - 1
    assert np.all(np.diff(seen[0].numpy()) > 0)
    _attach(data, SimpleNamespace(val_images=0))  # 0: every image
    assert sum(len(batch[1]) for batch in data.val_dataloader()) == size


def _validation_loss(tiny_spec, tmp_path, batch_size, val_images):
    data = PlanktonDataModule(
        synthetic=tiny_spec, image_size=16, eval_batch_size=batch_size, progress=False
    )
    torch.manual_seed(0)
    module = DiffusionModule(**{**TINY_UNET, "val_timesteps": (5, 20, 50)}, val_images=val_images)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    seen = []
    module.ema.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    metrics = trainer.validate(module, data, verbose=False)[0]
    return metrics, sum(seen)


def test_diffusion_validation_costs_one_pass_per_image_in_any_batching(tiny_spec, tmp_path):
    whole, passes = _validation_loss(tiny_spec, tmp_path, 64, val_images=6)
    assert passes == 6  # one forward pass per validation image, not one per timestep
    pieces, _ = _validation_loss(tiny_spec, tmp_path, 4, val_images=6)
    assert set(whole) == {"val/loss", "val/loss_t5", "val/loss_t20", "val/loss_t50"}
    for key in whole:
        assert whole[key] == pytest.approx(pieces[key], rel=1e-5), key
