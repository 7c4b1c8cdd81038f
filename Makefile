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

.PHONY: install test lint edit engine bench serve clean

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
