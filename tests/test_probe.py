import csv

import lightning as L
import numpy as np
import pytest
import torch
from planted import CLASSES, PlantedFeatures, PlantedTokens, write_planted_images
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score

from datamodules import PlanktonDataModule
from lightning_modules import PixelFeatures, ProbeModule
from lightning_modules.probes.feature_cache import load_or_extract
from lightning_modules.probes.grid_metrics import GridConfusion, grid_scores
from lightning_modules.probes.solver import LBFGS_DECAY_GRID


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory):
    return write_planted_images(tmp_path_factory.mktemp("planted"))


def _data(root, tmp_path):
    return PlanktonDataModule(
        source=str(root),
        image_size=8,
        batch_size=32,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        polarity="keep",
    )


def _fit(root, tmp_path, epochs=15, test=True, features=None, **settings):
    torch.manual_seed(0)
    data = _data(root, tmp_path)
    settings.setdefault("lr", 0.05)
    probe = ProbeModule(
        features or PlantedFeatures(),
        num_classes=CLASSES,
        class_names=data.class_names,
        image_size=8,
        cache_dir=str(tmp_path / "cache"),
        **settings,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path / "run",
    )
    trainer.fit(probe, data)
    if test:
        trainer.test(probe, data)
    return probe, trainer


def _rows(tmp_path):
    with open(tmp_path / "run" / "probe_results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_separable_key_is_learned_and_noise_stays_near_chance(planted_root, tmp_path):
    probe, trainer = _fit(planted_root, tmp_path)
    assert probe.val_acc[0] == pytest.approx(1.0)
    assert probe.val_acc[1] < 0.6  # chance is 0.25
    assert probe.best_key == ("pixels", 0)
    assert trainer.callback_metrics["test/best_acc"] == pytest.approx(1.0)
    rows = _rows(tmp_path)
    assert {r["split"] for r in rows} == {"val", "test"}
    best = [r for r in rows if r["best"] == "True"]
    assert {r["layer"] for r in best} == {"pixels"}
    assert any(r["layer"].startswith("fusion(") for r in rows if r["split"] == "test")
    assert (tmp_path / "run" / "probe_heatmap_val_macro_f1.png").exists()
    assert (tmp_path / "run" / "probe_per_class_f1.csv").exists()


def test_backbone_stays_frozen(planted_root, tmp_path):
    probe, _ = _fit(planted_root, tmp_path, epochs=1, test=False)
    assert not probe.features.training
    assert not any(p.requires_grad for p in probe.features.parameters())
    assert probe.features.scale.item() == 1.0


def test_online_and_cached_give_the_same_metrics(planted_root, tmp_path):
    cached, _ = _fit(planted_root, tmp_path / "cached", epochs=4, mode="cached", solver="adamw")
    online, _ = _fit(planted_root, tmp_path / "online", epochs=4, mode="online")
    assert torch.allclose(cached.val_macro_f1, online.val_macro_f1, atol=1e-6)
    assert torch.allclose(cached.heads.weight, online.heads.weight, atol=1e-5)
    cached_rows = [(r["layer"], r["split"], r["accuracy"]) for r in _rows(tmp_path / "cached")]
    online_rows = [(r["layer"], r["split"], r["accuracy"]) for r in _rows(tmp_path / "online")]
    assert cached_rows == online_rows


def test_lbfgs_converges_and_reports_it(planted_root, tmp_path):
    probe, _ = _fit(planted_root, tmp_path, epochs=3, test=False, solver="lbfgs")
    assert probe.val_acc[0] == pytest.approx(1.0)
    assert bool(probe.converged[0])
    rows = [r for r in _rows(tmp_path) if r["layer"] == "pixels"]
    assert rows[0]["converged"] == "True"


def test_raw_pixels_are_a_feature_source_probed_by_logistic_regression(planted_root, tmp_path):
    """``PixelFeatures`` hands the probe the images themselves: on the planted data (class c
    lights pixel c) logistic regression on them is exact."""
    probe, trainer = _fit(
        planted_root, tmp_path, epochs=2, features=PixelFeatures(), solver="lbfgs"
    )
    assert probe.keys == [("pixels", None)] and probe.heads.weight.shape[1] == 64
    assert probe.val_acc[0] == pytest.approx(1.0)
    assert trainer.callback_metrics["test/best_acc"] == pytest.approx(1.0)
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(probe.features(images, [0, 1, 2])[("pixels", None)], images.flatten(1))


def test_lbfgs_reaches_the_scikit_learn_logistic_regression_solution(planted_root, tmp_path):
    """Full-batch L-BFGS with weight decay d solves the problem scikit-learn's
    ``LogisticRegression`` solves with C = 1 / (d * training images): the same probabilities."""
    decay = 0.05
    probe, _ = _fit(planted_root, tmp_path, epochs=4, test=False, features=PixelFeatures(),
                    solver="lbfgs", weight_decay=decay)  # fmt: skip
    data = probe.trainer.datamodule
    standardized = [
        (
            (probe.inputs.cached[split][:, 0].float() - probe.normalization.mean[0])
            / probe.normalization.std[0]
        ).numpy()
        for split in ("train", "val")
    ]
    labels = np.asarray(data.dataset("train").labels)
    reference = LogisticRegression(C=1 / (decay * len(labels)), tol=1e-10, max_iter=10_000)
    reference.fit(standardized[0], labels)
    expected = reference.predict_proba(standardized[1])
    with torch.no_grad():
        logits = probe.logits(probe.inputs.cached["val"].float().transpose(0, 1))[0]
    np.testing.assert_allclose(logits.softmax(-1).numpy(), expected, atol=2e-3)


def test_the_lbfgs_weight_decay_is_chosen_on_validation(planted_root, tmp_path):
    """By default L-BFGS tries a grid of decays, keeps the best on validation for every head,
    and says what it tried; a grid with a mini-batch solver is refused."""
    probe, _ = _fit(planted_root, tmp_path, epochs=2, test=False)
    assert probe.solver == "lbfgs" and set(probe.decay_scores) == set(LBFGS_DECAY_GRID)
    chosen = float(probe.weight_decay)
    assert probe.decay_scores[chosen] == max(probe.decay_scores.values())
    with open(tmp_path / "run" / "weight_decay_grid.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["weight_decay"]) for r in rows if r["chosen"] == "True"] == [chosen]
    assert len(rows) == len(LBFGS_DECAY_GRID)
    with pytest.raises(ValueError, match="a grid of decays needs solver: lbfgs"):
        ProbeModule(PlantedFeatures(), num_classes=CLASSES, solver="adamw", weight_decay=[0.1, 1])


def test_the_probe_caches_beside_the_data_and_keeps_no_machine_path(planted_root, tmp_path):
    """With no cache_dir of its own the probe caches its features in the data's cache folder;
    the folder is not a hyperparameter, so a logger (which merges the model's and the data's
    hyperparameters) sees no clash, and the checkpoint carries no path of this machine."""
    data = _data(planted_root, tmp_path)
    probe = ProbeModule(PixelFeatures(), num_classes=CLASSES, class_names=data.class_names,
                        image_size=8)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path / "run",
    )  # fmt: skip
    trainer.fit(probe, data)
    assert list((tmp_path / "cache" / "features").iterdir())
    assert "cache_dir" not in probe.hparams


def test_feature_cache_is_reused_invalidated_and_atomic(planted_root, tmp_path):
    data = _data(planted_root, tmp_path)
    data.setup()
    dataset = data.dataset("train")
    source = PlantedFeatures()
    first = load_or_extract(source, dataset, tmp_path / "fc", progress=False)
    calls = source.calls
    again = load_or_extract(source, dataset, tmp_path / "fc", progress=False)
    assert source.calls == calls  # read back, not recomputed
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first[("pixels", 0)].dtype == torch.float16
    changed = PlantedFeatures(noise_dim=8)  # another setting: another cache
    load_or_extract(changed, dataset, tmp_path / "fc", progress=False)
    assert changed.calls > 0
    # A cache whose index was never written (a crash before the end) is not read.
    for index in (tmp_path / "fc" / "features").glob("*.json"):
        index.unlink()
    load_or_extract(source, dataset, tmp_path / "fc", progress=False)
    assert source.calls > calls


def test_grid_metrics_agree_with_scikit_learn():
    torch.manual_seed(0)
    heads, classes, n = 5, 6, 300
    target = torch.randint(0, classes - 1, (n,))  # the last class never occurs in the targets
    preds = torch.where(torch.rand(heads, n) < 0.6, target, torch.randint(0, classes, (heads, n)))
    metric = GridConfusion(heads, classes)
    metric.update(preds[:, :100], target[:100])
    metric.update(preds[:, 100:], target[100:])
    scores = grid_scores(metric.compute())
    for h in range(heads):
        assert scores.acc[h].item() == pytest.approx(accuracy_score(target, preds[h]))
        assert scores.macro_f1[h].item() == pytest.approx(
            f1_score(target, preds[h], average="macro", zero_division=0), abs=1e-6
        )
        per_class = f1_score(target, preds[h], average=None, labels=range(classes), zero_division=0)
        assert np.allclose(scores.per_class_f1[h].numpy(), per_class, atol=1e-6)


def test_lbfgs_needs_cached_features():
    with pytest.raises(ValueError, match="lbfgs needs mode: cached"):
        ProbeModule(PlantedFeatures(), num_classes=2, mode="online", solver="lbfgs")


@pytest.mark.slow
@pytest.mark.xdist_group("ddp_fits")  # one worker launches the shared DDP fits
def test_ddp_probe_matches_one_process(ddp_fits):
    tmp_path = ddp_fits / "probe"
    # Two ranks extracted a shard each: the joined cache equals one process's, bit for bit.
    caches = [sorted((tmp_path / f"features{d}" / "features").glob("*.npy")) for d in (1, 2)]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and caches[0]
    for single, sharded in zip(*caches, strict=True):
        assert np.array_equal(np.load(single), np.load(sharded))
    assert not list((tmp_path / "features2" / "features").glob("*shard*"))
    one, two = (torch.load(tmp_path / f"scores{d}.pt", weights_only=True) for d in (1, 2))
    # Full-batch L-BFGS gives the same heads; validation under DDP may count a padded duplicate.
    assert torch.allclose(one["weight"], two["weight"], atol=1e-4)
    assert torch.allclose(one["acc"], two["acc"], atol=0.03)
    assert torch.allclose(one["macro_f1"], two["macro_f1"], atol=0.03)


def test_a_disk_too_small_for_the_feature_cache_is_a_clear_error(
    planted_root, tmp_path, monkeypatch
):
    import shutil as shutil_module
    from collections import namedtuple

    data = _data(planted_root, tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10, 10, 100))
    with pytest.raises(OSError, match="needs .* GiB but only .* GiB are free"):
        load_or_extract(PlantedFeatures(), data.dataset("train"), tmp_path / "fc", progress=False)
    assert not list((tmp_path / "fc").rglob("*.npy"))


