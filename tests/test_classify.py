import csv
import errno
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from cli import main
from datamodules import PlanktonDataModule, Preprocessing, SyntheticPlankton
from datamodules.cache import load_or_build
from datamodules.sources import scan, scan_class_folders
from datamodules.synthetic import write_dataset
from datamodules.views import eval_view
from lightning_modules import (
    BASELINES,
    METHODS,
    DiffusionFeatures,
    DiffusionModule,
    EncoderFeatures,
    ProbeModule,
    SupervisedModule,
    load_diffusion,
)
from lightning_modules.common.abundance import ESTIMATORS
from lightning_modules.common.calibration import Calibration, MissingCalibrationError
from workflows.classify import ClassifierSettings, classify_folder, load_classifier

# The spec of the ``tiny_spec`` fixture: the data are shared with the other test files.
SPEC = SyntheticPlankton(classes=4, per_class=24, imbalance=4.0, size=32, seed=3)
TINY_UNET = {
    "image_size": 16, "base_channels": 8, "channel_mult": (1, 2), "attention_resolutions": (8,),
    "num_heads": 2, "timesteps": 50, "val_timesteps": (5,), "sample_every_n_epochs": 0,
}  # fmt: skip


# classify_folder's results are compared with CPU computations; "cuda" checks the GPU path.
DEVICE = "cpu"


def _trainer(root, **settings):
    settings.setdefault("max_epochs", 1)
    return L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **settings,
    )  # fmt: skip


# Module-scoped fixtures run before the autouse cache fixture: every cache folder is explicit.
@pytest.fixture(scope="module")
def data(session_cache):
    return PlanktonDataModule(
        synthetic=SPEC, image_size=16, batch_size=16, cache_dir=str(session_cache), progress=False
    )


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A new sample: class folders from the generator (recursion), one corrupt PNG, and files
    that are not images (the manifest, notes) which must be ignored, not listed."""
    root = tmp_path_factory.mktemp("sample") / "station_7"
    spec = SyntheticPlankton(classes=4, per_class=6, imbalance=2.0, size=32, seed=11)
    write_dataset(spec, root, progress=False)
    (root / "night" / "broken").mkdir(parents=True)
    (root / "night" / "broken" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("CTD cast 7")
    return root


@pytest.fixture(scope="module")
def supervised(data, tmp_path_factory):
    torch.manual_seed(0)
    module = SupervisedModule(
        num_classes=data.num_classes, class_names=data.class_names, backbone="resnet10t",
        image_size=16, in_chans=1,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("supervised")
    trainer = _trainer(root, fast_dev_run=True)
    trainer.fit(module, data)
    path = root / "supervised.ckpt"
    trainer.save_checkpoint(path)
    return module.eval(), path


@pytest.fixture(scope="module")
def diffusion_checkpoint(tmp_path_factory):
    """An untrained tiny U-Net, saved as a checkpoint holds it (training adds only time here)."""
    torch.manual_seed(0)
    module = DiffusionModule(**TINY_UNET)
    path = tmp_path_factory.mktemp("diffusion") / "diffusion.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def _fit_probe(features, data, root):
    torch.manual_seed(0)
    probe = ProbeModule(
        features, num_classes=data.num_classes, class_names=data.class_names, in_chans=1,
        image_size=16, mode="cached", lr=0.05, cache_dir=str(root / "cache"),
    )  # fmt: skip
    trainer = _trainer(root, max_epochs=2)
    trainer.fit(probe, data)
    path = root / "probe.ckpt"
    trainer.save_checkpoint(path)
    return probe.eval(), path


@pytest.fixture(scope="module")
def encoder_probe(supervised, data, tmp_path_factory):
    # A glob, as in configs/probe_encoder.yaml: the checkpoint must record the file it matched.
    features = EncoderFeatures(str(supervised[1].parent / "*.ckpt"))
    return (*_fit_probe(features, data, tmp_path_factory.mktemp("encoder_probe")), supervised[1])


@pytest.fixture(scope="module")
def diffusion_probe(diffusion_checkpoint, data, tmp_path_factory):
    features = DiffusionFeatures(
        str(diffusion_checkpoint), layers=["enc.0.*"], timesteps=(1, 10), micro_batch=8
    )
    probe, path = _fit_probe(features, data, tmp_path_factory.mktemp("diffusion_probe"))
    return probe, path, diffusion_checkpoint


@pytest.fixture(scope="module")
def uncalibrated(supervised, tmp_path_factory):
    """The supervised checkpoint as it was written before classifiers stored their calibration."""
    saved = torch.load(supervised[1], map_location="cpu", weights_only=True)
    del saved["calibration"]
    path = tmp_path_factory.mktemp("uncalibrated") / "old.ckpt"
    torch.save(saved, path)
    return path


@pytest.fixture(scope="module")
def strict(supervised, sample, tmp_path_factory):
    """The supervised checkpoint with a rejection threshold that splits the sample: between two
    confidences in its middle half, the farthest apart (so 4-decimal CSV values stay on their
    side)."""
    root = tmp_path_factory.mktemp("strict")
    classify_folder(supervised[1], sample, root / "plain.csv", device=DEVICE)
    confidence = sorted(float(row["prob_1"]) for row in _read(root / "plain.csv"))
    quarter = len(confidence) // 4
    middle = confidence[quarter : len(confidence) - quarter]
    low, high = max(zip(middle, middle[1:], strict=False), key=lambda pair: pair[1] - pair[0])
    saved = torch.load(supervised[1], map_location="cpu", weights_only=True)
    saved["calibration"]["classify"]["rejection"]["threshold"] = (low + high) / 2
    torch.save(saved, root / "strict.ckpt")
    return root / "strict.ckpt", (low + high) / 2


def _read(path, delimiter=","):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _stored(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["calibration"]


def _independently_preprocessed(sample, tmp_path):
    """The sample through the datamodule's scan and image cache, as a training set would be."""
    records = scan_class_folders(sample).records
    cached = load_or_build(
        records, Preprocessing(16, 1, polarity="auto"), tmp_path / "cache", "s", progress=False
    )
    names = [r.path.relative_to(sample).as_posix() for r in records]
    readable = [name for name, ok in zip(names, cached.readable, strict=True) if ok]
    images = eval_view(16, 1)(torch.from_numpy(np.array(cached.images[cached.readable])))
    return readable, images, cached.failed


