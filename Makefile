# Two commands on a fresh machine: `make demo` and `make test` (`make lint` checks the rules).
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

# ruff; mypy (strict on gossip and overlay, see pyproject.toml; its defaults on edgeagent);
# the rules a machine checks:
# the import contract and the function-length limit (tests/test_rules.py, also in `make test`).
lint: $(BIN)/edgeagent
	$(BIN)/ruff check .
	$(BIN)/mypy gossip overlay edgeagent
	$(BIN)/python -m pytest -q tests/test_rules.py

clean:
	rm -rf $(VENV) build *.egg-info
