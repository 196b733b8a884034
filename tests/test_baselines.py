import lightning as L
import pytest
import torch

from datamodules import PlanktonDataModule, SyntheticPlankton
from lightning_modules import (
    BASELINES,
    METHODS,
    DINOModule,
    EncoderFeatures,
    ProbeModule,
    SimCLRModule,
    SupervisedModule,
)
from lightning_modules.baselines.backbones import create_backbone
from lightning_modules.baselines.knn import KNNAccuracy

SMALL = {"image_size": 16, "in_chans": 1}  # every other setting: the method's default
SMALL_RESNET = {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}


@pytest.fixture
def datamodule(tiny_spec):
    return PlanktonDataModule(synthetic=tiny_spec, image_size=16, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_cache):
    """A checkpoint of each baseline after one fast_dev_run step, fitted once for the module's
    tests (none changes the module or the file)."""
    folder = tmp_path_factory.mktemp("trained")
    spec = SyntheticPlankton(classes=4, per_class=24, imbalance=4.0, size=32, seed=3)  # tiny_spec
    data = PlanktonDataModule(synthetic=spec, image_size=16, batch_size=16, progress=False,
                              cache_dir=str(session_cache))  # fmt: skip
    fitted = {}

    def fit(cls):
        if cls not in fitted:
            torch.manual_seed(0)
            module = _module(cls, data)
            trainer = _trainer(folder, fast_dev_run=True)
            trainer.fit(module, data)
            path = folder / f"{cls.__name__}.ckpt"
            trainer.save_checkpoint(path)
            fitted[cls] = module.eval(), path
        return fitted[cls]

    return fit


def _module(cls, data, **settings):
    return cls(num_classes=data.num_classes, class_names=data.class_names, **SMALL, **settings)


def _trainer(root, **settings):
    settings.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=root, **settings,
    )  # fmt: skip


@pytest.mark.parametrize("name", BASELINES)
def test_fit_test_and_predict_from_a_checkpoint(name, trained, datamodule, tmp_path):
    cls = METHODS[name].module
    _, checkpoint = trained(cls)  # fitted and saved
    restored = cls.load_from_checkpoint(checkpoint, weights_only=False)
    tester = _trainer(tmp_path, limit_test_batches=2, limit_predict_batches=1)
    results = tester.test(restored, datamodule)
    assert set(results[0]) >= {"test/acc", "test/macro_f1"} or any("test/acc" in r for r in results)
    probabilities = tester.predict(restored, datamodule)[0]
    assert probabilities.shape[1] == datamodule.num_classes
    assert torch.allclose(probabilities.sum(1), torch.ones(len(probabilities)), atol=1e-5)


def _losses(module, data, steps, **settings):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(trainer.callback_metrics["train/loss"].item())

    _trainer(data.cache_dir, max_steps=steps, max_epochs=-1, limit_val_batches=0,
             callbacks=[Record()], **settings).fit(module, data)  # fmt: skip
    return losses


@pytest.mark.parametrize("name", BASELINES)
def test_every_registered_baseline_learns_a_fixed_batch(name, datamodule):
    """The loss, heads and optimiser of each method learn: on one batch seen again and again,
    in the same draw of the method's own views, its training loss falls within 30 steps."""
    torch.manual_seed(0)
    module = _module(METHODS[name].module, datamodule)
    # SGD (SimCLR's and DINO's small-image recipe) needs a larger rate than AdamW to move in
    # 30 steps of 16 images.
    lr = 3.0 if module.hparams.get("optimizer") == "sgd" else 0.02
    # The ResNets at the demo's size (one block per stage, half width): a seventh of the work;
    # DINO's head and MAE's ViT shrunk as in smoke.yaml.
    small = {"backbone_args": SMALL_RESNET} if "resnet" in module.hparams.backbone else {}
    small |= {"dino": {"output_dim": 256}, "mae": {"depth": 2}}.get(name, {})
    torch.manual_seed(0)
    module = _module(METHODS[name].module, datamodule, lr=lr, **small)
    view = module.train_view(16, 1)

    def same_draw(images):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return view(images)

    module.train_view = lambda size, channels: same_draw
    losses = _losses(module, datamodule, 30, overfit_batches=1)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)


