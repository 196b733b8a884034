"""An experiment config (``configs/experiments/*.yaml``): its settings as typed dataclasses, read
the same by the runner (from the config file) and by the report (from the run folder's
``experiment.json``), and the experiment they describe with its paths resolved.

The settings keep what the file says (a value it leaves out stays None); the ``Experiment`` fills
in the defaults and checks what the runner needs (the method configs exist, the baselines are
registered)."""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
from lightning.pytorch.callbacks import Timer

from datamodules import PlanktonDataModule
from lightning_modules import BASELINES
from lightning_modules.probes.online import BEST_PROBE_CHECKPOINT

from .config_files import load_mapping
from .layout import LAST_CHECKPOINT
from .typed_mapping import read_mapping, refuse_unknown_keys

Regime = Literal["balanced", "long_tailed"]
REGIMES = get_args(Regime)
# The epochs of a method whose section gives none.
DEFAULT_EPOCHS = 10


@dataclass
class MethodSettings:
    """One method's config, its epochs and its overrides (``--key value`` pairs of the CLI)."""

    config: str | None = None
    max_epochs: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReadoutSettings:
    """A readout: another probe of the diffusion features, beside the best (layer, t) pair; its
    epochs and overrides are added to those of ``probes.diffusion``."""

    label: str | None = None
    max_epochs: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # The diffusion checkpoint it probes: the last, or the one OnlineProbe chose.
    checkpoint: Literal["last.ckpt", "best_probe.ckpt"] = field(
        default=LAST_CHECKPOINT,
        metadata={"help": f"{BEST_PROBE_CHECKPOINT} is written by lightning_modules.OnlineProbe"},
    )


@dataclass
class ProbeSettings:
    diffusion: MethodSettings | None = None
    readouts: dict[str, ReadoutSettings] = field(default_factory=dict)
    encoder: MethodSettings | None = None
    pixels: MethodSettings | None = None


@dataclass
class ClusteringSettings:
    split: str = "test"


@dataclass
class BudgetSettings:
    """One training budget for every pretraining run; exactly one of its fields is set."""

    epochs: float | None = None
    images: float | None = None
    minutes: float | None = None


@dataclass
class ExperimentSettings:
    """The settings of an experiment config, as written."""

    name: str | None = None
    data: str | None = None
    data_overrides: dict[str, Any] = field(default_factory=dict)
    regimes: list[Regime] = field(default_factory=lambda: list(REGIMES))
    pretrain_regime: Regime = "long_tailed"
    trainer_overrides: dict[str, Any] = field(default_factory=dict)
    diffusion: MethodSettings | None = None
    baselines: dict[str, MethodSettings] = field(default_factory=dict)
    probes: ProbeSettings | None = None
    clustering: ClusteringSettings = field(default_factory=ClusteringSettings)
    samples: int = 16
    budget: BudgetSettings | None = None

    @property
    def baseline_names(self) -> list[str]:
        """The registered baselines the experiment runs, in the registry's order (the report's)."""
        return [name for name in BASELINES if name in self.baselines]

    @property
    def readouts(self) -> dict[str, ReadoutSettings]:
        return self.probes.readouts if self.probes else {}

    def readout_label(self, name: str) -> str:
        """A readout's name in every table: its ``label``, else its key in words."""
        return self.readouts[name].label or name.replace("_", " ")


def read_settings(path: Path) -> tuple[ExperimentSettings, dict]:
    """The settings of an experiment config or of a run's ``experiment.json``, and the mapping
    they were read from."""
    source = (json.loads(path.read_text()) or {}) if path.suffix == ".json" else load_mapping(path)
    return read_mapping(ExperimentSettings, source, str(path)), source


@dataclass
class MethodRun:
    """One method's config, its epochs and its overrides (``--key value`` pairs of the CLI)."""

    config: Path
    max_epochs: int
    overrides: dict = field(default_factory=dict)
    checkpoint: str = LAST_CHECKPOINT  # a readout's diffusion checkpoint


