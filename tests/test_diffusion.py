import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import PlanktonDataModule
from lightning_modules import DiffusionFeatures, DiffusionModule, OnlineProbe, load_diffusion
from lightning_modules.diffusion.per_image_noise import per_image_noise
from lightning_modules.probes.online import BEST_PROBE_CHECKPOINT
from lightning_modules.probes.unet_blocks import capture

TINY_UNET = {
    "image_size": 16,
    "base_channels": 8,
    "channel_mult": (1, 2),
    "attention_resolutions": (8,),
    "num_heads": 2,
    "timesteps": 100,
    "val_timesteps": (5, 50),
    "sample_every_n_epochs": 0,
}


@pytest.fixture
def datamodule(tiny_spec):
    return PlanktonDataModule(synthetic=tiny_spec, image_size=16, batch_size=16, progress=False)


def _trainer(root, **kwargs):
    kwargs.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def _fixed_loss(module, images):
    """Denoising loss of the raw weights at fixed timesteps and noise."""
    module.eval()
    with torch.no_grad():
        t = torch.linspace(10, 99, len(images)).long()
        noise = per_image_noise(range(len(images)), 0, 1, images.shape[1:])
        loss = F.mse_loss(module.unet(module.schedule.q_sample(images, t, noise), t), noise)
    module.train()
    return loss.item()


def test_training_lowers_the_denoising_loss(datamodule, tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(**TINY_UNET, lr=1.6e-2, warmup_steps=5)  # 2e-3 at batch 16
    images = torch.stack([datamodule.dataset("train")[i][0] for i in range(8)])
    before = _fixed_loss(module, images)
    _trainer(tmp_path, max_steps=40, max_epochs=-1, limit_val_batches=0).fit(module, datamodule)
    after = _fixed_loss(module, images)
    # Measured: 1.01 at initialisation (the output layer starts at zero) and 0.09 after 40 steps.
    assert before == pytest.approx(1.0, abs=0.15)
    assert after < 0.3 * before


def test_ema_follows_the_momentum_formula():
    module = DiffusionModule(**TINY_UNET, ema_decay=0.99, ema_warmup=False)
    for ema, weights in zip(module.ema.parameters(), module.unet.parameters(), strict=True):
        ema.data.fill_(2.0)
        weights.data.fill_(1.0)
    module.update_ema()
    assert all(
        torch.allclose(p, torch.tensor(2.0 * 0.99 + 1.0 * 0.01)) for p in module.ema.parameters()
    )
    warm = DiffusionModule(**TINY_UNET, ema_decay=0.99, ema_warmup=True)
    for ema, weights in zip(warm.ema.parameters(), warm.unet.parameters(), strict=True):
        ema.data.fill_(0.0)
        weights.data.fill_(1.0)
    warm.update_ema()  # step 0: decay (1 + 0) / (10 + 0) = 0.1
    assert all(torch.allclose(p, torch.tensor(0.9)) for p in warm.ema.parameters())
    assert not any(p.requires_grad for p in warm.ema.parameters())


def test_checkpoint_round_trip_and_resume(datamodule, tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(**TINY_UNET)
    trainer = _trainer(tmp_path)
    trainer.fit(module, datamodule)
    steps = trainer.global_step
    checkpoint = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(checkpoint)

    loaded = load_diffusion(checkpoint)
    for name, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert not torch.equal(loaded.ema.stem.weight, loaded.unet.stem.weight)

    resumed = DiffusionModule(**TINY_UNET)
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(resumed, datamodule, ckpt_path=checkpoint)
    assert trainer.global_step == 2 * steps
    # The EMA continued from the saved one rather than restarting from the weights.
    assert not torch.equal(resumed.ema.stem.weight, resumed.unet.stem.weight)


def test_checkpoints_load_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(
        {"state_dict": {}, "hyper_parameters": {"base_channels": Payload()}}, tmp_path / "x.ckpt"
    )
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|global"):
        load_diffusion(tmp_path / "x.ckpt")
    assert not marker.exists()


def test_a_mismatched_config_names_the_setting(tmp_path):
    module = DiffusionModule(**TINY_UNET)
    trainer = _trainer(tmp_path)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    with pytest.raises(
        ValueError, match="base_channels is 8 in the checkpoint but 16 in the config"
    ):
        load_diffusion(path, {"base_channels": 16, "channel_mult": [1, 2]})
    assert load_diffusion(path, {"channel_mult": [1, 2]}).hparams.base_channels == 8


def test_sampling_from_a_module_is_reproducible():
    module = DiffusionModule(**TINY_UNET).eval()
    first = module.sample(2, "ddim", steps=4, seed=3)
    assert first.shape == (2, 1, 16, 16) and torch.isfinite(first).all()
    assert torch.equal(first, module.sample(2, "ddim", steps=4, seed=3))
    assert module.sample(1, "ddpm", seed=0).shape == (1, 1, 16, 16)


# -- frozen features -------------------------------------------------------------------------


@pytest.fixture
def trained_module():
    torch.manual_seed(1)
    module = DiffusionModule(**TINY_UNET)
    for parameter in module.ema.parameters():  # non-zero everywhere, unlike a fresh U-Net
        parameter.data.normal_(std=0.1)
    return module


def _features(module, **settings):
    settings.setdefault("timesteps", (1, 10, 50))
    return DiffusionFeatures.from_unet(module.ema, module.schedule, **settings)


def test_feature_keys_and_shapes(trained_module):
    source = _features(trained_module, layers=["enc.1.*", "dec.0.0"], pooling="avg_std")
    assert source.layers == ["enc.1.0", "enc.1.1", "dec.0.0"]
    images = torch.randn(3, 1, 16, 16)
    features = source(images, torch.arange(3))
    assert list(features) == source.keys and len(source.keys) == 9
    dims = source.feature_dims()
    for key, value in features.items():
        assert value.shape == (3, dims[key]) and torch.isfinite(value).all()
    assert dims[("enc.1.0", 1)] == 2 * 16 and dims[("dec.0.0", 50)] == 2 * 8
    adaptive = _features(trained_module, layers=[8], pooling="adaptive", pool_size=2)
    assert set(adaptive.layers) == {
        n for n, i in trained_module.ema.info.items() if i.resolution == 8
    }
    first = adaptive.layers[0]
    channels = trained_module.ema.info[first].channels
    assert adaptive(images, torch.arange(3))[(first, 1)].shape[1] == 4 * channels


def test_truncated_forward_equals_the_full_forward(trained_module):
    unet = trained_module.ema.eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 40])
    ran = []
    hooks = [
        unet.block(n).register_forward_hook(lambda m, i, o, n=n: ran.append(n))
        for n in unet.block_names
    ]
    truncated = capture(unet, x, t, ["enc.0.1", "enc.1.0"])
    assert ran[-1] == "enc.1.0" and not any(n.startswith(("mid", "dec")) for n in ran)
    ran.clear()
    full = capture(unet, x, t, ["enc.0.1", "enc.1.0", unet.block_names[-1]])
    assert ran == unet.block_names
    for hook in hooks:
        hook.remove()
    for name in ("enc.0.1", "enc.1.0"):
        assert torch.equal(truncated[name], full[name])


