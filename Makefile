# One command each on a fresh machine: `make test`, `make demo`.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Data and caches of the demo and tests stay inside the project unless PLANKTON_CACHE is set.
export PLANKTON_CACHE ?= $(CURDIR)/.cache/plankton

.PHONY: install test demo lint bench tensorboard clean

install: $(STAMP)

# Reinstall whenever the project's dependencies change.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q

# The synthetic default: inspect it, train and test the supervised baseline, pretrain the
# diffusion U-Net and draw samples from it (the full protocol comes with `plankton experiment`).
LATEST = $$(ls -td runs/demo/$(1)/version_*/ | head -1)checkpoints/last.ckpt
demo: $(STAMP)
	$(VENV)/bin/plankton data inspect --config configs/data/synthetic.yaml
	$(VENV)/bin/plankton fit --config configs/supervised.yaml --trainer.default_root_dir runs/demo
	$(VENV)/bin/plankton test --config configs/supervised.yaml --trainer.default_root_dir runs/demo \
		--ckpt_path "$(call LATEST,supervised)"
	$(VENV)/bin/plankton fit --config configs/diffusion.yaml --trainer.default_root_dir runs/demo
	$(VENV)/bin/plankton diffusion sample --checkpoint "$(call LATEST,diffusion)" --n 36 \
		--out runs/demo/diffusion_samples.png

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PYTHON) benchmarks/data_loading.py
	$(PYTHON) benchmarks/synthetic_difficulty.py
	$(PYTHON) benchmarks/probe_sweep.py
	$(PYTHON) benchmarks/training_throughput.py

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs

clean:
	rm -rf runs .cache .pytest_cache
