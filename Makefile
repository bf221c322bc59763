# One command to build, one to test, one to lint. CI (.ci/run) and the README call these.
# Everything runs in a project virtual environment (.venv), so a distribution's own python3
# (PEP 668, "externally-managed-environment") is never written to. The venv sees the base
# interpreter's packages (--system-site-packages): a torch installed once there is reused,
# and pip adds only what is missing.
BASE_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip install -q --upgrade-strategy only-if-needed
DIR ?= .
DB ?= fastindex.db
COCO ?=
ARGS ?=
PORT ?= 8000

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PYTHON):
	@$(BASE_PYTHON) -c 'import ensurepip, venv' 2>/dev/null || $(MAKE) --no-print-directory apt PKGS=python3-venv
	$(BASE_PYTHON) -m venv --system-site-packages $(VENV)

.PHONY: venv
venv: $(PYTHON) ## create the project virtual environment (.venv)

.PHONY: install-run
install-run: $(PYTHON) ## what indexing needs (embeddings, server), and the extension, into .venv
	$(PIP) -e '.[embed,server]'

.PHONY: install
install: $(PYTHON) system-deps ## what the tests and the lint need too, into .venv
	$(PIP) -e '.[dev]'

.PHONY: system-deps
system-deps: ## Debian's chromium for the browser tests (never a downloaded browser)
	@command -v chromium >/dev/null 2>&1 || $(MAKE) --no-print-directory apt PKGS=chromium

.PHONY: apt
apt: # install Debian packages $(PKGS) when root, else say what is missing
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(PKGS); \
	else \
		echo "missing Debian packages: $(PKGS) (apt-get install $(PKGS))"; \
	fi

.PHONY: build
build: ## rebuild the Rust extension in release mode into the current Python
	$(PYTHON) -m pip install -q --no-deps -e .

.PHONY: index
index: install-run ## index DIR (COCO=, DB=, ARGS=) with progress bars and the web page
	$(VENV)/bin/fastindex index $(DIR) --db $(DB) $(if $(COCO),--coco $(COCO)) --serve --port $(PORT) $(ARGS)

.PHONY: test
test: install test-only ## set up, then run every test

.PHONY: test-only
test-only: ## run the Rust and Python tests without installing
	cargo test --quiet
	$(PYTHON) -m pytest -q

.PHONY: lint
lint: ## ruff, mypy, cargo fmt --check, clippy
	$(PYTHON) -m ruff check python tests benches
	$(PYTHON) -m ruff format --check python tests benches
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest fastindex._core
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

.PHONY: bench
bench: ## every CPU benchmark (each prints a table; data is generated under bench-data/)
	$(PYTHON) benches/bench_scan.py
	FASTINDEX_BENCH_DIR=$${FASTINDEX_BENCH_DATA:-bench-data}/mixed_100000 PYTHON=$(PYTHON) cargo bench
	$(PYTHON) benches/bench_search.py
	$(PYTHON) benches/bench_embed_cpu.py
	$(PYTHON) benches/bench_server.py

.PHONY: bench-gpu
bench-gpu: ## phase 3 on a CUDA machine: model ceiling, naive loop, fastindex end to end
	$(PYTHON) benches/bench_embed_gpu.py
