# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-coarse test lint format venv clean gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt miner/accel/_survivors.c miner/core/search/_windows.c miner/core/search/_lists.c miner/core/strategies/_select.c miner/core/_cbuffers.h
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,minilm,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cir-mine demo --out demo-out --overwrite

# the synth default, where in-batch negatives already hold the near misses (docs/benchmarks.md)
demo-coarse: $(STAMP)
	$(BIN)/cir-mine demo --world coarse --out demo-coarse --overwrite

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
# The wheels bench/gpu.sh installs on a bare GPU machine (Python 3.12, torch 2.11 built for CUDA 13,
# numpy, pyarrow, typer, matplotlib, pillow; no FAISS, no network): it installs only those whose module
# does not import there. `make gpu-wheels` fills .whl/ (about 55 MB); carry .whl/ with the run.
# GPU_TORCHVISION must be the torchvision release of the machine's torch (0.26 for torch 2.11).
GPU_TORCHVISION ?= 0.26.0
GPU_WHEELS ?= faiss-cpu==1.15.1 duckdb==2.0.1 open_clip_torch==3.3.0 torchvision==$(GPU_TORCHVISION) \
	ftfy==6.3.1 wcwidth==0.9.5 regex==2026.12.2 tqdm==4.70.1

gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)
	du -sh .whl

clean:
	rm -rf $(VENV) demo-out demo-coarse .pytest_cache .ruff_cache