def test_online_classifier_sends_no_gradient_into_the_backbone(datamodule):
    torch.manual_seed(0)
    module = _module(SimCLRModule, datamodule)
    images = torch.randn(4, 1, 16, 16)
    batch = ([images, images.flip(-1)], torch.tensor([0, 1, 2, 3]), torch.arange(4))
    module.training_step(batch, 0).backward()  # the SSL loss plus the online classifier's loss
    with_online = [p.grad.clone() for p in module.backbone.parameters()]
    assert module.online_classifier.weight.grad.abs().sum() > 0
    module.zero_grad()
    module.ssl_step(batch[0])[0].backward()  # the SSL loss alone
    for combined, p in zip(with_online, module.backbone.parameters(), strict=True):
        assert torch.allclose(combined, p.grad, atol=1e-6)


def _parameters(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_dino_teacher_gets_no_gradient_and_follows_the_momentum_formula(datamodule, tmp_path):
    torch.manual_seed(0)
    module = _module(DINOModule, datamodule, n_local_views=2)
    assert not any(p.requires_grad for p in module.teacher_backbone.parameters())
    assert not any(p.requires_grad for p in module.teacher_head.parameters())
    snapshots = []

    class Record(L.Callback):  # runs before the module's own hook, which updates the teacher
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append((
                pl_module.momentum(),
                _parameters(pl_module.teacher_backbone),
                _parameters(pl_module.backbone),
            ))  # fmt: skip

    _trainer(tmp_path, max_steps=2, max_epochs=-1, limit_val_batches=0, callbacks=[Record()]).fit(
        module, datamodule
    )
    (m, teacher, student), (_, teacher_after, _) = snapshots
    assert 0.99 <= m < 1
    for name, value in teacher_after.items():  # batch-norm statistics follow the teacher's input
        expected = m * teacher[name] + (1 - m) * student[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert all(p.grad is None for p in module.teacher_backbone.parameters())
    assert all(p.grad is None for p in module.teacher_head.parameters())


def test_knn_metric_classifies_planted_neighbours():
    knn = KNNAccuracy(num_classes=2, k=3)
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    knn.update(train_features=bank, train_labels=torch.tensor([0, 0, 1, 1]))
    knn.update(
        test_features=torch.tensor([[1.0, 0.05], [0.05, 1.0]]), test_labels=torch.tensor([0, 1])
    )
    assert knn.compute() == 1.0
    knn.update(test_features=torch.tensor([[1.0, 0.0]]), test_labels=torch.tensor([1]))
    assert knn.compute() == pytest.approx(2 / 3)
    knn.reset()
    assert not knn.has_bank()
    with pytest.raises(RuntimeError, match="needs train"):
        knn.compute()


def test_encoder_features_are_the_embedding_bit_identical_in_any_batch(trained):
    module, path = trained(SupervisedModule)
    source = EncoderFeatures(str(path), micro_batch=4)
    assert source.keys == [("embedding", None)]
    images = torch.randn(6, 1, 16, 16)
    features = source(images, torch.arange(6))[("embedding", None)]
    expected = module.model.forward_head(module.model.forward_features(images), pre_logits=True)
    assert features.shape == (6, source.feature_dims()[("embedding", None)])
    assert torch.allclose(features, expected, atol=1e-5)
    alone = source(images[3:4], torch.arange(3, 4))[("embedding", None)]
    assert torch.equal(alone[0], features[3])
    assert source.fingerprint() == EncoderFeatures(str(path)).fingerprint()


@pytest.mark.parametrize("name", BASELINES)
def test_every_registered_baseline_is_recognised_and_probed_by_the_probe_module(
    name, trained, datamodule, tmp_path
):
    module, path = trained(METHODS[name].module)
    source = EncoderFeatures(str(path), micro_batch=8)
    assert source.method == name
    images = torch.randn(3, 1, 16, 16)
    expected = next(iter(module.encoders().values()))(images)
    assert torch.allclose(source(images, torch.arange(3))[("embedding", None)], expected, atol=1e-5)
    probe = ProbeModule(
        features=source, num_classes=datamodule.num_classes, class_names=datamodule.class_names,
        image_size=16, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    trainer = _trainer(tmp_path, max_epochs=2)
    trainer.fit(probe, datamodule)
    results = trainer.test(probe, datamodule, verbose=False)[0]
    assert 0 <= results["test/best_acc"] <= 1


def test_dino_encoder_features_default_to_the_teacher(trained):
    module, path = trained(DINOModule)
    images = torch.randn(4, 1, 16, 16)
    teacher = EncoderFeatures(str(path))(images, torch.arange(4))[("embedding", None)]
    student = EncoderFeatures(str(path), weights="student")(images, torch.arange(4))
    assert torch.allclose(teacher, module.teacher_backbone(images), atol=1e-5)
    assert torch.allclose(student[("embedding", None)], module.backbone(images), atol=1e-5)
    assert not torch.allclose(teacher, student[("embedding", None)])


def test_encoder_features_refuse_a_checkpoint_of_another_kind(tmp_path):
    path = tmp_path / "diffusion.ckpt"
    torch.save({"hyper_parameters": {"base_channels": 8}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="diffusion checkpoints go to DiffusionFeatures"):
        EncoderFeatures(str(path))
    with pytest.raises(FileNotFoundError, match="no checkpoint matches"):
        EncoderFeatures(str(tmp_path / "missing" / "*.ckpt"))


@pytest.mark.parametrize("method", ["supervised", "simclr"])
@pytest.mark.xdist_group("ddp_fits")  # one worker launches the shared DDP fits
def test_ddp_fit_on_two_processes_keeps_ranks_in_step(method, ddp_fits):
    ranks = [torch.load(ddp_fits / method / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] > 0
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    assert ranks[0]["metrics"] and ranks[0]["metrics"] == ranks[1]["metrics"]  # synced
    if method == "simclr":  # negatives gathered from both ranks: the loss of the global batch
        assert ranks[0]["mean_rank_loss"] == pytest.approx(ranks[0]["global_batch_loss"], abs=1e-5)


def _optimizer(module, data, root):
    trainer = _trainer(root, max_steps=1, max_epochs=-1, limit_val_batches=0)
    trainer.fit(module, data)
    return trainer.optimizers[0]


def test_online_classifier_has_its_own_learning_rate_and_no_weight_decay(datamodule, tmp_path):
    module = _module(
        SimCLRModule, datamodule, optimizer="adamw", lr=0.001, online_lr=0.004, weight_decay=1e-4
    )
    optimizer = _optimizer(module, datamodule, tmp_path)
    assert isinstance(optimizer, torch.optim.AdamW)
    backbone, classifier = optimizer.param_groups
    assert classifier["params"] == list(module.online_classifier.parameters())
    assert classifier["weight_decay"] == 0 and backbone["weight_decay"] == 1e-4
    # Both scaled by the global batch (16 / 256) and by the same schedule.
    assert classifier["initial_lr"] == pytest.approx(0.004 * 16 / 256)
    assert backbone["initial_lr"] == pytest.approx(0.001 * 16 / 256)


@pytest.mark.parametrize("cls", [SimCLRModule, DINOModule])
def test_simclr_and_dino_default_to_the_small_image_recipe(cls, datamodule, tmp_path):
    """lightly's CIFAR-10 recipe: SGD with momentum 0.9, weight decay 5e-4, the online
    classifier at the backbone's rate, and the small-input stem; the rate is the short-budget
    one chosen on validation, per 256 images: 1.0 for SimCLR, 4.0 for DINO."""
    module = _module(cls, datamodule)
    assert module.backbone.conv1.kernel_size == (3, 3)
    optimizer = _optimizer(module, datamodule, tmp_path)
    assert isinstance(optimizer, torch.optim.SGD)
    backbone, classifier = optimizer.param_groups
    assert backbone["momentum"] == 0.9 and backbone["weight_decay"] == 5e-4
    rate = {SimCLRModule: 1.0, DINOModule: 4.0}[cls]
    assert backbone["initial_lr"] == pytest.approx(rate * 16 / 256)
    assert classifier["initial_lr"] == backbone["initial_lr"] and classifier["weight_decay"] == 0


def test_an_unknown_optimizer_is_refused_with_the_choices(datamodule):
    with pytest.raises(ValueError, match="optimizer must be one of \\['adamw', 'sgd'\\]"):
        _module(SimCLRModule, datamodule, optimizer="lars")


def _view_count(module, size):
    return len(module.train_view(size, 1)(torch.zeros(2, 1, size, size, dtype=torch.uint8)))


def test_dino_takes_local_crops_only_above_32_px(datamodule):
    """No local crops at 32 px and below (lightly's CIFAR-10 recipe); two above; any number
    when asked."""
    module = _module(DINOModule, datamodule, output_dim=256)
    assert _view_count(module, 16) == _view_count(module, 32) == 2
    assert _view_count(module, 64) == 4
    assert _view_count(_module(DINOModule, datamodule, output_dim=256, n_local_views=3), 16) == 5


class _ConstantEncoder(torch.nn.Module):
    """Every image to the same embedding: the collapse the monitor must flag."""

    num_features = 32

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Parameter(torch.randn(self.num_features))

    def forward(self, images):
        return self.embedding.expand(len(images), -1)


def _fit_steps(module, data, root, steps=3):
    _trainer(root, max_steps=steps, max_epochs=-1, limit_val_batches=0).fit(module, data)
    return module.collapse_report()


def test_the_collapse_monitor_flags_a_constant_encoder(datamodule, tmp_path, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(SimCLRModule, "build_backbone", lambda self: _ConstantEncoder())
    module = _module(SimCLRModule, datamodule)
    with pytest.warns(UserWarning, match="SimCLRModule looks collapsed.*embedding_std_ratio"):
        report = _fit_steps(module, datamodule, tmp_path)
    assert report["signals"]["embedding_std_ratio"] < 1e-3
    assert report["collapsed"] and "embedding_std_ratio" in report["collapsed"][0]


def test_the_collapse_monitor_passes_a_healthy_encoder_and_reads_dino_teacher(datamodule, tmp_path):
    torch.manual_seed(0)
    report = _fit_steps(_module(SimCLRModule, datamodule), datamodule, tmp_path)
    assert report["collapsed"] == [] and report["signals"]["embedding_std_ratio"] > 0.1
    dino = _fit_steps(_module(DINOModule, datamodule, output_dim=256), datamodule, tmp_path, 2)
    assert 0 < dino["signals"]["teacher_entropy_ratio"] <= 1


def _last_map_size(model, size):
    return model.eval().forward_features(torch.zeros(1, 1, size, size)).shape[-1]


def test_resnets_take_the_small_input_stem_at_64_px_and_below():
    """At 32 px the ImageNet stem leaves a 1x1 map before the last stage; the small stem 4x4.
    Above 64 px, on a request, and for other architectures, the ImageNet stem stays."""
    small = create_backbone("resnet18", 1, image_size=32)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert _last_map_size(small, 32) == 4
    assert (
        _last_map_size(create_backbone("resnet18", 1, small_input_stem=False, image_size=32), 32)
        == 1
    )
    assert create_backbone("resnet18", 1, image_size=128).conv1.kernel_size == (7, 7)
    assert create_backbone("resnet18", 1, small_input_stem=True, image_size=128).conv1.stride == (
        1,
        1,
    )
    other = create_backbone("mobilenetv3_small_050", 1, image_size=32)  # no conv1: left as built
    assert other.num_features > 0
    with pytest.raises(ValueError, match="small_input_stem needs a ResNet-style backbone"):
        create_backbone("mobilenetv3_small_050", 1, small_input_stem=True)


def test_the_supervised_baseline_takes_the_stem_from_its_image_size(datamodule):
    assert _module(SupervisedModule, datamodule).model.conv1.kernel_size == (3, 3)
    large = SupervisedModule(num_classes=2, class_names=["a", "b"], image_size=96, in_chans=1)
    assert large.model.conv1.kernel_size == (7, 7)
