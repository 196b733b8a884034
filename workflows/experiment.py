"""The whole protocol in one command: data, diffusion pretraining, the baselines, a linear probe of
every method in every regime, clustering, and the report.

Every training run goes through the Lightning CLI with the method's own config, the experiment's
data config and the shared trainer config, so a run inside an experiment is the run a user would
start by hand. Each stage (and each run inside a stage) leaves ``done.json`` when it completes; a
re-run skips what is done and resumes an interrupted training run from its ``last.ckpt``.

The methods come from the registry (``lightning_modules.METHODS``): an experiment runs diffusion
and any subset of the registered baselines. Label-free pretraining sees the training images of
``pretrain_regime`` (by default the natural, long-tailed distribution: every unlabelled image
there is); a method that learns from labels, and every probe, is trained once per regime.

Under DDP (``trainer_overrides: {devices: N, strategy: ddp}``, ``torchrun``, SLURM) every process
runs the runner: the training, extraction, test and prediction runs use every rank, and rank zero
alone writes what the others then read (see ``distributed.py``).
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Timer

from datamodules import PlanktonDataModule
from datamodules.store import write_text_atomic
from lightning_modules import BASELINES, METHODS, load_diffusion
from lightning_modules.common.abundance import (
    Quantifier,
    abundance_errors,
    planted_shift_errors,
)
from lightning_modules.common.figures import save_grid
from lightning_modules.common.flops import StepFlops
from lightning_modules.probes.online import BEST_PROBE_CHECKPOINT

from .clustering import cluster_features
from .distributed import GatheredPredictions, Processes, launch_processes
from .lightning_cli import PlanktonCLI, datamodule_from_config

STAGES = ("data", "diffusion", "baselines", "probes", "clustering", "report")
# The keys an experiment config may hold, section by section.
TOP_KEYS = (
    "name", "data", "data_overrides", "regimes", "pretrain_regime", "trainer_overrides",
    "diffusion", "baselines", "probes", "clustering", "samples", "budget",
)  # fmt: skip
BUDGET_KINDS = ("epochs", "images", "minutes")
METHOD_KEYS = ("config", "max_epochs", "overrides")
PROBE_KEYS = ("diffusion", "readouts", "encoder", "pixels")
# A readout: another probe of the diffusion features, beside the best (layer, t) pair.
READOUT_KEYS = ("label", "max_epochs", "overrides", "checkpoint")
# The diffusion checkpoints a readout may probe: the last, or the one OnlineProbe chose.
READOUT_CHECKPOINTS = ("last.ckpt", BEST_PROBE_CHECKPOINT)
CLUSTERING_KEYS = ("split",)


def check_keys(section: object, valid: Iterable[str], where: str) -> None:
    """Refuse a key ``section`` may not hold, naming it and the closest valid one: a misspelt
    key would otherwise be ignored and the run fall back to a default."""
    if section is None:
        return
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a mapping, got {section!r}")
    valid = list(valid)
    for key in section:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
            raise ValueError(f"{where}: unknown key {key!r}; {hint}")


@dataclass
class MethodRun:
    """One method's config, its epochs and its overrides (``--key value`` pairs of the CLI)."""

    config: Path
    max_epochs: int
    overrides: dict = field(default_factory=dict)
    checkpoint: str = "last.ckpt"  # a readout's diffusion checkpoint (READOUT_CHECKPOINTS)


@dataclass(frozen=True)
class Budget:
    """One training budget for every pretraining run (diffusion and the baselines), so their
    rows compare equal effort: ``epochs`` (passes over the training set), ``images`` (training
    images seen, whatever the batch size) or ``minutes`` of wall-clock time."""

    kind: str
    amount: float

    @classmethod
    def from_setting(cls, setting: object, where: str) -> Budget | None:
        if setting is None:
            return None
        check_keys(setting, BUDGET_KINDS, where)
        if len(setting) != 1:
            raise ValueError(f"{where} needs exactly one of {', '.join(BUDGET_KINDS)}")
        [(kind, amount)] = setting.items()
        if not isinstance(amount, int | float) or amount <= 0:
            raise ValueError(f"{where}.{kind} must be a positive number, got {amount!r}")
        return cls(kind, amount)

    def apply(self, trainer: L.Trainer, global_batch: int) -> None:
        """Set ``trainer``'s stopping point (before ``fit``; learning-rate schedules read it).
        A ``minutes`` budget keeps the method's ``max_epochs`` as the schedules' horizon: a run
        stopped by time has not finished annealing."""
        if self.kind == "epochs":
            trainer.fit_loop.max_epochs = int(self.amount)
        elif self.kind == "images":
            trainer.fit_loop.max_epochs = -1
            trainer.fit_loop.epoch_loop.max_steps = math.ceil(self.amount / global_batch)
        else:  # Lightning's Timer keeps its elapsed time in checkpoints: resumes count
            trainer.callbacks.append(Timer(timedelta(minutes=self.amount), interval="step"))