@dataclass(frozen=True)
class Budget:
    """One training budget for every pretraining run (diffusion and the baselines), so their
    rows compare equal effort: ``epochs`` (passes over the training set), ``images`` (training
    images seen, whatever the batch size) or ``minutes`` of wall-clock time."""

    kind: str
    amount: float

    @classmethod
    def from_setting(cls, setting: BudgetSettings | dict | None, where: str) -> Budget | None:
        if setting is None:
            return None
        if not isinstance(setting, BudgetSettings):
            setting = read_mapping(BudgetSettings, setting, where)
        given = {key: value for key, value in vars(setting).items() if value is not None}
        if len(given) != 1:
            kinds = ", ".join(f.name for f in fields(BudgetSettings))
            raise ValueError(f"{where} needs exactly one of {kinds}")
        [(kind, amount)] = given.items()
        if amount <= 0:
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
        settings, source = read_settings(path)
        _check_sections(settings, path)
        method = _MethodResolver(path)
        probes = settings.probes
        probe_diffusion = method(probes.diffusion, "probes.diffusion")
        return cls(
            name=settings.name or path.stem,
            data=(path.parent / settings.data).resolve(),
            data_overrides=settings.data_overrides,
            regimes=settings.regimes,
            pretrain_regime=settings.pretrain_regime,
            trainer_overrides=settings.trainer_overrides,
            diffusion=method(settings.diffusion, "diffusion"),
            baselines={
                name: method(settings.baselines[name], f"baselines.{name}")
                for name in settings.baseline_names
            },
            probe_diffusion=probe_diffusion,
            readouts={
                name: _readout_run(probe_diffusion, readout)
                for name, readout in probes.readouts.items()
            },
            probe_encoder=method(probes.encoder, "probes.encoder") if settings.baselines else None,
            probe_pixels=method(probes.pixels, "probes.pixels") if probes.pixels else None,
            clustering_split=settings.clustering.split,
            samples=settings.samples,
            source=source,
            budget=Budget.from_setting(settings.budget, f"{path}: budget"),
        )

    def launch_settings(self) -> dict:
        """The shared trainer settings (the diffusion config's ``trainer``) with the
        experiment's ``trainer_overrides``: what decides how many processes run it."""
        trainer = load_mapping(self.diffusion.config).get("trainer") or {}
        if isinstance(trainer, str):  # a config file, relative to the method's config
            trainer = load_mapping(self.diffusion.config.parent / trainer)
        return {**trainer, **self.trainer_overrides}


def _check_sections(settings: ExperimentSettings, path: Path) -> None:
    """What the runner needs beyond the settings' types: the sections it cannot do without,
    overrides the trainer and the data accept, registered baselines, readouts named by a word
    and at least one regime."""
    accepting_classes = (("trainer_overrides", L.Trainer), ("data_overrides", PlanktonDataModule))
    for key, accepting in accepting_classes:
        parameters = inspect.signature(accepting).parameters
        refuse_unknown_keys(getattr(settings, key), parameters, f"{path}: {key}")
    missing = [key for key in ("data", "diffusion", "probes") if getattr(settings, key) is None]
    if missing:
        raise ValueError(f"{path}: missing sections {missing}; see configs/experiments/demo.yaml")
    unknown = sorted(set(settings.baselines) - set(BASELINES))
    if unknown:
        raise ValueError(
            f"{path}: baselines {unknown} are not registered; choose among {list(BASELINES)}"
        )
    for name in settings.readouts:
        if not str(name).isidentifier():
            raise ValueError(
                f"{path}: probes.readouts.{name}: a readout's name must be a word "
                "(letters, _, digits)"
            )
    if not settings.regimes:
        raise ValueError(f"{path}: regimes must be among {', '.join(REGIMES)}; got []")


class _MethodResolver:
    """A method's section of the experiment config at ``path`` as a MethodRun, its config
    resolved against the file's folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, section: MethodSettings | None, where: str) -> MethodRun:
        if section is None or section.config is None:
            raise ValueError(f"{self.path}: {where} needs a `config` (a method config path)")
        config = (self.path.parent / section.config).resolve()
        if not config.is_file():
            raise FileNotFoundError(f"{self.path}: {where}.config {config} does not exist")
        epochs = DEFAULT_EPOCHS if section.max_epochs is None else section.max_epochs
        return MethodRun(config, epochs, section.overrides)


def _readout_run(probe: MethodRun, readout: ReadoutSettings) -> MethodRun:
    """A readout's run: the diffusion probe's, with the readout's epochs and overrides."""
    epochs = probe.max_epochs if readout.max_epochs is None else readout.max_epochs
    return MethodRun(probe.config, epochs, probe.overrides | readout.overrides, readout.checkpoint)


def settings_with_absolute_paths(path: Path) -> dict:
    """An experiment config's settings with ``data`` and every method's ``config`` made absolute
    (they are relative to the file), so that a changed copy can be written anywhere."""
    path = Path(path)
    settings = load_mapping(path)
    folder = path.parent
    settings["data"] = str((folder / settings["data"]).resolve())
    probes = settings.get("probes") or {}
    sections = [settings.get("diffusion"), *(settings.get("baselines") or {}).values()]
    sections += [probes.get(f.name) for f in fields(ProbeSettings) if f.name != "readouts"]
    for section in sections:
        if isinstance(section, dict) and "config" in section:
            section["config"] = str((folder / section["config"]).resolve())
    return settings
