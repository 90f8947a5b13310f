# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-coarse test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
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
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo-out demo-coarse .pytest_cache .ruff_cache
