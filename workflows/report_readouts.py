"""The report's section on the diffusion readouts: each probe of the diffusion features on
validation (what chose it), the solvers compared on the same features, and the online probe's
curve during pretraining with the checkpoint it chose.

Everything is read from the run folder: each probe run's ``config.yaml`` (the settings the CLI
resolved) and ``probe_results.csv``, and the diffusion checkpoints."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from lightning_modules.probes.online import BEST_PROBE_CHECKPOINT

from .experiment_config import ExperimentSettings
from .layout import PROBE_RESULTS, RUN_CONFIG, RunLayout, per_regime, probe_prefix, readout_source

# The settings of a probe that decide its features; two probes equal in these read the same ones.
FEATURE_SETTINGS = (
    "layers", "timesteps", "pooling", "pool_size", "noise_draws", "concat_timesteps",
)  # fmt: skip


def _probe_settings(folder: Path) -> dict | None:
    """A probe run's model settings, as its CLI resolved them."""
    path = folder / RUN_CONFIG
    if not path.exists():
        return None
    model = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args") or {}
    return model


def best_validation_row(folder: Path) -> dict | None:
    """The best key's validation row of ``probe_results.csv``."""
    path = folder / PROBE_RESULTS
    if not path.exists():
        return None
    with open(path, newline="") as handle:
        rows = csv.DictReader(handle)
        return next((r for r in rows if r["split"] == "val" and r["best"] == "True"), None)


def _feature_settings(settings: dict) -> dict:
    return (settings.get("features") or {}).get("init_args") or {}


def _features_of(settings: dict) -> dict:
    features = _feature_settings(settings)
    return {name: features.get(name) for name in FEATURE_SETTINGS}


def _checkpoint_name(settings: dict) -> str:
    return Path(str(_feature_settings(settings).get("checkpoint", "last.ckpt"))).name


def _key(row: dict) -> str:
    return f"`{row['layer']}`" + (f" t={row['timestep']}" if row["timestep"] else " (all t)")


def readouts_section(layout: RunLayout, settings: ExperimentSettings, regime: str) -> list[str]:
    """A table of every diffusion probe on validation, then each solver comparison on the same
    features and the online probe's choice against ``last.ckpt``; [] before any probe ran."""
    probes = {"the grid (best pair)": probe_prefix("diffusion")}
    for name in settings.readouts:
        probes[settings.readout_label(name)] = probe_prefix(readout_source(name))
    found = {}
    for label, prefix in probes.items():
        folder = layout.run(per_regime(prefix, regime))
        settings, best = _probe_settings(folder), best_validation_row(folder)
        if settings is not None and best is not None:
            found[label] = (settings, best)
    if not found:
        return []
    lines = [
        f"Validation macro-F1 of every probe of the diffusion features ({regime}); each chose "
        "its best key, and a linear one its weight decay, on validation alone.",
        "",
        "| readout | solver, head | checkpoint | best key | val macro-F1 | converged |",
        "|---|---|---|---|---|---|",
    ]
    for label, (settings, best) in found.items():
        solver = settings.get("solver") or "default"
        lines.append(
            f"| {label} | {solver}, {settings.get('head', 'linear')} | "
            f"`{_checkpoint_name(settings)}` | {_key(best)} | {float(best['macro_f1']):.3f} | "
            f"{best['converged']} |"
        )
    return [*lines, "", *_comparisons(found)]


def _comparisons(found: dict) -> list[str]:
    """The grid's solver against every readout that reads the same features from the same
    checkpoint with another solver, and its checkpoint against every other checkpoint."""
    grid_label = next(iter(found))
    grid_settings, grid_best = found[grid_label]
    grid_score = float(grid_best["macro_f1"])
    lines = []
    for label, (settings, best) in list(found.items())[1:]:
        same_features = _features_of(settings) == _features_of(grid_settings)
        same_head = settings.get("head") == grid_settings.get("head")
        same_checkpoint = _checkpoint_name(settings) == _checkpoint_name(grid_settings)
        score = float(best["macro_f1"])
        if (
            same_features
            and same_head
            and same_checkpoint
            and settings.get("solver") != (grid_settings.get("solver"))
        ):
            lines.append(
                f"- Solvers on the same features: {grid_settings.get('solver')} (the grid) "
                f"{grid_score:.3f} against {label} {score:.3f} best validation macro-F1, "
                f"a margin of {grid_score - score:+.3f}."
            )
        elif same_features and same_head and not same_checkpoint:
            lines.append(
                f"- Checkpoints, same probe: `{_checkpoint_name(settings)}` {score:.3f} against "
                f"`{_checkpoint_name(grid_settings)}` {grid_score:.3f} best validation "
                f"macro-F1 ({score - grid_score:+.3f})."
            )
    return [*lines, ""] if lines else []


def online_probe_section(folder: Path, last: dict | None) -> list[str]:
    """The online probe's score after each probed epoch, from the callback state of the
    diffusion run's ``last.ckpt`` (``last``, loaded; None before it exists) in ``folder``, and
    the epoch ``best_probe.ckpt`` holds."""
    state = (last or {}).get("callbacks") or {}
    history = next((s["history"] for k, s in state.items() if k.startswith("OnlineProbe")), None)
    if not history:
        return []
    lines = [
        "The online probe during diffusion pretraining (a quick logistic regression on a fixed "
        "labelled subset; its labels only monitor and choose a checkpoint, pretraining never "
        "reads them; the curve is `online_probe/val_macro_f1` in TensorBoard):",
        "",
        "| epoch | best key | val macro-F1 (subset) |",
        "|---|---|---|",
    ]
    for entry in history:
        layer, timestep = entry["key"]
        lines.append(f"| {entry['epoch']} | `{layer}` t={timestep} | {entry['score']:.3f} |")
    best = max(history, key=lambda entry: entry["score"])
    if (folder / BEST_PROBE_CHECKPOINT).exists():
        held = f"`{BEST_PROBE_CHECKPOINT}` holds epoch {best['epoch']}, `last.ckpt` the last."
        lines += ["", held]
    return [*lines, ""]
