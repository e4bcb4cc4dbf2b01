# Two entry points (see README): `make run` builds the default Snakemake target,
# `make test` runs the test suite. Both create the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
CORES ?= 2
# The PyTorch installed first, before anything that depends on it. `torch==2.13.0` from the
# default package index: on this project's development machines that index serves the CPU build;
# on a common Linux machine PyPI serves the CUDA build (several GB). For the CPU build anywhere:
#   make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup run test emu clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so no later dependency picks another build (see TORCH above)
	$(PY) -m pip install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	touch $@

# The test suite's references besides: the real llama.cpp (built from source once, about 10 min
# on 2 cores, then cached by pip) and HF transformers.
$(VENV)/.installed-test: $(VENV)/.installed
	CMAKE_BUILD_PARALLEL_LEVEL=$(CORES) DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev,llamacpp,reference]'
	touch $@

run: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --cores $(CORES) --workflow-profile workflows/profiles/local

test: $(VENV)/.installed-test
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest tests

# The emulated-cluster validation (workflows/rules/emu.smk): network namespaces linked at 200 mbit,
# so it needs root, `ip` and `tc`; about an hour on 2 cores. Not part of `run` or CI.
emu: setup
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --cores $(CORES) --workflow-profile workflows/profiles/local emu_validation

clean:
	rm -rf results resources .snakemake