def test_cached_predictions_read_the_feature_cache_and_match_the_online_path(
    planted_root, tmp_path
):
    probe, trainer = _fit(planted_root, tmp_path, epochs=4, mode="cached")  # test is cached now
    data = trainer.datamodule
    passes = []
    probe.features.register_forward_hook(lambda *args: passes.append(1))
    predicted = torch.cat(trainer.predict(probe, data))
    assert not passes  # the test split's features come from the cache, not another pass
    images, _, indices = next(iter(data.dataset("test").loader(len(data.dataset("test")))))
    with torch.no_grad():
        online = probe.probabilities(probe.classify(images, indices))  # calibrated
    assert passes and torch.allclose(predicted, online, atol=1e-6)


def test_the_attention_head_finds_the_token_that_averaging_drowns(planted_root, tmp_path):
    settings = {"epochs": 30, "test": False, "solver": "adamw", "lr": 0.05}
    attention, _ = _fit(planted_root, tmp_path / "attention", features=PlantedTokens(),
                        head="attention", **settings)  # fmt: skip
    averaged, _ = _fit(planted_root, tmp_path / "averaged", features=PlantedTokens(True),
                       **settings)  # fmt: skip
    assert sum(p.numel() for p in attention.parameters() if p.requires_grad) == 5 + 5 * 4 + 4
    assert float(attention.val_acc[0]) > 0.9
    assert float(averaged.val_acc[0]) < float(attention.val_acc[0]) - 0.3


