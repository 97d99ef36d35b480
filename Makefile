# The README's two commands. Each makes .venv and installs the project into it when needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/gpuwarden demo

# mypy sees the three folders under their installed names through a link tree.
lint: $(STAMP)
	mkdir -p $(VENV)/src/gpuwarden
	for d in engine projections adapters; do ln -sfn "$(CURDIR)/$$d" $(VENV)/src/gpuwarden/$$d; done
	$(BIN)/ruff check engine projections adapters tests bench
	$(BIN)/ruff format --check engine projections adapters tests bench
	MYPYPATH=$(VENV)/src $(BIN)/mypy -p gpuwarden.engine -p gpuwarden.adapters -p gpuwarden.projections

test: lint
	$(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .gpuwarden .pytest_cache .mypy_cache .ruff_cache
