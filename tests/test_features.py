"""The settings of ``DiffusionFeatures``: the feature-cache fingerprint and the checkpoint's
``init_args`` they give must not change, or caches and probes built before are lost."""

import inspect
import json
from dataclasses import fields

import torch

from lightning_modules import DiffusionFeatures, DiffusionModule
from lightning_modules.diffusion.noise_schedule import NoiseSchedule
from lightning_modules.diffusion.unet import UNet
from lightning_modules.probes.features import DiffusionSettings

# Computed before the settings became one dataclass: caches written then must still be found.
DEFAULT_FINGERPRINT = "5db0294f87bb177141d86a5b"
CHANGED_FINGERPRINT = "5e3fe5886761866a0ec7bde3"


def _fixed_unet() -> UNet:
    """A tiny U-Net whose weights depend on no random generator."""
    unet = UNet(
        image_size=16, base_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_heads=2
    )
    for tensor in unet.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(torch.linspace(-1, 1, tensor.numel()).reshape(tensor.shape))
    return unet


def test_default_settings_keep_their_fingerprint():
    source = DiffusionFeatures.from_unet(_fixed_unet(), NoiseSchedule())
    assert json.dumps(source.settings()) == json.dumps(
        {
            "source": "diffusion",
            "layers": [
                *("enc.0.0", "enc.0.1", "enc.0.2", "enc.1.0", "enc.1.1", "mid.0", "mid.1"),
                *("dec.1.0", "dec.1.1", "dec.1.2", "dec.0.0", "dec.0.1", "dec.0.2"),
            ],
            "timesteps": [1, 2, 3, 5, 8, 11, 16, 25, 50, 100, 200],
            "pooling": "avg",
            "pool_size": 2,
            "noise_draws": 1,
            "seed": 0,
            "concat_timesteps": False,
            "schedule": ["linear", 1000],
        }
    )
    assert source.fingerprint() == DEFAULT_FINGERPRINT


def test_every_setting_keeps_its_fingerprint():
    source = DiffusionFeatures.from_unet(
        _fixed_unet(),
        NoiseSchedule("cosine", 500),
        layers=[8],
        timesteps=(3, 40),
        pooling="adaptive",
        pool_size=2,
        noise_draws=2,
        seed=5,
        stack_timesteps=True,
        concat_timesteps=True,
        micro_batch=4,
    )
    assert source.fingerprint() == CHANGED_FINGERPRINT


def test_checkpoint_sources_record_their_init_args_in_order(tmp_path):
    module = DiffusionModule(
        image_size=16, base_channels=8, channel_mult=(1, 2), timesteps=100, val_timesteps=(5,)
    )
    path = tmp_path / "diffusion.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    source = DiffusionFeatures(str(path), layers=("mid.*", 8), timesteps=(3, 40), weights="raw")
    assert list(source.init_args.items()) == [
        ("checkpoint", str(path.resolve())),
        ("layers", ["mid.*", 8]),
        ("timesteps", [3, 40]),
        ("pooling", "avg"),
        ("pool_size", 2),
        ("noise_draws", 1),
        ("seed", 0),
        ("stack_timesteps", False),
        ("concat_timesteps", False),
        ("micro_batch", 16),
        ("weights", "raw"),
    ]


def test_the_cli_signature_lists_every_setting_with_its_default():
    parameters = inspect.signature(DiffusionFeatures.__init__).parameters
    spelled_out = {
        name: parameter.default
        for name, parameter in parameters.items()
        if name not in ("self", "checkpoint", "weights")
    }
    assert spelled_out == {item.name: item.default for item in fields(DiffusionSettings)}
