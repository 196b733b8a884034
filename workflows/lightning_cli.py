"""The Lightning CLI of the suite and the configs it reads, as a library: ``plankton fit`` and
every workflow build their runs here, so a run inside an experiment is the run a user would
start by hand."""

from __future__ import annotations

import glob
import json
import shutil
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from datamodules import PlanktonDataModule
from lightning_modules.common.module import load_checkpoint
from lightning_modules.common.run_lock import LOCK_NAME
from lightning_modules.common.trainer import PlanktonTrainer

from .config_files import load_mapping, use_in_jsonargparse
from .fit_config_keys import refuse_unknown_config_keys

# Settings every model of the suite receives from the data (and keeps in its checkpoint).
DATA_TO_MODEL = [
    ("num_classes", "num_classes"),
    ("class_names", "class_names"),
    ("channels", "in_chans"),
    ("image_size", "image_size"),
]
# The checkpoint a probe's frozen features come from (a path or a glob pattern).
FEATURE_CHECKPOINT = "model.init_args.features.init_args.checkpoint"
# What a run folder holds before its first result: the saved config, the hyperparameters, the
# run's lock and the TensorBoard event files (without a logged value; see ``_logs_values``).
BOOKKEEPING = ("config.yaml", "hparams.yaml", LOCK_NAME)


class PlanktonCLI(LightningCLI):
    """LightningCLI over the one PlanktonDataModule and any LightningModule of the suite."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        use_in_jsonargparse()
        super().__init__(
            model_class=LightningModule,
            datamodule_class=PlanktonDataModule,
            trainer_class=PlanktonTrainer,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the classes and the image format; every model receives them.
        for data_setting, model_setting in DATA_TO_MODEL:
            parser.link_arguments(
                f"data.{data_setting}", f"model.init_args.{model_setting}", apply_on="instantiate"
            )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse as Lightning does; when the parse fails on an unknown key of a ``--config``
        file, refuse it in one line naming the file and the closest valid key. Any other parse
        error keeps jsonargparse's usage message (a mistake in a config file's YAML is refused
        before, by ``config_files``)."""
        # Without subcommands (``run=False``) the one parser holds every setting.
        subcommand_parsers = getattr(self, "_subcommand_parsers", {})
        parsers = [parser, *subcommand_parsers.values()]
        for each in parsers:
            each.exit_on_error = False
        try:
            super().parse_arguments(parser, args)
            return
        except ArgumentError as error:
            refusal = error
        finally:
            for each in parsers:
                each.exit_on_error = True
        arguments = sys.argv[1:] if args is None else args
        refusing = parser
        if isinstance(arguments, list):
            subcommand = next((a for a in arguments if a in subcommand_parsers), None)
            refusing = subcommand_parsers.get(subcommand, parser)
            if subcommand or not subcommand_parsers:
                refuse_unknown_config_keys(refusing, arguments)
        # The usage of the parser that refused the arguments, as without this method.
        refusing.error(str(refusal))

    def _parse_ckpt_path(self) -> None:
        """Read ``--ckpt_path`` with ``load_checkpoint`` before Lightning reads it: random bytes
        or a pickle that would run code are then refused with the file's path named, instead of
        an unpickler's message. A path that is no file is left to Lightning (``last``, ``best``,
        a URL; a missing file's error names it)."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_file():
            load_checkpoint(path)
        super()._parse_ckpt_path()

    def _run_subcommand(self, subcommand: str) -> None:
        """Run ``subcommand``; when it fails, remove the run folder (``version_N``) it created
        and left without a result, so that a mistake leaves no empty run behind. A folder that
        existed before the command, or holds anything beyond ``BOOKKEEPING`` and event files
        without a logged value (a checkpoint, a metric, a report), is kept."""
        logger = self.trainer.logger
        versioned = isinstance(logger, TensorBoardLogger | CSVLogger)
        existing = _entries(Path(logger.root_dir)) if versioned else set()
        try:
            super()._run_subcommand(subcommand)
        except Exception:
            if versioned and self.trainer.is_global_zero:
                _remove_empty_run(Path(logger.log_dir).resolve(), existing)
            raise

    def before_instantiate_classes(self) -> None:
        """Name the default TensorBoard run after the model, under ``default_root_dir``; find a
        probe's feature checkpoint (``resolve_feature_checkpoint``)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        pattern = config.get(FEATURE_CHECKPOINT)
        if pattern:
            config[FEATURE_CHECKPOINT] = resolve_feature_checkpoint(
                pattern, config.trainer.default_root_dir
            )
        if config.trainer.logger in (None, True):
            model_name = config.model.class_path.rsplit(".", 1)[-1].removesuffix("Module").lower()
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=config.trainer.default_root_dir or ".", name=model_name
                ),
            )


