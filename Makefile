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

.PHONY: setup run test emu clean llamacpp-cuda gpu-wheels gpu-rehearsal
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
	PATH=$(abspath $(VENV))/bin:$$PATH snakemake --cores $(CORES) --workflow-profile workflows/profiles/local --forcerun plot_hiermoe_sim results/figures/hiermoe_report.md

clean:
	rm -rf results resources .snakemake

# ---- GPU evidence: workflows/scripts/GPU_RUN.md. Not part of `make test` or CI. --------------
# llama.cpp with CUDA for one GPU architecture (sm_90: H100 / H200), from the pinned
# llama-cpp-python's sources, into .gpu/llama-cuda (needs nvcc; about 200 compile steps, long on
# 2 cores, so niced).
CUDA_ARCH ?= 90
PIP ?= python3 -m pip
LLAMA_CPP_PYTHON := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
llamacpp-cuda:
	nice -n 19 bash workflows/scripts/build_llamacpp_cuda.sh --arch $(CUDA_ARCH) --jobs $(CORES)

# What the GPU machine's Python 3.12 lacks, as wheels in .whl/ (versions of this project's
# environment; pure Python except rpds-py), and llama-cpp-python's Python part alone (its
# libraries come from LLAMA_CPP_LIB_PATH).
GPU_WHEELS := gguf==0.19.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 \
	rpds-py==2026.9.1 diskcache==5.6.3 pytest-timeout==2.4.0 hypothesis==6.170.27 sortedcontainers==2.4.0
WHEEL_TARGET := --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PIP) download -q --no-deps --only-binary=:all: $(WHEEL_TARGET) -d .whl $(GPU_WHEELS)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PIP) wheel -q --no-deps --no-cache-dir \
		--no-binary llama-cpp-python -w .whl llama-cpp-python==$(LLAMA_CPP_PYTHON)

# The dry run under Python 3.12 with the GPU machine's packages only (torch 2.11 from PyPI: with
# no GPU here it runs on the CPU) plus the carried wheels, as the GPU machine will run it.
PY312 ?= $(HOME)/.pyenv/versions/3.12.1/bin/python
GPU_MACHINE_PACKAGES := torch==2.11.0 numpy scipy pandas seaborn matplotlib pytest pytest-benchmark \
	safetensors pyyaml tqdm psutil jinja2 typing-extensions requests attrs
gpu-rehearsal: gpu-wheels
	test -x .gpu/py312/bin/python || $(PY312) -m venv .gpu/py312
	.gpu/py312/bin/python -m pip install -q $(GPU_MACHINE_PACKAGES)
	PYTHON=$(abspath .gpu/py312/bin/python) bash workflows/scripts/gpu_check.sh --dry-run --out .gpu/rehearsal
