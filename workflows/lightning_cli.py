"""The Lightning CLI of the suite and the configs it reads, as a library: ``plankton fit`` and
every workflow build their runs here, so a run inside an experiment is the run a user would
start by hand."""

from __future__ import annotations

from pathlib import Path

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import PlanktonDataModule
from lightning_modules.common.trainer import PlanktonTrainer

# Settings every model of the suite receives from the data (and keeps in its checkpoint).
DATA_TO_MODEL = [
    ("num_classes", "num_classes"),
    ("class_names", "class_names"),
    ("channels", "in_chans"),
    ("image_size", "image_size"),
]


class PlanktonCLI(LightningCLI):
    """LightningCLI over the one PlanktonDataModule and any LightningModule of the suite."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
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

    def before_instantiate_classes(self) -> None:
        """Name the default TensorBoard run after the model, under ``default_root_dir``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            model_name = config.model.class_path.rsplit(".", 1)[-1].removesuffix("Module").lower()
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=config.trainer.default_root_dir or ".", name=model_name
                ),
            )


def model_settings_from_config(path: str | Path) -> dict:
    """The ``model.init_args`` of a model config, with the linked data settings filled in."""
    content = yaml.safe_load(Path(path).read_text()) or {}
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
    content = yaml.safe_load(path.read_text()) or {}
    data = content.get("data", content) if isinstance(content, dict) else None
    if isinstance(data, str):  # ``data: data/synthetic.yaml``, relative to the config
        return datamodule_from_config(path.parent / data, **overrides)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of PlanktonDataModule settings")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PlanktonDataModule, "data")
    config = parser.parse_object({"data": {**data, **overrides}})
    return parser.instantiate_classes(config).data