def test_a_supervised_checkpoint_classifies_a_folder(supervised, sample, tmp_path):
    module, checkpoint = supervised
    classes = module.class_names
    out = tmp_path / "results" / "predictions.csv"
    summary = classify_folder(checkpoint, sample, out, top_k=10, batch_size=7, device=DEVICE)

    readable, images, failed = _independently_preprocessed(sample, tmp_path)
    temperature = _stored(checkpoint)["classify"]["temperature"]
    with torch.no_grad():
        logits = module.classify(images)
    probabilities = (logits / temperature).softmax(-1)
    assert summary.temperature == temperature
    # The checkpoint's temperature is applied: the plain softmax would differ visibly.
    assert not torch.allclose(logits.softmax(-1), probabilities, atol=1e-3)
    rows = {row["path"]: row for row in _read(out)}
    assert list(rows) == sorted(readable)  # every readable image, recursively, in path order
    assert [rows[name]["label_1"] for name in readable] == [
        classes[i] for i in probabilities.argmax(-1)
    ]
    for name, expected in zip(readable, probabilities, strict=True):
        # top_k=10 is clamped to the 4 classes: each row holds the whole distribution.
        values = [float(rows[name][f"prob_{i}"]) for i in range(1, 5)]
        assert values == sorted(values, reverse=True)
        assert sum(values) == pytest.approx(1.0, abs=5e-4)
        assert values == pytest.approx(expected.sort(descending=True).values.tolist(), abs=2e-4)
        assert {rows[name][f"label_{i}"] for i in range(1, 5)} == set(classes)
    assert "label_5" not in next(iter(rows.values())) and summary.top_k == 4

    skipped = _read(out.with_name("predictions_skipped.csv"))
    assert [s["path"] for s in skipped] == ["night/broken/corrupt.png"]
    assert skipped[0]["reason"] == failed[0].reason  # the datamodule's own reason

    counts = _read(out.with_name("predictions_counts.csv"))
    assert list(counts[0]) == ["class", "cc_count", "cc_fraction", "cc_low", "cc_high"]
    assert [c["class"] for c in counts] == list(summary.counts)
    assert sorted(c["class"] for c in counts) == sorted(classes)  # zero-count classes included
    numbers = [int(c["cc_count"]) for c in counts]
    assert numbers == sorted(numbers, reverse=True) and sum(numbers) == len(readable)
    top1 = Counter(row["label_1"] for row in rows.values())
    assert {c["class"]: int(c["cc_count"]) for c in counts} == {c: top1[c] for c in classes}
    assert float(counts[0]["cc_fraction"]) == pytest.approx(numbers[0] / len(readable), abs=1e-4)
    assert summary.images == len(readable) and summary.skipped == 1


