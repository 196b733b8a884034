"""``precision: auto``: the resolution on every kind of machine (detection mocked), the log line,
and that an explicit precision wins."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_modules.common import trainer as suite_trainer
from lightning_modules.common.trainer import PlanktonTrainer, resolve_precision


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(False, False, "32-true"), (True, False, "bf16-mixed"), (False, True, "bf16-mixed")],
)
def test_cpu_precision_follows_native_bf16(monkeypatch, cpu_only, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    for accelerator in ("auto", "cpu"):
        precision, reason = resolve_precision(accelerator)
        assert precision == expected
        if expected == "32-true":
            assert "neither AVX512-BF16 nor AMX" in reason
        else:  # the reason names what this CPU has
            assert ("AVX512-BF16" in reason) == avx512_bf16 and ("AMX" in reason) == amx


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16-mixed"), (False, "16-mixed")])
def test_cuda_precision_follows_the_card(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    # The CPU's abilities do not matter once the run is on the GPU.
    monkeypatch.setattr(suite_trainer, "_cpu_bf16_units", lambda: [] if bf16 else ["AMX"])
    for accelerator in ("auto", "gpu", "cuda"):
        precision, reason = resolve_precision(accelerator)
        assert precision == expected
        assert "Some GPU" in reason


def test_auto_is_resolved_once_and_logged(monkeypatch, cpu_only, caplog):
    monkeypatch.setattr(suite_trainer, "_cpu_bf16_units", lambda: [])
    with caplog.at_level(logging.INFO):
        trainer = PlanktonTrainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    assert trainer.precision == "32-true"
    lines = [r.getMessage() for r in caplog.records if "precision: auto" in r.getMessage()]
    assert len(lines) == 1 and "32-true" in lines[0]

    monkeypatch.setattr(suite_trainer, "_cpu_bf16_units", lambda: ["AMX"])
    assert PlanktonTrainer(logger=False, accelerator="cpu").precision == "bf16-mixed"


def test_explicit_precision_wins(monkeypatch, cpu_only, caplog):
    monkeypatch.setattr(suite_trainer, "_cpu_bf16_units", lambda: ["AMX"])
    with caplog.at_level(logging.INFO):
        trainer = PlanktonTrainer(precision="32-true", logger=False, accelerator="cpu")
    assert trainer.precision == "32-true"
    assert any("precision: 32-true (as set)" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(suite_trainer, "_cpu_bf16_units", lambda: [])
    trainer = PlanktonTrainer(precision="bf16-mixed", logger=False, accelerator="cpu")
    assert trainer.precision == "bf16-mixed"