def test_the_attention_head_needs_one_key_of_tokens_and_a_gradient_solver(planted_root):
    with pytest.raises(ValueError, match="spatial tokens of one .* these features have 2 keys"):
        ProbeModule(PlantedFeatures(), head="attention", num_classes=CLASSES, image_size=8,
                    class_names=[str(c) for c in range(CLASSES)])  # fmt: skip
    with pytest.raises(ValueError, match="not a convex problem: use solver adamw or sgd"):
        ProbeModule(PlantedTokens(), head="attention", solver="lbfgs", num_classes=CLASSES,
                    image_size=8, class_names=[str(c) for c in range(CLASSES)])  # fmt: skip


# The state-dict entries of a probe checkpoint written before the heads and the normalization
# were modules of their own (besides the feature source's).
OLD_LAYOUT = {
    "valid", "mean", "std", "weight", "bias", "log_prior", "class_weight", "val_acc",
    "val_macro_f1", "converged", "previous_loss", "weight_decay", "fusion_keys",
    "fusion_weight", "fusion_bias",
}  # fmt: skip
NORM = {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}


@pytest.mark.parametrize(
    "features, settings, old_keys",
    [
        (PlantedFeatures, {"standardize": "batchnorm"}, OLD_LAYOUT | NORM),
        (PlantedTokens, {"head": "attention"}, OLD_LAYOUT | {"query"}),
    ],
)
def test_a_checkpoint_of_the_old_layout_loads_into_the_heads(features, settings, old_keys):
    def probe():
        return ProbeModule(features(), num_classes=CLASSES, image_size=8, **settings)

    torch.manual_seed(0)
    saved = {
        name: torch.rand_like(t.float()).to(t.dtype) for name, t in probe().state_dict().items()
    }
    old = {
        name.removeprefix("heads.").removeprefix("normalization."): tensor
        for name, tensor in saved.items()
    }
    assert set(old) - {"features.scale"} == old_keys
    loaded = probe()
    loaded.load_state_dict(old)  # strict: every entry finds its place
    assert all(torch.equal(loaded.state_dict()[name], t) for name, t in saved.items())