@dataclass
class Experiment:
    """An experiment config (``configs/experiments/*.yaml``) with its paths resolved."""

    name: str
    data: Path
    data_overrides: dict
    regimes: list[str]
    pretrain_regime: str
    trainer_overrides: dict
    diffusion: MethodRun
    baselines: dict[str, MethodRun]
    probe_diffusion: MethodRun
    readouts: dict[str, MethodRun]
    probe_encoder: MethodRun | None
    probe_pixels: MethodRun | None
    clustering_split: str
    samples: int
    source: dict
    budget: Budget | None = None

    @classmethod
    def from_file(cls, path: str | Path) -> Experiment:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"experiment config {path} does not exist")
        settings = yaml.safe_load(path.read_text()) or {}
        folder = path.parent
        check_keys(settings, TOP_KEYS, str(path))
        check_keys(settings.get("probes"), PROBE_KEYS, f"{path}: probes")
        check_keys(settings.get("clustering"), CLUSTERING_KEYS, f"{path}: clustering")
        for key, accepting in (
            ("trainer_overrides", L.Trainer),
            ("data_overrides", PlanktonDataModule),
        ):
            parameters = inspect.signature(accepting).parameters
            check_keys(settings.get(key), parameters, f"{path}: {key}")

        def method(section: dict, where: str) -> MethodRun:
            if not isinstance(section, dict) or "config" not in section:
                raise ValueError(f"{path}: {where} needs a `config` (a method config path)")
            check_keys(section, METHOD_KEYS, f"{path}: {where}")
            config = (folder / section["config"]).resolve()
            if not config.is_file():
                raise FileNotFoundError(f"{path}: {where}.config {config} does not exist")
            return MethodRun(
                config, int(section.get("max_epochs", 10)), section.get("overrides") or {}
            )

        missing = [k for k in ("data", "diffusion", "probes") if k not in settings]
        if missing:
            raise ValueError(
                f"{path}: missing sections {missing}; see configs/experiments/demo.yaml"
            )
        baselines = settings.get("baselines") or {}
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise ValueError(
                f"{path}: baselines {unknown} are not registered; choose among {list(BASELINES)}"
            )
        probes = settings["probes"] or {}
        probe_diffusion = method(probes.get("diffusion"), "probes.diffusion")
        readouts = {}
        for name, readout in (probes.get("readouts") or {}).items():
            where = f"{path}: probes.readouts.{name}"
            if not str(name).isidentifier():
                raise ValueError(f"{where}: a readout's name must be a word (letters, _, digits)")
            check_keys(readout, READOUT_KEYS, where)
            readout = readout or {}
            checkpoint = readout.get("checkpoint", "last.ckpt")
            if checkpoint not in READOUT_CHECKPOINTS:
                raise ValueError(
                    f"{where}.checkpoint must be one of {', '.join(READOUT_CHECKPOINTS)} (the "
                    f"latter is written by lightning_modules.OnlineProbe), got {checkpoint!r}"
                )
            readouts[name] = MethodRun(
                probe_diffusion.config,
                int(readout.get("max_epochs", probe_diffusion.max_epochs)),
                probe_diffusion.overrides | (readout.get("overrides") or {}),
                checkpoint,
            )
        regimes = list(settings.get("regimes", ["balanced", "long_tailed"]))
        if not regimes or set(regimes) - {"balanced", "long_tailed"}:
            raise ValueError(f"{path}: regimes must be among balanced, long_tailed; got {regimes}")
        return cls(
            name=settings.get("name", path.stem),
            data=(folder / settings["data"]).resolve(),
            data_overrides=settings.get("data_overrides") or {},
            regimes=regimes,
            pretrain_regime=settings.get("pretrain_regime", "long_tailed"),
            trainer_overrides=settings.get("trainer_overrides") or {},
            diffusion=method(settings["diffusion"], "diffusion"),
            # In the registry's order, which is the report's.
            baselines={
                name: method(baselines[name], f"baselines.{name}")
                for name in BASELINES
                if name in baselines
            },
            probe_diffusion=probe_diffusion,
            readouts=readouts,
            probe_encoder=method(probes.get("encoder"), "probes.encoder") if baselines else None,
            probe_pixels=method(probes["pixels"], "probes.pixels") if "pixels" in probes else None,
            clustering_split=(settings.get("clustering") or {}).get("split", "test"),
            samples=int(settings.get("samples", 16)),
            source=settings,
            budget=Budget.from_setting(settings.get("budget"), f"{path}: budget"),
        )

    def launch_settings(self) -> dict:
        """The shared trainer settings (the diffusion config's ``trainer``) with the
        experiment's ``trainer_overrides``: what decides how many processes run it."""
        trainer = yaml.safe_load(self.diffusion.config.read_text()).get("trainer") or {}
        if isinstance(trainer, str):  # a config file, relative to the method's config
            trainer = yaml.safe_load((self.diffusion.config.parent / trainer).read_text())
        return {**trainer, **self.trainer_overrides}


