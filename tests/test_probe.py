import csv

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, f1_score

from datamodules import PlanktonDataModule
from lightning_modules import FeatureSource, ProbeModule
from lightning_modules.feature_cache import load_or_extract
from lightning_modules.grid_metrics import GridConfusion, grid_scores

CLASSES = 4


class PlantedFeatures(FeatureSource):
    """Two keys: the pixels (class c lights pixel c: linearly separable by construction) and
    noise drawn from the image index (unrelated to the class)."""

    def __init__(self, noise_dim: int = 16) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.keys = [("pixels", 0), ("noise", 0)]
        self.register_buffer("scale", torch.ones(1))
        self.calls = 0

    def feature_dims(self):
        return {("pixels", 0): 64, ("noise", 0): self.noise_dim}

    def settings(self):
        return {"planted": self.noise_dim}

    def forward(self, images, indices):
        self.calls += 1
        noise = torch.stack(
            [
                torch.randn(self.noise_dim, generator=torch.Generator().manual_seed(int(i)))
                for i in indices
            ]
        )
        return {("pixels", 0): images.flatten(1) * self.scale, ("noise", 0): noise}


@pytest.fixture(scope="module")
def planted_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for i in range(100):
            image = rng.integers(0, 40, (8, 8)).astype(np.uint8)
            image[0, c] = 230
            Image.fromarray(image).save(root / f"class{c}" / f"{i:03d}.png")
    return root


def _data(root, tmp_path):
    return PlanktonDataModule(
        source=str(root),
        image_size=8,
        batch_size=32,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
        polarity="keep",
    )


def _fit(root, tmp_path, epochs=15, test=True, **settings):
    torch.manual_seed(0)
    data = _data(root, tmp_path)
    settings.setdefault("lr", 0.05)
    probe = ProbeModule(
        PlantedFeatures(),
        num_classes=CLASSES,
        class_names=data.class_names,
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
    cached, _ = _fit(planted_root, tmp_path / "cached", epochs=4, mode="cached")
    online, _ = _fit(planted_root, tmp_path / "online", epochs=4, mode="online")
    assert torch.allclose(cached.val_macro_f1, online.val_macro_f1, atol=1e-6)
    assert torch.allclose(cached.weight, online.weight, atol=1e-5)
    cached_rows = [(r["layer"], r["split"], r["accuracy"]) for r in _rows(tmp_path / "cached")]
    online_rows = [(r["layer"], r["split"], r["accuracy"]) for r in _rows(tmp_path / "online")]
    assert cached_rows == online_rows


def test_lbfgs_converges_and_reports_it(planted_root, tmp_path):
    probe, _ = _fit(planted_root, tmp_path, epochs=3, test=False, solver="lbfgs")
    assert probe.val_acc[0] == pytest.approx(1.0)
    assert bool(probe.converged[0])
    rows = [r for r in _rows(tmp_path) if r["layer"] == "pixels"]
    assert rows[0]["converged"] == "True"


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
        assert scores["acc"][h].item() == pytest.approx(accuracy_score(target, preds[h]))
        assert scores["macro_f1"][h].item() == pytest.approx(
            f1_score(target, preds[h], average="macro", zero_division=0), abs=1e-6
        )
        per_class = f1_score(target, preds[h], average=None, labels=range(classes), zero_division=0)
        assert np.allclose(scores["per_class_f1"][h].numpy(), per_class, atol=1e-6)


def test_lbfgs_needs_cached_features():
    with pytest.raises(ValueError, match="lbfgs needs mode: cached"):
        ProbeModule(PlantedFeatures(), num_classes=2, mode="online", solver="lbfgs")
