"""``benchmarks/gpu_check.py`` without a GPU: it refuses in one line with exit status 2; a step
that fails is a row saying why, one that succeeds gives its figures; the GPU timeouts add up to
under 8 minutes."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from conftest import REPOSITORY


@pytest.fixture
def gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY / "benchmarks"))
    return importlib.import_module("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available: nothing to refuse")
def test_refuses_without_cuda(gpu_check, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: gpu-check needs a CUDA GPU")
    assert "--dry-run" in lines[0]


def test_a_failed_step_says_why_in_one_line(gpu_check, tmp_path, capsys):
    python = sys.executable
    ok = gpu_check.Step("ok", [python, "-c", "print('noise'); print('a=1 b=x')"], 30)
    failed = gpu_check.Step("bad", [python, "-c", "raise SystemExit('boom')"], 30)
    outcomes = [gpu_check.run_step(step, tmp_path, 60, dict(os.environ)) for step in (ok, failed)]
    assert outcomes[0].failure is None and outcomes[0].figures == {"a": "1", "b": "x"}
    assert outcomes[1].failure == "exit status 1: boom"
    late = gpu_check.run_step(ok, tmp_path, 1, dict(os.environ))  # too little time left to start it
    assert late.failure.startswith("not started")
    capsys.readouterr()
    gpu_check.print_table([*outcomes, late])
    table = capsys.readouterr().out
    assert "| bad " in table and "FAILED" in table and "boom" in table


def test_the_gpu_timeouts_fit_in_8_minutes(gpu_check):
    assert set(gpu_check.GPU_TIMEOUTS) == set(gpu_check.DRY_RUN_TIMEOUTS)
    assert sum(gpu_check.GPU_TIMEOUTS.values()) <= gpu_check.BUDGET_S < 8 * 60