def cli_arguments(settings: dict) -> list[str]:
    """``{"data.image_size": 16}`` as ``["--data.image_size", "16"]``; lists, mappings as JSON."""
    arguments = []
    for key, value in settings.items():
        text = value if isinstance(value, str) else json.dumps(value)
        arguments += [f"--{key}", text]
    return arguments


def tensorboard_logger(folder: Path) -> dict:
    """The ``trainer.logger`` setting that logs a run straight into ``folder`` (no version
    subfolder), so that its checkpoints and TensorBoard events lie side by side."""
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(folder.parent), "name": folder.name, "version": ""},
    }


def settings_with_absolute_paths(path: Path) -> dict:
    """An experiment config's settings with ``data`` and every method's ``config`` made absolute
    (they are relative to the file), so that a changed copy can be written anywhere."""
    path = Path(path)
    settings = yaml.safe_load(path.read_text()) or {}
    folder = path.parent
    settings["data"] = str((folder / settings["data"]).resolve())
    probes = settings.get("probes") or {}
    sections = [settings.get("diffusion"), *(settings.get("baselines") or {}).values()]
    sections += [probes.get(name) for name in PROBE_KEYS if name != "readouts"]
    for section in sections:
        if isinstance(section, dict) and "config" in section:
            section["config"] = str((folder / section["config"]).resolve())
    return settings


