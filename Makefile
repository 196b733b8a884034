# One command each on a fresh machine: `make test`, `make demo`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Data and caches of the demo and tests stay inside the project unless PLANKTON_CACHE is set.
export PLANKTON_CACHE ?= $(CURDIR)/.cache/plankton

.PHONY: install test demo lint bench bench-quick gpu-check tensorboard clean

install: $(STAMP)

# Reinstall whenever the project's dependencies change.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Two pytest workers of one thread each: most tests are Python-bound and single-threaded, so two
# workers use both cores where one worker with two threads used one (TEST_WORKERS=0: in-process).
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The whole protocol on the synthetic default (about 11 minutes on 2 CPU cores with native
# bfloat16; README): data, diffusion and baselines pretraining, every probe, clustering and
# runs/demo/report.md. Re-running resumes.
demo: $(STAMP)
	$(VENV)/bin/plankton experiment --config configs/experiments/demo.yaml --out runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PYTHON) benchmarks/data_loading.py
	$(PYTHON) benchmarks/synthetic_difficulty.py
	$(PYTHON) benchmarks/probe_sweep.py  # --pairs 48 measures every pair (about 2 hours)
	$(PYTHON) benchmarks/training_throughput.py
	$(PYTHON) benchmarks/diffusion_throughput.py
	$(PYTHON) benchmarks/online_probe.py
	$(PYTHON) benchmarks/scale.py

# Every benchmark's --quick mode, and the demo's cost at a tenth of its size (under 5 minutes on
# 2 CPU cores): run it after a change that might cost time.
bench-quick: $(STAMP)
	$(PYTHON) benchmarks/data_loading.py --quick
	$(PYTHON) benchmarks/synthetic_difficulty.py --quick
	$(PYTHON) benchmarks/probe_sweep.py --quick
	$(PYTHON) benchmarks/training_throughput.py --quick
	$(PYTHON) benchmarks/diffusion_throughput.py --quick
	$(PYTHON) benchmarks/online_probe.py --quick
	$(PYTHON) benchmarks/scale.py --quick
	$(PYTHON) benchmarks/demo_cost.py --quick

# On one CUDA GPU (under 8 minutes): every method's throughput and MFU, the diffusers comparison,
# the device-resident data path and a short experiment, as one table. Refuses without CUDA;
# `$(PYTHON) benchmarks/gpu_check.py --dry-run` walks the same steps on the CPU at toy sizes.
gpu-check: $(STAMP)
	$(PYTHON) benchmarks/gpu_check.py

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

clean:
	rm -rf runs .cache .pytest_cache
