import pytest
import torch

from lightning_modules.diffusion import unet as unet_module
from lightning_modules.diffusion.noise_schedule import NoiseSchedule
from lightning_modules.diffusion.unet import AttentionBlock, UNet, attention


@pytest.mark.parametrize(
    "settings",
    [
        {"in_chans": 1, "image_size": 16, "channel_mult": (1, 2), "attention_resolutions": (8,)},
        {"in_chans": 3, "image_size": 32, "channel_mult": (1, 2, 2), "attention_resolutions": ()},
        {"in_chans": 1, "image_size": 24, "channel_mult": (1, 1, 2, 2), "num_res_blocks": 1},
        {"in_chans": 1, "image_size": 8, "channel_mult": (1,), "attention_resolutions": (8,)},
    ],
)
def test_unet_output_matches_input_shape(settings):
    unet = UNet(base_channels=8, num_heads=2, **settings)
    x = torch.randn(2, settings["in_chans"], settings["image_size"], settings["image_size"])
    out = unet(x, torch.tensor([0, 999]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_block_names_resolutions_and_channels():
    unet = UNet(image_size=32, base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=2)
    info = unet.info
    assert unet.block_names[:4] == ["enc.0.0", "enc.0.1", "enc.0.2", "enc.1.0"]
    assert "mid.0" in info and "dec.2.1" in info and unet.block_names[-1] == "dec.0.2"
    assert (info["enc.0.0"].resolution, info["enc.0.0"].channels) == (32, 8)
    assert (info["enc.1.0"].resolution, info["enc.1.0"].channels) == (16, 16)
    assert (info["mid.0"].resolution, info["mid.0"].channels) == (8, 32)
    # The last block of a decoder level upsamples to the next level's resolution.
    assert info["dec.2.2"].resolution == 16 and info["dec.1.2"].resolution == 32
    assert sum(name.startswith("dec.") for name in info) == 3 * 3
    # Names are module paths: the state dict and get_submodule agree with them.
    assert unet.block("dec.1.0") is unet.dec[1][0]
    assert any(key.startswith("enc.1.0.") for key in unet.state_dict())


def test_attention_only_at_requested_resolutions():
    unet = UNet(image_size=32, base_channels=8, attention_resolutions=(16,))
    sizes = []
    for module in unet.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_hook(lambda m, inputs, out: sizes.append(inputs[0].shape[-1]))
    unet(torch.randn(1, 1, 32, 32), torch.tensor([3]))
    lowest = min(info.resolution for info in unet.info.values())
    # Two encoder and three decoder blocks at 16x16, plus the middle block at the lowest size.
    assert sorted(sizes) == sorted([16] * 5 + [lowest])


def test_image_size_must_divide_by_the_downsampling():
    with pytest.raises(ValueError, match="image_size 20 is not divisible by 8"):
        UNet(image_size=20, channel_mult=(1, 2, 2, 2))


def test_timestep_conditioning_changes_the_output():
    unet = UNet(image_size=16, base_channels=8, channel_mult=(1, 2))
    for parameter in unet.parameters():  # zero-initialised output layers hide the timestep
        torch.nn.init.normal_(parameter, std=0.05)
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(unet(x, torch.tensor([5])), unet(x, torch.tensor([900])))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_forward_process_has_the_right_mean_and_variance(kind):
    schedule = NoiseSchedule(kind, 1000)
    torch.manual_seed(0)
    x0 = torch.full((20000, 1), 0.6)
    for step in (0, 100, 500, 999):
        t = torch.full((20000,), step)
        xt = schedule.q_sample(x0, t, torch.randn_like(x0))
        abar = schedule.alphas_cumprod[step]
        assert xt.mean().item() == pytest.approx(0.6 * abar.sqrt().item(), abs=0.02)
        assert xt.var().item() == pytest.approx(
            1 - abar.item(), abs=0.02 + 0.03 * (1 - abar.item())
        )


def test_schedules_destroy_the_signal_monotonically():
    for kind in ("linear", "cosine"):
        abar = NoiseSchedule(kind).alphas_cumprod
        assert abar[0] > 0.99 and abar[-1] < 1e-3
        assert (abar[1:] < abar[:-1]).all()
    # The cosine schedule keeps more signal in the middle of the chain.
    assert NoiseSchedule("cosine").alphas_cumprod[500] > NoiseSchedule("linear").alphas_cumprod[500]


def test_timesteps_outside_the_chain_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        NoiseSchedule().check([0, 1000])
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule("quadratic")


def _small_unet():
    torch.manual_seed(0)
    return UNet(image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=())


def test_samplers_return_finite_images_of_the_right_shape():
    schedule = NoiseSchedule("linear", 20)
    unet = _small_unet().eval()
    ddpm = schedule.ddpm_sample(unet, (3, 1, 8, 8), torch.Generator().manual_seed(0))
    ddim = schedule.ddim_sample(unet, (3, 1, 8, 8), 5, generator=torch.Generator().manual_seed(0))
    for images in (ddpm, ddim):
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
        assert images.min() >= -1 and images.max() <= 1


def test_ddim_is_deterministic_for_a_seed():
    schedule = NoiseSchedule("cosine", 50)
    unet = _small_unet().eval()

    def draw(seed):
        return schedule.ddim_sample(
            unet, (2, 1, 8, 8), 10, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    with pytest.raises(ValueError, match="DDIM steps"):
        schedule.ddim_sample(unet, (1, 1, 8, 8), 0)


def test_cpu_attention_without_amx_computes_bfloat16_in_float32(monkeypatch):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 64, 8).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), expected)
    seen = []
    kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        unet_module.F,
        "scaled_dot_product_attention",
        lambda *tensors: seen.append(tensors[0].dtype) or kernel(*tensors),
    )
    with torch.autocast("cpu", torch.bfloat16):
        low = attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert low.dtype == torch.bfloat16
    without_amx = not torch.cpu._is_amx_tile_supported()
    assert seen == [torch.float32 if without_amx else torch.bfloat16]
    assert (low.float() - expected).abs().max() < 0.05  # the inputs' rounding, no more