def write_json(path: Path, content: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(content, indent=2, default=str))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class WallClock(L.Callback):
    """A run's wall time across interruptions: the total so far is saved at every epoch end, and
    a resumed attempt starts from it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.before = read_json(path)["wall_s"] if path.exists() else 0.0
        self.started = time.perf_counter()

    def total(self) -> float:
        return self.before + time.perf_counter() - self.started

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_json(self.path, {"wall_s": self.total()})


def _abundance(quantifier: Quantifier, predictions: dict[str, tuple]) -> dict[str, dict]:
    """Every estimator's counts on every labelled set against its true class mix; for each
    set beside ``test``, also their errors at the same class mix planted on the test images
    (``planted_error``), where only the priors change."""
    counted = {name: abundance_errors(quantifier, *pair) for name, pair in predictions.items()}
    for name, result in counted.items():
        if name != "test":
            labels = predictions[name][1]
            counts = np.bincount(labels, minlength=quantifier.num_classes)
            result["planted_error"] = planted_shift_errors(quantifier, *predictions["test"], counts)
    return counted


class ExperimentRunner:
    """Runs the stages of an experiment into ``out``, skipping the completed ones."""

    def __init__(self, experiment: Experiment, out: Path, log: Callable[[str], None] = print):
        self.experiment, self.out, self.log = experiment, Path(out), log
        self.processes = Processes()

    # -- bookkeeping ---------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def checkpoint(self, run: str) -> Path:
        return self.out / "runs" / run / "checkpoints" / "last.ckpt"

    def readout_checkpoint(self, name: str, readout: MethodRun) -> Path:
        """The diffusion checkpoint a readout probes; one that OnlineProbe never wrote is an
        error that says how to get it."""
        checkpoint = self.checkpoint("diffusion").with_name(readout.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(
                f"probes.readouts.{name} probes {checkpoint}, which the diffusion run did not "
                "write: add the online probe to diffusion.overrides "
                "(`trainer.callbacks+: lightning_modules.OnlineProbe`) and re-run with "
                "--force diffusion, or drop the readout's `checkpoint`"
            )
        return checkpoint

    def regimes(self, name: str) -> list[str]:
        """A method that learns from labels is trained per regime, a label-free one once."""
        experiment = self.experiment
        return experiment.regimes if METHODS[name].per_regime else [experiment.pretrain_regime]

    @staticmethod
    def encoder_run(name: str, regime: str) -> str:
        return f"{name}_{regime}" if METHODS[name].per_regime else name

    def feature_sources(self, regime: str) -> dict[str, tuple[MethodRun, Path | None]]:
        """Every method's probe config and the checkpoint its features come from (none for
        raw pixels)."""
        experiment = self.experiment
        sources = {"diffusion": (experiment.probe_diffusion, self.checkpoint("diffusion"))}
        for name in experiment.baselines:
            run = self.encoder_run(name, regime)
            sources[name] = (experiment.probe_encoder, self.checkpoint(run))
        if experiment.probe_pixels is not None:
            sources["pixels"] = (experiment.probe_pixels, None)
        return sources

    @staticmethod
    def checkpoint_argument(checkpoint: Path | None) -> dict[str, str]:
        """The CLI setting that points a probe's feature source at its checkpoint."""
        if checkpoint is None:
            return {}
        return {"model.init_args.features.init_args.checkpoint": str(checkpoint)}

    def data_arguments(self, regime: str) -> list[str]:
        """The experiment's data config and changes, for a CLI of any method."""
        overrides = {f"data.{k}": v for k, v in self.experiment.data_overrides.items()}
        return [
            "--data",
            str(self.experiment.data),
            *cli_arguments(overrides),
            "--data.regime",
            regime,
        ]

    def trainer_arguments(self) -> list[str]:
        """The experiment's changes to the shared trainer settings, for a CLI of any method."""
        overrides = self.experiment.trainer_overrides
        return cli_arguments({f"trainer.{k}": v for k, v in overrides.items()})

    def force(self, stage: str) -> None:
        """Forget ``stage`` and every later one, so they run again from scratch."""
        if stage not in STAGES:
            raise ValueError(f"--force must name a stage among {', '.join(STAGES)}; got {stage!r}")
        if not self.processes.is_zero:
            return
        for later in STAGES[STAGES.index(stage) :]:
            folder = self.stage_dir(later)
            if folder.exists():
                shutil.rmtree(folder)
                self.log(f"[{later}] forced: removed {folder}")

    def run(self, force: str | None = None) -> Path:
        """Run every stage not done yet; under DDP, in every process (``distributed.py``)."""
        self.processes = processes = launch_processes(self.experiment.launch_settings())
        if not processes.is_zero:
            self.log = lambda message: None
        if force:
            self.force(force)
        if processes.is_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "experiment.json", self.experiment.source)
        for stage in STAGES:
            processes.barrier()  # every rank reads the markers rank zero has written
            marker = self.stage_dir(stage) / "done.json"
            if marker.exists():
                self.log(f"[{stage}] done earlier, skipped ({read_json(marker)['wall_s']:.0f} s)")
                continue
            started = time.perf_counter()
            getattr(self, f"stage_{stage}")()
            wall = time.perf_counter() - started
            if processes.is_zero:
                finished = time.strftime("%Y-%m-%d %H:%M:%S")
                write_json(marker, {"wall_s": wall, "finished": finished,
                                    "processes": processes.world_size})  # fmt: skip
            self.log(f"[{stage}] done in {wall:.1f} s")
        processes.barrier()
        return self.out / "report.md"

    # -- running the CLI -----------------------------------------------------------------------
    def _cli(
        self, method: MethodRun, regime: str, folder: Path, extra: dict | None = None
    ) -> PlanktonCLI:
        arguments = [
            "--config", str(method.config),
            *self.data_arguments(regime),
            "--trainer.max_epochs", str(method.max_epochs),
            "--trainer.default_root_dir", str(folder),
            "--trainer.logger", json.dumps(tensorboard_logger(folder)),
            *self.trainer_arguments(),
            *cli_arguments(method.overrides),
            *cli_arguments(extra or {}),
        ]  # fmt: skip
        return PlanktonCLI(arguments, run=False)

    def fit(
        self,
        name: str,
        method: MethodRun,
        regime: str,
        extra: dict | None = None,
        pretraining: bool = False,
    ) -> tuple[object, Path]:
        """Train one run into ``runs/<name>`` (resuming from its ``last.ckpt``) unless done;
        returns the CLI (None when done earlier) and the final checkpoint. A pretraining run
        (diffusion, a baseline) trains to the experiment's ``budget`` when it sets one."""
        folder = self.out / "runs" / name
        checkpoint = self.checkpoint(name)
        if (folder / "done.json").exists():
            return None, checkpoint
        cli = self._cli(method, regime, folder, extra)
        trainer, datamodule = cli.trainer, cli.datamodule
        global_batch = datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        budget = self.experiment.budget if pretraining else None
        if budget is not None:
            budget.apply(trainer, global_batch)
        resume = checkpoint if checkpoint.exists() else None
        self.log(f"  {name}: " + (f"resuming from {resume}" if resume else "training"))
        clock, flops = WallClock(folder / "wall_time.json"), StepFlops()
        trainer.callbacks += [clock, flops]
        trainer.fit(cli.model, datamodule, ckpt_path=resume)
        if not self.processes.is_zero:
            return cli, checkpoint
        if budget is not None and budget.kind == "images":  # stopped inside an epoch
            images_seen = trainer.global_step * global_batch
        else:
            images_seen = trainer.current_epoch * len(datamodule.dataset("train"))
        write_json(
            folder / "compute.json",
            {
                "method": name,
                "config": str(method.config),
                "regime": regime,
                "epochs": trainer.current_epoch,
                "steps": trainer.global_step,
                "images_seen": images_seen,
                "batch_size": datamodule.batch_size * trainer.world_size,
                "budget": {budget.kind: budget.amount} if budget else None,
                # One step of this attempt, counted; a resumed run's earlier steps cost the same.
                "train_flops_per_image": flops.per_image,
                "train_flops": flops.per_image * images_seen,
                "wall_s": clock.total(),
                "resumed": resume is not None,
                "trainable_parameters": sum(
                    p.numel() for p in cli.model.parameters() if p.requires_grad
                ),
                "parameters": sum(p.numel() for p in cli.model.parameters()),
                "precision": str(trainer.precision),
                "devices": trainer.world_size,
                "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator"),
                # Self-supervised methods: the last epoch's collapse signals.
                "collapse": getattr(cli.model, "collapse_report", lambda: None)(),
            },
        )
        return cli, checkpoint

    def finish(self, name: str) -> None:
        if self.processes.is_zero:
            write_json(self.out / "runs" / name / "done.json", {"finished": time.time()})
        self.processes.barrier()

    # -- stages --------------------------------------------------------------------------------
    def stage_data(self) -> None:
        if not self.processes.is_zero:
            return
        for regime in self.experiment.regimes:
            datamodule = datamodule_from_config(
                self.experiment.data, **self.experiment.data_overrides, regime=regime
            )
            summary = datamodule.summary.as_dict()
            write_json(self.stage_dir("data") / f"{regime}.json", summary)
            counts = {split: sum(c.values()) for split, c in summary["counts"].items()}
            self.log(f"  {regime}: {len(summary['classes'])} classes, images per set {counts}")

    def stage_diffusion(self) -> None:
        experiment = self.experiment
        _, checkpoint = self.fit(
            "diffusion", experiment.diffusion, experiment.pretrain_regime, pretraining=True
        )
        if self.processes.is_zero:
            self._samples_next_to_real(checkpoint)
        self.finish("diffusion")

    def _samples_next_to_real(self, checkpoint: Path) -> None:
        count = self.experiment.samples
        module = load_diffusion(checkpoint)
        self.log(f"  sampling {count} images (DDIM, 50 steps)")
        samples = module.sample(count, "ddim", steps=50, seed=0)
        datamodule = datamodule_from_config(self.experiment.data, **self.experiment.data_overrides)
        dataset = datamodule.dataset("val")
        real = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
        figures = self.out / "figures"
        figures.mkdir(parents=True, exist_ok=True)
        save_grid(samples, figures / "diffusion_samples.png")
        save_grid(real, figures / "real_images.png")

    def stage_baselines(self) -> None:
        for name, method_run in self.experiment.baselines.items():
            method = METHODS[name]
            for regime in self.regimes(name):
                run = self.encoder_run(name, regime)
                cli, _ = self.fit(run, method_run, regime, pretraining=True)
                if cli is None:
                    continue
                if method.per_regime:  # a classifier itself: tested end to end
                    self._evaluate(cli, run, regime, f"{method.display_name} end to end")
                self.finish(run)

    def stage_probes(self) -> None:
        for regime in self.experiment.regimes:
            sources = self.feature_sources(regime)
            for name, method in self.experiment.readouts.items():  # not clustered: a probe's
                sources[f"diffusion_{name}"] = (method, self.readout_checkpoint(name, method))
            for name, (method, checkpoint) in sources.items():
                run = f"probe_{name}_{regime}"
                cli, _ = self.fit(run, method, regime, self.checkpoint_argument(checkpoint))
                if cli is not None:
                    self._evaluate(cli, run, regime, name)
                    self.finish(run)

    def _evaluate(self, cli: object, run: str, regime: str, method: str) -> None:
        """Test on every eval set, then keep the test predictions for the report's per-class F1
        and confusion matrix."""
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        trainer.test(model, datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/f1/" not in k}
        predictions = {name: self._predict(trainer, model, datamodule, name)
                       for name in datamodule.eval_set_names}  # fmt: skip
        if not self.processes.is_zero:
            return
        probabilities, labels = predictions["test"]
        folder = self.out / "runs" / run
        np.savez(folder / "test_predictions.npz", probabilities=probabilities, labels=labels)
        calibration = model.calibrations["classify"]
        best_key = getattr(model, "best_key", None)
        write_json(
            folder / "results.json",
            {
                "method": method,
                "regime": regime,
                "eval_sets": datamodule.eval_set_names,
                "class_names": list(datamodule.class_names),
                "train_counts": datamodule.class_counts.tolist(),
                "metrics": metrics,
                "best_key": list(best_key) if best_key is not None else None,
                # Fitted on validation; a probe's fusion head is calibrated too.
                "calibration": {
                    head: {k: v for k, v in c.to_dict().items() if k != "quantifier"}
                    for head, c in model.calibrations.items()
                },
                # The classifier's counts on every labelled set against its true class mix.
                "abundance": _abundance(calibration.quantifier, predictions),
            },
        )

    def _predict(
        self, trainer: L.Trainer, model: object, datamodule: PlanktonDataModule, name: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities and labels of the eval set ``name``, every image once in
        dataset order (whatever the number of ranks)."""
        datamodule.predict_set = name
        gathered = GatheredPredictions(self.processes)
        trainer.callbacks.append(gathered)
        trainer.predict(model, datamodule, return_predictions=False)
        trainer.callbacks.remove(gathered)
        return gathered.values, np.asarray(datamodule.dataset(name).labels)

    def stage_clustering(self) -> None:
        if not self.processes.is_zero:
            return
        experiment = self.experiment
        regime = experiment.pretrain_regime
        for name, (method, checkpoint) in self.feature_sources(regime).items():
            overrides = [
                *self.data_arguments(regime),
                *self.trainer_arguments(),
                *cli_arguments(method.overrides),
                *cli_arguments(self.checkpoint_argument(checkpoint)),
            ]
            cluster_features(
                method.config,
                self.stage_dir("clustering") / name,
                experiment.clustering_split,
                overrides=overrides,
            )

    def stage_report(self) -> None:
        from .report import build_report

        if self.processes.is_zero:
            build_report(self.out)
