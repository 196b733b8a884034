"""Where a set of classify outputs came from, so that a count table found years later names the
model, the settings and the code that made it.

Every output set gets a sidecar ``<out stem>_provenance.json``; the EcoTaxa tables carry the
checkpoint's sha256 and the suite's version in ``process_*`` columns (EcoTaxa's level for the
processing of a sample), so the objects imported into a project say which model predicted them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from datamodules.store import write_text_atomic
from workflows.classify_sample import LoadedClassifier

# The distribution name in pyproject.toml: its installed version is the suite's.
DISTRIBUTION = "plankton-diffusion"


def suite_version() -> str | None:
    """The installed suite's version; None when the code runs from a checkout never installed."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def file_sha256(path: Path) -> str:
    """The sha256 of the file's bytes, read in chunks (checkpoints reach gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def command_settings(
    top_k: int, batch_size: int, estimators: list[str], reject: bool, n_boot: int, **inputs: str
) -> dict:
    """The settings of a classify command that shape its outputs, and its ``inputs`` (the
    image folder, or the samples)."""
    settings = {"top_k": top_k, "batch_size": batch_size, "abundance": estimators}
    return {**inputs, **settings, "reject": reject, "n_boot": n_boot}


@dataclass(frozen=True)
class Provenance:
    """What one classify run used: the checkpoint (its path and sha256), what it is (method,
    classes, calibration temperature and rejection threshold, None when absent), the suite's
    version, the command's settings and the UTC time the run started."""

    checkpoint: str
    checkpoint_sha256: str
    method: str | None
    classes: list[str]
    temperature: float | None
    rejection_threshold: float | None
    suite_version: str | None
    settings: dict
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @classmethod
    def of(cls, checkpoint: str | Path, classifier: LoadedClassifier, settings: dict) -> Provenance:
        """The provenance of a run of ``classifier``, loaded from ``checkpoint``, with the
        command's ``settings`` (plain JSON values)."""
        calibration = classifier.calibration
        return cls(
            checkpoint=str(Path(checkpoint).resolve()),
            checkpoint_sha256=file_sha256(Path(checkpoint)),
            method=classifier.method,
            classes=classifier.classes,
            temperature=calibration.temperature if calibration else None,
            rejection_threshold=calibration.rejection.threshold if calibration else None,
            suite_version=suite_version(),
            settings=settings,
        )

    @property
    def ecotaxa_columns(self) -> dict[str, str]:
        """The ``process_*`` columns of an EcoTaxa table, one value for every object."""
        return {
            "process_software": DISTRIBUTION,
            "process_suite_version": self.suite_version or "unknown",
            "process_model_sha256": self.checkpoint_sha256,
        }

    def write(self, path: Path) -> None:
        """The sidecar JSON, written atomically."""
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
