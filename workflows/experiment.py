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

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules import PlanktonDataModule
from datamodules.store import write_text_atomic
from lightning_modules import METHODS, load_diffusion
from lightning_modules.common.abundance import (
    Quantifier,
    abundance_errors,
    planted_shift_errors,
)
from lightning_modules.common.figures import save_grid
from lightning_modules.common.flops import StepFlops
from lightning_modules.common.run_lock import FolderLock

from .clustering import cluster_features, clustering_split
from .distributed import GatheredPredictions, Processes, launch_processes
from .experiment_config import Experiment, MethodRun
from .layout import (
    COMPUTE,
    DONE,
    RESULTS,
    STAGES,
    TEST_PREDICTIONS,
    WALL_TIME,
    RunLayout,
    encoder_run,
    per_regime,
    probe_prefix,
    readout_source,
)
from .lightning_cli import (
    FEATURE_CHECKPOINT,
    PlanktonCLI,
    cli_arguments,
    datamodule_from_config,
    tensorboard_logger,
)
from .report import build_report


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
    (``planted_error``), where only the priors change: none when the data has no test split."""
    counted = {name: abundance_errors(quantifier, *pair) for name, pair in predictions.items()}
    for name, result in counted.items():
        if name != "test" and "test" in predictions:
            labels = predictions[name][1]
            counts = np.bincount(labels, minlength=quantifier.num_classes)
            result["planted_error"] = planted_shift_errors(quantifier, *predictions["test"], counts)
    return counted


class ExperimentRunner:
    """Runs the stages of an experiment into ``out``, skipping the completed ones."""

    def __init__(self, experiment: Experiment, out: Path, log: Callable[[str], None] = print):
        self.experiment, self.out, self.log = experiment, Path(out), log
        self.layout = RunLayout(self.out)
        self.processes = Processes()

    # -- bookkeeping ---------------------------------------------------------------------------
    def readout_checkpoint(self, name: str, readout: MethodRun) -> Path:
        """The diffusion checkpoint a readout probes; one that OnlineProbe never wrote is an
        error that says how to get it."""
        checkpoint = self.layout.checkpoint("diffusion", readout.checkpoint)
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

    def feature_sources(self, regime: str) -> dict[str, tuple[MethodRun, Path | None]]:
        """Every method's probe config and the checkpoint its features come from (none for
        raw pixels)."""
        experiment, layout = self.experiment, self.layout
        sources = {"diffusion": (experiment.probe_diffusion, layout.checkpoint("diffusion"))}
        for name in experiment.baselines:
            sources[name] = (experiment.probe_encoder, layout.checkpoint(encoder_run(name, regime)))
        if experiment.probe_pixels is not None:
            sources["pixels"] = (experiment.probe_pixels, None)
        return sources

    @staticmethod
    def checkpoint_setting(checkpoint: Path | None) -> dict[str, str]:
        """The CLI setting that points a probe's feature source at its checkpoint."""
        return {} if checkpoint is None else {FEATURE_CHECKPOINT: str(checkpoint)}

    def data_settings(self, regime: str) -> dict:
        """The experiment's data config and changes, for a CLI of any method."""
        experiment = self.experiment
        overrides = {f"data.{k}": v for k, v in experiment.data_overrides.items()}
        return {"data": str(experiment.data), **overrides, "data.regime": regime}

    def trainer_settings(self) -> dict:
        """The experiment's changes to the shared trainer settings, for a CLI of any method."""
        return {f"trainer.{k}": v for k, v in self.experiment.trainer_overrides.items()}

    def force(self, stage: str) -> None:
        """Forget ``stage`` and every later one, so they run again from scratch."""
        if stage not in STAGES:
            raise ValueError(f"--force must name a stage among {', '.join(STAGES)}; got {stage!r}")
        if not self.processes.is_zero:
            return
        for later in STAGES[STAGES.index(stage) :]:
            folder = self.layout.stage(later)
            if folder.exists():
                shutil.rmtree(folder)
                self.log(f"[{later}] forced: removed {folder}")

    def run(self, force: str | None = None) -> Path:
        """Run every stage not done yet; under DDP, in every process (``distributed.py``)."""
        self.processes = processes = launch_processes(self.experiment.launch_settings())
        if not processes.is_zero:
            self.log = lambda message: None
        lock = FolderLock(self.out, "plankton experiment")
        if processes.is_zero:  # before --force deletes anything
            lock.acquire()
        try:
            self._run_stages(force)
        finally:
            if processes.is_zero:
                lock.release()
        processes.barrier()
        return self.layout.report

    def _run_stages(self, force: str | None) -> None:
        processes = self.processes
        if force:
            self.force(force)
        if processes.is_zero:
            write_json(self.layout.experiment, self.experiment.source)
        for stage in STAGES:
            processes.barrier()  # every rank reads the markers rank zero has written
            marker = self.layout.stage_marker(stage)
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

    # -- running the CLI -----------------------------------------------------------------------
    def _cli(
        self, method: MethodRun, regime: str, folder: Path, extra: dict | None = None
    ) -> PlanktonCLI:
        """The CLI of one run, its settings applied in order (later ones win). They reach it as
        command-line arguments, not as a dict (``args=``): the experiment configs' overrides
        use the CLI's list syntax (``trainer.callbacks+: lightning_modules.OnlineProbe``, then
        ``trainer.callbacks.every_n_epochs``), which only arguments apply to the config's list
        (``cli_arguments``)."""
        settings = {
            "config": str(method.config),
            **self.data_settings(regime),
            "trainer.max_epochs": method.max_epochs,
            "trainer.default_root_dir": str(folder),
            "trainer.logger": tensorboard_logger(folder),
            **self.trainer_settings(),
            **method.overrides,
            **(extra or {}),
        }
        return PlanktonCLI(cli_arguments(settings), run=False)

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
        folder, checkpoint = self.layout.run(name), self.layout.checkpoint(name)
        if (folder / DONE).exists():
            return None, checkpoint
        cli = self._cli(method, regime, folder, extra)
        trainer, datamodule = cli.trainer, cli.datamodule
        global_batch = datamodule.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        budget = self.experiment.budget if pretraining else None
        if budget is not None:
            budget.apply(trainer, global_batch)
        resume = checkpoint if checkpoint.exists() else None
        self.log(f"  {name}: " + (f"resuming from {resume}" if resume else "training"))
        clock, flops = WallClock(folder / WALL_TIME), StepFlops()
        trainer.callbacks += [clock, flops]
        trainer.fit(cli.model, datamodule, ckpt_path=resume)
        if not self.processes.is_zero:
            return cli, checkpoint
        if budget is not None and budget.kind == "images":  # stopped inside an epoch
            images_seen = trainer.global_step * global_batch
        else:
            images_seen = trainer.current_epoch * len(datamodule.dataset("train"))
        write_json(
            folder / COMPUTE,
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
            write_json(self.layout.run(name) / DONE, {"finished": time.time()})
        self.processes.barrier()

    # -- stages --------------------------------------------------------------------------------
    def stage_data(self) -> None:
        if not self.processes.is_zero:
            return
        for regime in self.experiment.regimes:
            datamodule = datamodule_from_config(
                self.experiment.data, **self.experiment.data_overrides, regime=regime
            )
            # The eval sets with images: the clustering stage and the report name what is absent.
            summary = {**datamodule.summary.as_dict(), "eval_sets": datamodule.eval_set_names}
            write_json(self.layout.data_summary(regime), summary)
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
        figures = self.layout.figures
        figures.mkdir(parents=True, exist_ok=True)
        save_grid(samples, figures / "diffusion_samples.png")
        save_grid(real, figures / "real_images.png")

    def stage_baselines(self) -> None:
        for name, method_run in self.experiment.baselines.items():
            method = METHODS[name]
            for regime in self.regimes(name):
                run = encoder_run(name, regime)
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
                sources[readout_source(name)] = (method, self.readout_checkpoint(name, method))
            for name, (method, checkpoint) in sources.items():
                run = per_regime(probe_prefix(name), regime)
                cli, _ = self.fit(run, method, regime, self.checkpoint_setting(checkpoint))
                if cli is not None:
                    self._evaluate(cli, run, regime, name)
                    self.finish(run)

    def _evaluate(self, cli: object, run: str, regime: str, method: str) -> None:
        """Test on every eval set the data has, then keep the test predictions (when there is a
        test split) for the report's per-class F1 and confusion matrix. Without any eval set the
        run is recorded with no scores: the report says what is absent."""
        trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
        eval_sets, metrics = datamodule.eval_set_names, {}
        if eval_sets:
            trainer.test(model, datamodule, verbose=False)
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if "/f1/" not in k}
        predictions = {name: self._predict(trainer, model, datamodule, name) for name in eval_sets}
        if not self.processes.is_zero:
            return
        folder = self.layout.run(run)
        if "test" in predictions:
            probabilities, labels = predictions["test"]
            np.savez(folder / TEST_PREDICTIONS, probabilities=probabilities, labels=labels)
        calibration = model.calibrations["classify"]
        best_key = getattr(model, "best_key", None)
        write_json(
            folder / RESULTS,
            {
                "method": method,
                "regime": regime,
                "eval_sets": eval_sets,
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
        requested = experiment.clustering_split
        # Every regime has the same evaluation sets: a regime changes only the training split.
        split = clustering_split(
            requested, read_json(self.layout.data_summary(experiment.regimes[0]))
        )
        write_json(self.layout.clustering_split, {"requested": requested, "split": split})
        if split is None:
            self.log("  no evaluation set in the data: nothing to cluster")
            return
        if split != requested:
            self.log(f"  the {requested} split has no images: k-means on {split}")
        for name, (method, checkpoint) in self.feature_sources(regime).items():
            settings = {
                **self.data_settings(regime),
                **self.trainer_settings(),
                **method.overrides,
                **self.checkpoint_setting(checkpoint),
            }
            cluster_features(
                method.config,
                self.layout.clustering(name),
                split,
                overrides=cli_arguments(settings),
            )

    def stage_report(self) -> None:
        if self.processes.is_zero:
            build_report(self.out)