def cli_arguments(settings: dict) -> list[str]:
    """``{"data.image_size": 16}`` as ``["--data.image_size", "16"]``; lists, mappings as JSON.
    Settings written in the CLI's list syntax (``trainer.callbacks+``, then a setting of the
    callback just added) mean what they say only as command-line arguments: jsonargparse
    applies them to a dict's (``args=``) defaults, not to its config file's list."""
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


def resolve_feature_checkpoint(pattern: str, root: str | None) -> str:
    """The feature checkpoint (path or glob pattern) to read. The probe configs' default,
    ``runs/diffusion/version_*/checkpoints/last.ckpt``, is written for the run root ``runs``
    seen from the current folder; it must also find the pretraining run of another
    ``--trainer.default_root_dir``.

    The rule: ``pattern`` itself when it matches from the current folder. Otherwise, when it is
    relative and ``root`` (``trainer.default_root_dir``) is set, ``root/pattern``, then
    ``root/pattern`` without its first folder (the configs' ``runs/``); the first that matches.

    Raises:
        FileNotFoundError: nothing matches, naming the option and every place searched.
    """
    candidates = [pattern]
    parts = Path(pattern).parts
    if root and not Path(pattern).is_absolute():
        candidates.append(str(Path(root, pattern)))
        if len(parts) > 1:
            candidates.append(str(Path(root, *parts[1:])))
    candidates = list(dict.fromkeys(candidates))  # the configs' root is ``runs`` already
    for candidate in candidates:
        if glob.glob(candidate):
            return candidate
    raise FileNotFoundError(
        f"{FEATURE_CHECKPOINT}: no checkpoint matches {' nor '.join(candidates)}: train the "
        "feature model first with the same --trainer.default_root_dir (plankton fit --config "
        "configs/diffusion.yaml), or give the checkpoint's path"
    )


def _entries(folder: Path) -> set[Path]:
    """``folder`` and what it holds, resolved: what existed before a run."""
    folder = folder.resolve()
    return {folder, *folder.iterdir()} if folder.is_dir() else set()


def _remove_empty_run(folder: Path, existing: set[Path]) -> None:
    """Delete the run ``folder`` if it is not in ``existing`` and holds no result; then its
    parent (the model's folder of runs) if this run created it and it is empty."""
    if folder in existing or not folder.is_dir():
        return
    for entry in folder.iterdir():
        events = entry.name.startswith("events.out.tfevents.") and entry.is_file()
        if not (entry.name in BOOKKEEPING or (events and not _logs_values(entry))):
            return
    shutil.rmtree(folder)
    if folder.parent not in existing and not any(folder.parent.iterdir()):
        folder.parent.rmdir()


def _logs_values(events: Path) -> bool:
    """Whether a TensorBoard event file holds a logged value (a scalar, an image...), beyond
    its header and the hyperparameters logged when a run starts."""
    return any(
        value.metadata.plugin_data.plugin_name != "hparams"
        for event in EventFileLoader(str(events)).Load()
        for value in event.summary.value
    )


def model_settings_from_config(path: str | Path) -> dict:
    """The ``model.init_args`` of a model config, with the linked data settings filled in."""
    content = load_mapping(path)
    settings = dict((content.get("model") or {}).get("init_args") or {})
    data = datamodule_from_config(path, progress=False)
    settings.setdefault("in_chans", data.channels)
    settings.setdefault("image_size", data.image_size)
    return settings


def datamodule_from_config(path: str | Path, **overrides: object) -> PlanktonDataModule:
    """A PlanktonDataModule from a data config or from the ``data`` section of a model config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    content = load_mapping(path)
    data = content.get("data", content)
    if isinstance(data, str):  # ``data: data/synthetic.yaml``, relative to the config
        return datamodule_from_config(path.parent / data, **overrides)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of PlanktonDataModule settings")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PlanktonDataModule, "data")
    config = parser.parse_object({"data": {**data, **overrides}})
    return parser.instantiate_classes(config).data
