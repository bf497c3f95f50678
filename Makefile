# The two quick-start commands: `make demo` (the whole pipeline at toy scale) and `make test`.
# Each sets up .venv on first use (and again whenever pyproject.toml changes).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# libtpu for the proof-of-fit check (qedjax/fit.py; tests/test_fit.py): the TPU compiler, run on this
# machine without a TPU. It goes beside the venv, not into site-packages, so that CPU runs and tests
# never load it (a libtpu that JAX can import makes every process probe for a TPU and print warnings).
# The version is the one jax[tpu] 0.10.x requires (libtpu==0.0.42.*); ~700 MB.
LIBTPU := libtpu==0.0.42.1
LIBTPU_STAMP := $(VENV)/libtpu/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

$(LIBTPU_STAMP): $(STAMP)
	$(VENV)/bin/pip install -q --no-deps --upgrade --target $(VENV)/libtpu '$(LIBTPU)'
	touch $(LIBTPU_STAMP)

.PHONY: demo test venv fit-tools
venv: $(STAMP)
fit-tools: $(LIBTPU_STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m qedjax.launch --config configs/tiny.yaml

test: $(STAMP) $(LIBTPU_STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --durations=15