def test_features_are_bit_identical_in_any_batch(trained_module):
    source = _features(trained_module, layers=["enc.0.0", "mid.0", "dec.0.2"])
    torch.manual_seed(5)
    images = torch.randn(8, 1, 16, 16)
    indices = torch.arange(100, 108)
    whole = source(images, indices)
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    parts = [order[:3], order[3:4], order[4:]]
    pieces = {key: torch.empty_like(value) for key, value in whole.items()}
    for part in parts:
        for key, value in source(images[part], indices[part]).items():
            pieces[key][part] = value
    stacked = _features(
        trained_module, layers=["enc.0.0", "mid.0", "dec.0.2"], stack_timesteps=True
    )
    for key in whole:
        assert torch.equal(whole[key], pieces[key]), key
        assert torch.allclose(whole[key], stacked(images, indices)[key], atol=1e-5), key
    # The noise belongs to the image's index: another index gives other features.
    assert not torch.equal(source(images[:1], [0])[source.keys[0]], whole[source.keys[0]][:1])


def test_concatenated_timesteps_are_each_timestep_side_by_side(trained_module):
    layers = ["enc.0.0", "mid.0"]
    per_timestep = _features(trained_module, layers=layers, pooling="avg_std", noise_draws=2)
    concatenated = _features(
        trained_module, layers=layers, pooling="avg_std", noise_draws=2, concat_timesteps=True
    )
    assert concatenated.keys == [("enc.0.0", None), ("mid.0", None)]
    assert concatenated.fingerprint() != per_timestep.fingerprint()  # another feature cache
    images, indices = torch.randn(3, 1, 16, 16), torch.arange(3)
    separate, joined = per_timestep(images, indices), concatenated(images, indices)
    for layer in layers:
        expected = torch.cat([separate[(layer, t)] for t in (1, 10, 50)], dim=1)
        assert torch.equal(joined[(layer, None)], expected)
        assert concatenated.feature_dims()[(layer, None)] == expected.shape[1]


def test_tokens_are_every_position_of_a_layer_for_an_attention_head(trained_module):
    images, indices = torch.randn(2, 1, 16, 16), torch.arange(2)
    tokens = _features(trained_module, layers=["enc.1.0"], timesteps=(10,), pooling="tokens")
    averaged = _features(trained_module, layers=["enc.1.0"], timesteps=(10,))
    [key] = tokens.keys
    channels = tokens.token_channels()[key]
    features = tokens(images, indices)[key]
    assert features.shape[1] == tokens.feature_dims()[key] == channels * 8 * 8  # 8 x 8 map
    positions = features.reshape(2, -1, channels)  # position after position
    assert torch.allclose(positions.mean(1), averaged(images, indices)[key], atol=1e-5)
    with pytest.raises(ValueError, match="set the features' pooling: tokens"):
        averaged.token_channels()


