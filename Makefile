# One command to build, one to test, one to lint. CI (.ci/run) and the README call these.
PYTHON ?= python3
DIR ?= .
DB ?= fastindex.db
COCO ?=
ARGS ?=
PORT ?= 8000

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

.PHONY: install
install: system-deps ## install the Python dependencies (reuses what is installed) and build the extension
	$(PYTHON) -m pip install -q --upgrade-strategy only-if-needed -e '.[dev]'

.PHONY: system-deps
system-deps: ## Debian's chromium for the browser tests (never a downloaded browser)
	@command -v chromium >/dev/null 2>&1 || { \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
		else \
			echo "chromium missing: install Debian's chromium (the browser tests skip without it)"; \
		fi; }

.PHONY: build
build: ## rebuild the Rust extension in release mode into the current Python
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

.PHONY: index
index: install ## index DIR (COCO=, DB=, ARGS=) with progress bars and the web page
	fastindex index $(DIR) --db $(DB) $(if $(COCO),--coco $(COCO)) --serve --port $(PORT) $(ARGS)

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
	cargo bench --bench core -- bench-data/mixed_100000
	$(PYTHON) benches/bench_search.py
	$(PYTHON) benches/bench_embed_cpu.py
	$(PYTHON) benches/bench_server.py

.PHONY: bench-gpu
bench-gpu: ## phase 3 on a CUDA machine: model ceiling, naive loop, fastindex end to end
	$(PYTHON) benches/bench_embed_gpu.py