@pytest.mark.parametrize("kind", ["encoder", "diffusion"])
def test_a_probe_checkpoint_reloads_with_the_test_time_predictions(
    kind, request, data, sample, tmp_path
):
    probe, checkpoint, backbone = request.getfixturevalue(f"{kind}_probe")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    source = saved["feature_source"]
    assert source["class_path"] == f"lightning_modules.{type(probe.features).__name__}"
    assert source["init_args"]["checkpoint"] == str(backbone.resolve())

    module, settings = load_classifier(checkpoint)
    assert isinstance(module, ProbeModule) and not module.training
    assert settings == ClassifierSettings("probe", 16, 1, "auto", 4.0)  # as the data were
    assert module.best_index == probe.best_index and module.class_names == probe.class_names

    # The in-memory probe's best key on the test split, through its feature cache.
    images, labels, indices = next(iter(data.dataset("test").loader(1000)))
    with torch.no_grad():
        expected = probe.logits(probe.batch_features((images, labels, indices), "test"))
        logits = module.classify(images, indices)
    assert torch.equal(logits.argmax(-1), expected[probe.best_index].argmax(-1))
    assert torch.allclose(logits, expected[probe.best_index], atol=1e-4)
    predicted = torch.cat(_trainer(tmp_path).predict(module, data))  # predict_step, test split
    assert torch.allclose(predicted, expected[probe.best_index].softmax(-1), atol=1e-5)

    out = tmp_path / "probe.csv"
    summary = classify_folder(checkpoint, sample, out, batch_size=5, device=DEVICE)
    rows = _read(out)
    assert list(rows[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3"]
    assert summary.images == len(rows) and summary.skipped == 1
    if kind == "diffusion":  # image i is noised as image i, whatever batch it lands in
        classify_folder(checkpoint, sample, tmp_path / "again.csv", batch_size=64, device=DEVICE)
        assert (tmp_path / "again.csv").read_text() == out.read_text()


@pytest.mark.parametrize("name", [name for name in BASELINES if not METHODS[name].per_regime])
def test_label_free_checkpoints_are_refused_with_how_to_probe_them(name, sample, tmp_path):
    module = METHODS[name].module(num_classes=4, image_size=16, in_chans=1)
    path = tmp_path / f"{name}.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    display = METHODS[name].display_name
    with pytest.raises(ValueError, match=f"{display} pretraining.*Probe it first.*probe_encoder"):
        classify_folder(path, sample, tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_diffusion_checkpoints_are_refused_with_how_to_probe_them(diffusion_checkpoint):
    with pytest.raises(ValueError, match="diffusion pretraining.*Probe it first.*probe_diffusion"):
        load_classifier(diffusion_checkpoint)


def test_missing_files_and_folders_without_images_are_named(
    supervised, encoder_probe, sample, tmp_path
):
    checkpoint = supervised[1]
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_classifier(tmp_path / "nowhere.ckpt")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no image files in .*empty"):
        classify_folder(checkpoint, tmp_path / "empty", tmp_path / "p.csv")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image in .*broken.*zero.png"):
        classify_folder(checkpoint, tmp_path / "broken", tmp_path / "p.csv")

    # A probe whose backbone checkpoint has gone names that file.
    saved = torch.load(encoder_probe[1], map_location="cpu", weights_only=True)
    saved["feature_source"]["init_args"]["checkpoint"] = str(tmp_path / "gone.ckpt")
    torch.save(saved, tmp_path / "orphan.ckpt")
    with pytest.raises(FileNotFoundError, match="gone.ckpt"):
        load_classifier(tmp_path / "orphan.ckpt")


def test_sources_built_in_memory_record_no_init_args(diffusion_checkpoint):
    module = load_diffusion(diffusion_checkpoint)
    source = DiffusionFeatures.from_unet(module.ema, module.schedule, timesteps=(1,))
    assert source.init_args is None
    built = DiffusionFeatures(str(diffusion_checkpoint), layers=[16], timesteps=(1,))
    assert built.init_args["layers"] == [16] and built.init_args["timesteps"] == [1]


def test_every_estimator_gives_fractions_with_bootstrap_intervals(encoder_probe, sample, tmp_path):
    # The probe, trained for two epochs, predicts several classes: intervals are not points.
    module, checkpoint, _ = encoder_probe
    out = tmp_path / "p.csv"
    summary = classify_folder(checkpoint, sample, out, device=DEVICE, abundance="all", n_boot=20)

    counts = _read(out.with_name("p_counts.csv"))
    columns = [f"{name}_{c}" for name in ESTIMATORS for c in ("count", "fraction", "low", "high")]
    assert list(counts[0]) == ["class", *columns]
    assert sorted(c["class"] for c in counts) == sorted(module.class_names)
    # The estimators read the calibrated probabilities through the checkpoint's quantifier.
    readable, images, _ = _independently_preprocessed(sample, tmp_path)
    calibration = Calibration.from_dict(_stored(checkpoint)["classify"])
    with torch.no_grad():
        logits = module.classify(images, torch.arange(len(images)))
    probabilities = calibration.probabilities(logits).numpy()
    for name in ESTIMATORS:
        fractions = {c["class"]: float(c[f"{name}_fraction"]) for c in counts}
        assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-3)
        assert sum(int(c[f"{name}_count"]) for c in counts) == len(readable)
        for c in counts:
            assert float(c[f"{name}_low"]) <= float(c[f"{name}_fraction"])
            assert float(c[f"{name}_fraction"]) <= float(c[f"{name}_high"])
        assert any(float(c[f"{name}_low"]) < float(c[f"{name}_high"]) for c in counts)
        assert summary.abundance[name] == pytest.approx(fractions, abs=5e-5)
        expected = calibration.quantifier.estimate(probabilities, name)
        assert list(fractions.values()) == pytest.approx(
            [expected[module.class_names.index(c)] for c in fractions], abs=1e-3
        )
    top1 = Counter(row["label_1"] for row in _read(out))
    assert {c["class"]: int(c["cc_count"]) for c in counts} == {
        c: top1[c] for c in module.class_names
    }


def test_rejected_images_are_unknown_and_counted_apart(strict, sample, tmp_path):
    checkpoint, threshold = strict
    out = tmp_path / "p.csv"
    summary = classify_folder(
        checkpoint, sample, out, device=DEVICE, abundance="cc,pacc", reject=True, n_boot=10
    )

    rows = _read(out)
    assert list(rows[0])[:3] == ["path", "label", "label_1"]
    unknown = [row for row in rows if row["label"] == "unknown"]
    assert 0 < len(unknown) < len(rows)
    for row in rows:  # the top-k stay for review; only the decision changes
        assert (row["label"] == "unknown") == (float(row["prob_1"]) < threshold)
        assert row["label"] in ("unknown", row["label_1"])
    counts = _read(out.with_name("p_counts.csv"))
    assert counts[-1] == {
        "class": "unknown", "cc_count": str(len(unknown)), "cc_fraction": "", "cc_low": "",
        "cc_high": "", "pacc_count": str(len(unknown)), "pacc_fraction": "", "pacc_low": "",
        "pacc_high": "",
    }  # fmt: skip
    classes = counts[:-1]
    for name in ("cc", "pacc"):  # accepted + unknown = images; fractions of the accepted
        assert sum(int(c[f"{name}_count"]) for c in counts) == len(rows)
        assert sum(float(c[f"{name}_fraction"]) for c in classes) == pytest.approx(1, abs=1e-3)
    accepted = Counter(row["label"] for row in rows if row["label"] != "unknown")
    assert {c["class"]: int(c["cc_count"]) for c in classes} == {
        c["class"]: accepted[c["class"]] for c in classes
    }
    assert summary.counts == {c["class"]: int(c["cc_count"]) for c in classes}
    stored = _stored(checkpoint)["classify"]["rejection"]
    assert summary.rejection == {**stored, "rejected": len(unknown)}


def test_an_ecotaxa_table_is_written_among_the_images(strict, sample, tmp_path):
    images = shutil.copytree(sample, tmp_path / "station")
    out = tmp_path / "results" / "p.csv"
    summary = classify_folder(strict[0], images, out, top_k=2, device=DEVICE, ecotaxa=True,
                              reject=True)  # fmt: skip
    table = images / "ecotaxa_p.tsv"
    assert summary.outputs.ecotaxa == table

    predicted = {row["path"]: row["label"] for row in _read(out)}
    records = scan(table, format="ecotaxa").records
    assert {r.path.relative_to(images).as_posix(): r.label for r in records} == predicted
    assert "unknown" in predicted.values()
    rows = _read(table, delimiter="\t")[1:]  # below the type row
    assert [row["object_pred_1_category"] for row in rows] == [row["label_1"] for row in _read(out)]
    assert "object_pred_3_category" not in rows[0]
    # The model and the suite that predicted the objects (workflows.classify_provenance).
    provenance = json.loads(out.with_name("p_provenance.json").read_text())
    assert {row["process_model_sha256"] for row in rows} == {provenance["checkpoint_sha256"]}
    assert {row["process_suite_version"] for row in rows} == {provenance["suite_version"]}

    # The table is one of the outputs: never replaced without --overwrite.
    with pytest.raises(FileExistsError, match="ecotaxa_p.tsv exists"):
        classify_folder(strict[0], images, tmp_path / "other" / "p.csv", ecotaxa=True)
    assert not (tmp_path / "other").exists()
    classify_folder(strict[0], images, out, device=DEVICE, ecotaxa=True, overwrite=True)
    assert "unknown" not in {r.label for r in scan(table, format="ecotaxa").records}


@pytest.mark.parametrize("options", [{"abundance": "cc,pacc"}, {"reject": True}])
def test_options_that_need_calibration_refuse_an_old_checkpoint_before_reading_images(
    options, uncalibrated, sample, tmp_path, monkeypatch
):
    def unread(*args):
        raise AssertionError("an image was read before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr("workflows.classify_sample.load_preprocessed", unread)
        with pytest.raises(MissingCalibrationError, match="calibrated.*plankton test --config"):
            classify_folder(uncalibrated, sample, tmp_path / "p.csv", ecotaxa=True, **options)
    assert not list(tmp_path.iterdir()) and not (sample / "ecotaxa_p.tsv").exists()


def test_an_old_checkpoint_still_classifies_and_counts(supervised, uncalibrated, sample, tmp_path):
    out = tmp_path / "p.csv"
    summary = classify_folder(uncalibrated, sample, out, top_k=4, device=DEVICE)
    assert summary.temperature is None and summary.rejection is None
    readable, images, _ = _independently_preprocessed(sample, tmp_path)
    with torch.no_grad():
        probabilities = supervised[0].classify(images).softmax(-1)  # the plain softmax
    rows = {row["path"]: row for row in _read(out)}
    for name, expected in zip(readable, probabilities, strict=True):
        values = [float(rows[name][f"prob_{i}"]) for i in range(1, 5)]
        assert values == pytest.approx(expected.sort(descending=True).values.tolist(), abs=2e-4)
    assert sum(summary.counts.values()) == len(readable)


def test_unknown_estimators_are_refused_with_the_choices(supervised, sample, tmp_path):
    for abundance in ("pcc", "cc,", []):
        with pytest.raises(ValueError, match="estimator.*choose from cc, acc, pacc, emq, or all"):
            classify_folder(supervised[1], sample, tmp_path / "p.csv", abundance=abundance)
    assert not list(tmp_path.iterdir())


def test_the_cli_takes_abundance_rejection_and_ecotaxa(strict, uncalibrated, sample, tmp_path,
                                                       capsys):  # fmt: skip
    checkpoint, threshold = strict
    images = shutil.copytree(sample, tmp_path / "station")
    common = ["classify", "--images", str(images), "--out", str(tmp_path / "p.csv")]
    assert main([*common, "--checkpoint", str(checkpoint), "--abundance", "all", "--reject",
                 "--ecotaxa", "--n-boot", "5"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    temperature = _stored(checkpoint)["classify"]["temperature"]
    assert f"temperature {temperature:.3g}" in printed
    assert f"confidence below {threshold:.3f}" in printed
    assert str(tmp_path / "p_counts.csv") in printed and str(images / "ecotaxa_p.tsv") in printed
    assert list(_read(tmp_path / "p_counts.csv")[0])[-4:] == [
        "emq_count", "emq_fraction", "emq_low", "emq_high"
    ]  # fmt: skip

    assert main([*common, "--checkpoint", str(checkpoint), "--abundance", "pcc"]) == 2
    assert "choose from cc, acc, pacc, emq, or all" in capsys.readouterr().err
    assert main([*common, "--checkpoint", str(uncalibrated), "--reject", "--overwrite"]) == 2
    assert "--reject needs calibrated" in capsys.readouterr().err


def test_testing_an_old_checkpoint_adds_its_calibration(supervised, uncalibrated, data, tmp_path):
    old = shutil.copy(uncalibrated, tmp_path / "old.ckpt")
    module = SupervisedModule(
        num_classes=data.num_classes, class_names=data.class_names, backbone="resnet10t",
        image_size=16, in_chans=1,
    )  # fmt: skip
    _trainer(tmp_path).test(module, data, ckpt_path=old, verbose=False)
    added, original = _stored(old)["classify"], _stored(supervised[1])["classify"]
    # The same weights on the same validation split: the same calibration as at training's end.
    assert added["temperature"] == pytest.approx(original["temperature"], rel=1e-4)
    assert np.allclose(added["quantifier"]["mean_probs"], original["quantifier"]["mean_probs"])


def test_unwritable_outputs_are_refused_before_any_image_is_read(
    strict, sample, tmp_path, monkeypatch
):
    # Root ignores file permissions: the refusal is simulated where the check writes.
    locked = {tmp_path / "read_only", sample}
    (tmp_path / "read_only").mkdir()
    touch = Path.touch

    def refuse(path: Path, *args: object, **kwargs: object) -> None:
        if path.parent in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        touch(path, *args, **kwargs)

    def unread(*args):
        raise AssertionError("an image was read before the refusal")

    monkeypatch.setattr(Path, "touch", refuse)
    monkeypatch.setattr("workflows.classify_sample.load_preprocessed", unread)
    for out, ecotaxa, folder in ((tmp_path / "read_only" / "new" / "p.csv", False, "read_only"),
                                 (tmp_path / "ok" / "p.csv", True, sample)):  # fmt: skip
        with pytest.raises(PermissionError) as refused:
            classify_folder(strict[0], sample, out, ecotaxa=ecotaxa)
        assert refused.value.filename == str(out.parent if folder == "read_only" else sample)
    assert not (tmp_path / "ok").exists() and not (tmp_path / "read_only" / "new").exists()


def test_outputs_are_written_all_or_none(strict, sample, tmp_path, monkeypatch):
    images = shutil.copytree(sample, tmp_path / "station")
    out = tmp_path / "p.csv"

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path))

    with monkeypatch.context() as patch:
        patch.setattr("workflows.classify_outputs.write_counts", full)
        with pytest.raises(OSError, match="No space left"):
            classify_folder(strict[0], images, out, device=DEVICE, ecotaxa=True)
    assert not out.exists() and not (images / "ecotaxa_p.tsv").exists()
    summary = classify_folder(strict[0], images, out, device=DEVICE, ecotaxa=True)  # not refused
    assert all(path.is_file() for path in summary.outputs.paths)
