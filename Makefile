# The two quick-start commands: `make demo` (the whole pipeline at toy scale) and `make test`.
# Each sets up .venv on first use (and again whenever pyproject.toml changes).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: demo test venv
venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m qedjax.launch --config configs/tiny.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --durations=15