def test_features_do_not_depend_on_loader_workers(trained_module, datamodule):
    source = _features(trained_module, layers=["dec.0.2"], timesteps=(10,))

    def by_index(workers):
        datamodule.num_workers = workers
        rows = {}
        for images, _, indices in datamodule.val_dataloader():
            for index, row in zip(
                indices.tolist(), source(images, indices)[("dec.0.2", 10)], strict=True
            ):
                rows[index] = row
        return rows

    serial, parallel = by_index(0), by_index(2)
    assert serial.keys() == parallel.keys()
    assert all(torch.equal(serial[i], parallel[i]) for i in serial)


def test_noise_draws_average_several_noise_samples(trained_module):
    images = torch.randn(2, 1, 16, 16)
    one = _features(trained_module, layers=["mid.1"], timesteps=(50,))(images, [0, 1])
    two = _features(trained_module, layers=["mid.1"], timesteps=(50,), noise_draws=2)
    averaged = two(images, [0, 1])[("mid.1", 50)]
    assert not torch.equal(averaged, one[("mid.1", 50)])
    assert torch.equal(averaged, two(images, [0, 1])[("mid.1", 50)])


def test_the_unet_stays_frozen_in_eval_mode(trained_module):
    source = _features(trained_module, layers=["dec.0.0"])
    source.train()
    assert not source.unet.training
    assert not any(p.requires_grad for p in source.parameters())
    images = torch.randn(2, 1, 16, 16, requires_grad=True)
    assert not source(images, [0, 1])[("dec.0.0", 1)].requires_grad


def test_feature_settings_are_checked(trained_module):
    with pytest.raises(ValueError, match="matches no U-Net block. Valid names: enc.0.0"):
        _features(trained_module, layers=["decoder.3"])
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        _features(trained_module, timesteps=(100,))
    with pytest.raises(ValueError, match="pooling"):
        _features(trained_module, pooling="max")


def test_from_checkpoint_reads_the_ema_weights(tmp_path, trained_module):
    path = tmp_path / "f.ckpt"
    torch.save(
        {
            "state_dict": trained_module.state_dict(),
            "hyper_parameters": dict(trained_module.hparams),
        },
        path,
    )
    source = DiffusionFeatures(str(path), layers=["mid.0"], timesteps=(10,))
    images = torch.randn(2, 1, 16, 16)
    expected = _features(trained_module, layers=["mid.0"], timesteps=(10,))(images, [0, 1])
    assert torch.equal(source(images, [0, 1])[("mid.0", 10)], expected[("mid.0", 10)])


@pytest.mark.slow
@pytest.mark.xdist_group("ddp_fits")  # one worker launches the shared DDP fits
def test_ddp_fit_keeps_ema_identical_on_both_ranks(ddp_fits):
    folder = ddp_fits / "diffusion"
    ranks = [torch.load(folder / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    for name, value in ranks[0]["ema"].items():
        assert torch.equal(value, ranks[1]["ema"][name]), name


def test_gradients_are_clipped_to_grad_clip(datamodule, tmp_path):
    module = DiffusionModule(**TINY_UNET, grad_clip=0.01)
    norms = []

    def record(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        L.LightningModule.clip_gradients(
            module, optimizer, gradient_clip_val, gradient_clip_algorithm
        )
        grads = [p.grad for p in module.unet.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    module.clip_gradients = record
    _trainer(tmp_path, max_steps=2, max_epochs=-1, limit_val_batches=0).fit(module, datamodule)
    assert len(norms) == 2 and max(norms) <= 0.01 * 1.001


def test_the_online_probe_logs_its_score_and_keeps_the_best_checkpoint(datamodule, tmp_path):
    torch.manual_seed(0)
    module = DiffusionModule(**TINY_UNET, lr=1.6e-2, warmup_steps=5)
    probe = OnlineProbe(every_n_epochs=1, timesteps=(1, 10), train_images=48, val_images=16)
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[probe])
    trainer.fit(module, datamodule)
    assert [entry["epoch"] for entry in probe.history] == [0, 1, 2]
    scores = [entry["score"] for entry in probe.history]
    assert trainer.callback_metrics["online_probe/val_macro_f1"] == pytest.approx(scores[-1])
    assert probe.best_score == max(scores) > 0
    # best_probe.ckpt holds the best epoch's weights: probing it again gives the same score.
    best = tmp_path / "checkpoints" / BEST_PROBE_CHECKPOINT
    rescored = probe.probe(load_diffusion(best), datamodule)
    assert max(rescored.values()) == pytest.approx(probe.best_score)
    assert torch.load(best, weights_only=True)["epoch"] == scores.index(max(scores))
