# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/edgeagent: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/edgeagent
	$(BIN)/edgeagent demo

test: $(BIN)/edgeagent
	$(BIN)/python -m pytest -q

lint: $(BIN)/edgeagent
	$(BIN)/ruff check .
	$(BIN)/mypy gossip

clean:
	rm -rf $(VENV) build *.egg-info
