# Kontext engine. `make bench` is the one command a newcomer runs; CI (.ci/run) runs `make test`, `make lint`
# and `make rehearse`.
#
# torch is installed first, pinned, so nothing later pulls a second build:
#   - PyPI's torch==2.13.0 for Linux x86_64 is the CUDA build (what a GPU machine wants);
#   - machines whose pip is configured with a local CPU build get that one;
#   - elsewhere, a CPU-only user saves ~3 GB with TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev,quant,fp8,kernels,serve,ray,provenance,lora
MODEL ?= tiny
STAMP := $(VENV)/.installed-$(shell echo "$(TORCH) $(TORCH_INDEX) $(EXTRAS)" | cksum | cut -d' ' -f1)

.PHONY: install test test-fast lint edit engine bench serve clean gpu-wheels rehearse rehearse-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	$(BIN)/python -m pytest -q

# The inner loop: every test not marked slow (docs/testing.md gives its time on two cores).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check engine benchmarks tests
	$(BIN)/ruff format --check engine benchmarks tests
	$(BIN)/mypy engine benchmarks

edit: install
	$(BIN)/kontext edit --model $(MODEL) -o build/edit.png

engine: install
	$(BIN)/kontext build --model $(MODEL)

bench: engine
	$(BIN)/kontext bench --model $(MODEL)

# BFL's API on 127.0.0.1:8000 without keys (loopback only); add KEYS=keys.jsonl for API keys.
serve: install
	$(BIN)/kontext serve --model $(MODEL) $(if $(KEYS),--keys $(KEYS),--no-auth)

clean:
	rm -rf build

# What the GPU machine's image lacks (it has torch, triton, transformers, safetensors, huggingface-hub,
# numpy, pillow, onnx, onnxruntime): diffusers and torchao, pinned to versions that ran there with its
# torch 2.11, and what diffusers 0.42.1 imports that the image lacks (requests and its four requirements:
# `make rehearse` proves the list). The pure ones come as py3-none-any wheels, which install on any
# Python 3. benchmarks/gpu_bench.sh installs .whl/ on the device (pip --no-deps --target) and checks every
# import before anything slow; the device tool carries at most 64 MiB, so the total is checked.
GPU_WHEELS ?= diffusers==0.42.1 torchao==0.17.0
GPU_PURE_WHEELS ?= requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3
GPU_PYTHON ?= 3.12
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation py \
		--abi none --platform any -d .whl $(GPU_PURE_WHEELS)
	@bytes=$$(cat .whl/*.whl | wc -c); echo "gpu-wheels: $$(ls .whl | wc -l) wheels, $$((bytes / 1048576)) MiB in .whl/"; \
	test $$bytes -lt 67108864 || { echo "gpu-wheels: over the 64 MiB the device carries" >&2; exit 1; }

# The GPU run rehearsed on a CPU (CI runs it after `make test`): a venv built like the GPU image, holding
# only what the image holds (torch 2.11 and triton 3.6 from PyPI: the CUDA build, imported on a CPU, as
# no CPU build of 2.11 is on the index; transformers, huggingface-hub, safetensors, numpy, pillow, onnx,
# onnxruntime), plus exactly the .whl/ of `make gpu-wheels`, installed by gpu_bench.sh as on the device.
# Python: the image's is 3.12; REHEARSE_PYTHON is the first 3.12 found (on PATH or pyenv's), else python3.
# Everything it writes (venv, caches, temp files, results) stays in build/rehearse/.
REHEARSE := build/rehearse
REHEARSE_PYTHON ?= $(firstword $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12); do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo $$p; done) python3)
IMAGE_PACKAGES ?= torch==2.11.0 triton==3.6.0 transformers~=5.0 huggingface-hub safetensors numpy pillow onnx onnxruntime
REHEARSE_STAMP := $(REHEARSE)/venv/.image-$(shell echo "$(IMAGE_PACKAGES)" | cksum | cut -d' ' -f1)

$(REHEARSE_STAMP):
	rm -rf $(REHEARSE)/venv
	$(REHEARSE_PYTHON) -m venv $(REHEARSE)/venv
	$(REHEARSE)/venv/bin/python -m pip install -q --no-cache-dir $(IMAGE_PACKAGES)
	@touch $@

# The dry run exits 1 on an error row, a failed, killed or skipped phase, or a module that exists but does not
# import (benchmarks/results_check.py); then the report is made as on a CPU from a GPU run's returned files.
# Its cold phase compiles the tiny model on the CPU (minutes on two busy cores), made cheaper for a rehearsal:
# inductor compiles in-process (TORCHINDUCTOR_COMPILE_THREADS=1: no pool of workers each importing torch)
# and its C++ at -O0 (TORCHINDUCTOR_DEBUG_COMPILE=1 instead of -O3: the same graphs, cached and loaded alike).
# The image's venv alone (downloads, little CPU): .ci/run builds it while the tests run.
rehearse-venv: $(REHEARSE_STAMP)

rehearse: $(REHEARSE_STAMP)
	$(MAKE) gpu-wheels GPU_PYTHON=$$($(REHEARSE)/venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	rm -rf $(REHEARSE)/results $(REHEARSE)/tmp $(REHEARSE)/compile-cache $(REHEARSE)/site && mkdir -p $(REHEARSE)/tmp
	PYTHON=$(REHEARSE)/venv/bin/python TMPDIR=$(CURDIR)/$(REHEARSE)/tmp \
		TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/$(REHEARSE)/inductor TRITON_CACHE_DIR=$(CURDIR)/$(REHEARSE)/triton \
		COMPILE_CACHE=$(REHEARSE)/compile-cache HF_HOME=$(CURDIR)/$(REHEARSE)/hf \
		TORCHINDUCTOR_COMPILE_THREADS=1 TORCHINDUCTOR_DEBUG_COMPILE=1 \
		bash benchmarks/gpu_bench.sh --dry-run --results-root $(REHEARSE)/results
	$(REHEARSE)/venv/bin/python -m pip install -q --no-index --no-deps --target $(REHEARSE)/site .whl/*.whl
	PYTHONPATH=$(CURDIR)/$(REHEARSE)/site:$(CURDIR) $(REHEARSE)/venv/bin/python -m benchmarks.gpu_report \
		$$(ls -d $(REHEARSE)/results/*/*) --all | tail -n 20
