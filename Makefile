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
# Every build of the extension (pip's editable ones and the wheel's) names the base interpreter,
# not the venv's: pyo3 is configured the same each time, so `make wheel` after `make install`
# reuses its release build (seconds, not minutes).
export MATURIN_PEP517_USE_BASE_PYTHON := 1
BUILD_PYTHON = $(shell $(PYTHON) -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
# The wheel smoke suite's wheel and venvs (all under .whl/, which git ignores).
WHEELS := .whl/dist
SMOKE_FULL := .whl/venv-full
SMOKE_BARE := .whl/venv-bare

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

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
test: install test-only wheel-smoke ## set up, then run every test (the wheel's smoke suite last)

.PHONY: test-only
test-only: ## run the Rust and Python tests without installing
	cargo test --quiet
	$(PYTHON) -m pytest -q

.PHONY: wheel
wheel: $(PYTHON) ## build the abi3 wheel with maturin into .whl/dist
	@# The venv's own maturin (one in the base interpreter has no script in .venv/bin).
	@test -x $(VENV)/bin/maturin || $(PYTHON) -m pip install -q --ignore-installed 'maturin>=1.7,<2'
	rm -rf $(WHEELS)
	$(VENV)/bin/maturin build --release --interpreter $(BUILD_PYTHON) --out $(WHEELS)

# The wheel on its own, in two fresh venvs (tests_wheel/conftest.py says what each checks):
# - venv-full: the wheel with [embed,server]. It sees the base interpreter's packages and, by a
#   .pth line, those of .venv: torch and fastapi are found where `make install` put them, never
#   downloaded twice. (A path in a .pth is not a site dir: .venv's editable fastindex.pth is not
#   read, so the venv's fastindex is the wheel's.)
# - venv-bare: the wheel with no extras and no system site-packages: torch, open_clip, fastapi
#   and uvicorn are truly absent (numpy, pillow and rich come from PyPI).
.PHONY: wheel-smoke
wheel-smoke: wheel ## install the wheel into fresh venvs (all extras; none) and run tests_wheel/
	rm -rf $(SMOKE_FULL) $(SMOKE_BARE)
	$(BASE_PYTHON) -m venv --system-site-packages $(SMOKE_FULL)
	$(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
		> "$$($(SMOKE_FULL)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_project_venv.pth"
	$(SMOKE_FULL)/bin/python -m pip install -q "$$(echo $(WHEELS)/*.whl)[embed,server]"
	$(BASE_PYTHON) -m venv $(SMOKE_BARE)
	$(SMOKE_BARE)/bin/python -m pip install -q $(WHEELS)/*.whl
	FASTINDEX_WHEEL_FULL=$(SMOKE_FULL) FASTINDEX_WHEEL_BARE=$(SMOKE_BARE) \
		$(PYTHON) -m pytest -q tests_wheel

.PHONY: lint
lint: ## ruff, mypy, cargo fmt --check, clippy
	$(PYTHON) -m ruff check python tests tests_wheel benches
	$(PYTHON) -m ruff format --check python tests tests_wheel benches
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
	$(PYTHON) benches/bench_default_path.py
	$(PYTHON) benches/bench_ray.py
	$(PYTHON) benches/bench_s3.py

.PHONY: bench-scale
bench-scale: ## 10M images on one machine: phase 1, re-index, watch, paging, search (hours, ~20 GB RAM)
	$(PYTHON) benches/bench_scale.py

.PHONY: bench-gpu
bench-gpu: ## phase 3 on a CUDA machine: model ceiling, naive loop, fastindex end to end
	$(PYTHON) benches/bench_embed_gpu.py
