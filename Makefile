# Kontext engine. `make bench` is the one command a newcomer runs; `make test` is what CI runs.
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

.PHONY: install test lint edit engine bench serve clean gpu-wheels

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
# numpy, pillow...): exactly these two, pinned to versions that ran there with its torch 2.11. Their other
# requirements are in the image (diffusers' importlib_metadata only on Python < 3.8). benchmarks/gpu_bench.sh
# installs .whl/ on the device; the device tool carries at most 64 MiB, so the total is checked.
GPU_WHEELS ?= diffusers==0.42.1 torchao==0.17.0
GPU_WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
	manylinux_2_17_x86_64 manylinux2014_x86_64,--platform $(p))

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d .whl $(GPU_WHEELS)
	@bytes=$$(cat .whl/*.whl | wc -c); echo "gpu-wheels: $$(ls .whl | wc -l) wheels, $$((bytes / 1048576)) MiB in .whl/"; \
	test $$bytes -lt 67108864 || { echo "gpu-wheels: over the 64 MiB the device carries" >&2; exit 1; }
