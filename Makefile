# qdplex — two commands:
#   make demo   set up .venv with the core only (what `qdplex run` needs) and run the pipeline on the sample slide
#   make test   add the extras (napari, scverse readers, docs toolchain) + Debian packages for Xvfb/Qt/Chromium,
#               run the whole test suite (which builds the docs too) and every benchmark at a small size
#               (bench-quick: fails on an error, never on a timing); leaves the checkout as it found it
# and:
#   make screenshots   refresh docs/images/ (napari.png, qc-report.png)
#   make docs          regenerate docs/cli.md and build the site into site/
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORE   := $(VENV)/.qdplex-core
FULL   := $(VENV)/.qdplex-full
DEMO_OUT ?= out/demo
# quiet, no bytecode for modules never imported (Python compiles what it imports on first use;
# the core's setup imports what `qdplex run` uses once, so that its bytecode is there before the run)
PIP    := $(BIN)/python -m pip install -q --no-compile --disable-pip-version-check
WARM_IMPORTS := import qdplex, qdplex.slide, qdplex.outputs, qdplex.batch, qdplex.report, qdplex.figures, qdplex.tables, \
	qdplex.io, qdplex.score, qdplex.spectra, matplotlib.figure, matplotlib.backends.backend_agg, anndata, \
	fastparquet, distributed, tifffile, zarr

# Debian packages: Xvfb + the libraries Qt needs (napari tests), Chromium (QC report test)
DEB_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 \
	libxcb-cursor0 libdbus-1-3 libgl1 libegl1 libfontconfig1 chromium

.PHONY: setup setup-test warm sysdeps demo test test-train screenshots bench bench-quick docs clean

$(BIN)/python:
	@echo "setup: creating $(VENV) ($(PYTHON) -m venv) with a current pip (older resolvers give up on the test extras)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	@echo "setup: installing qdplex and its core dependencies into $(VENV)"
	@$(PIP) -e .
	@$(MAKE) --no-print-directory warm
	@touch $@

# bytecode of what `qdplex run` imports, written even where PYTHONDONTWRITEBYTECODE is set (as on
# our CI machines): without it every qdplex process compiles its modules from source (measured
# there: `import qdplex` 7.4 s without, 2.1 s with; the test suite starts ~40 qdplex processes)
warm:
	@echo "setup: compiling the modules qdplex run imports (once, not in every dask worker at the first run)"
	@env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -c "$(WARM_IMPORTS)"
	@echo "setup: compiling qdplex's kernels into numba's disk cache (once, not in every dask worker at the first run)"
	@$(BIN)/python -m qdplex._precompile

$(FULL): pyproject.toml | $(BIN)/python
	@echo "setup: installing qdplex[all,docs,test] into $(VENV) (napari, scverse readers, docs toolchain)"
	@$(PIP) -e ".[all,docs,test]"
	@$(MAKE) --no-print-directory warm
	@touch $@ $(CORE)

setup: $(CORE)

setup-test: $(FULL)

sysdeps:
	@sh scripts/sysdeps.sh $(DEB_PACKAGES)

demo: setup
	@echo "demo: $(BIN)/qdplex run sample_data/slides --panel sample_data/panel.toml --out $(DEMO_OUT)"
	@$(BIN)/qdplex run sample_data/slides --panel sample_data/panel.toml --out $(DEMO_OUT)

test: setup-test sysdeps
	@echo "test: pytest (the suite builds the docs into a temporary folder and removes it)"
	@if command -v xvfb-run >/dev/null; then \
	  xvfb-run -a -s "-screen 0 1600x1200x24" $(BIN)/python -m pytest; \
	else $(BIN)/python -m pytest; fi
	@echo "test: bench-quick (every benchmark at a small size; fails on an error, never on a timing)"
	@$(MAKE) --no-print-directory bench-quick

screenshots: setup-test sysdeps
	@echo "screenshots: docs/images/napari.png (napari under Xvfb)"
	@QDPLEX_SCREENSHOTS=docs/images xvfb-run -a -s "-screen 0 1600x1200x24" \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_napari.py -k plugin_end_to_end
	@echo "screenshots: docs/images/qc-report.png (headless Chromium on the demo's QC report)"
	@$(BIN)/qdplex run sample_data/slides --panel sample_data/panel.toml --out $(DEMO_OUT) --quiet --force
	@d=$$(mktemp -d) && chromium --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir=$$d \
	  --screenshot=docs/images/qc-report.png --window-size=1280,2000 \
	  "file://$(CURDIR)/$(DEMO_OUT)/sample/qc/report.html" 2>/dev/null; rc=$$?; rm -rf $$d; exit $$rc

# the training smoke test, in a separate venv with the 'train' extra (PyTorch; ~1 GB)
TRAIN_VENV ?= .venv-train
$(TRAIN_VENV)/.qdplex-train: pyproject.toml
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install -q -e ".[train]" pytest pytest-timeout
	touch $@

test-train: $(TRAIN_VENV)/.qdplex-train
	$(TRAIN_VENV)/bin/python -m pytest -q tests/test_segment_train.py

docs: setup-test
	@echo "docs: docs/cli.md from the parser, then the site into site/"
	@$(BIN)/python scripts/gen_cli_docs.py
	@$(BIN)/mkdocs build --strict --quiet

bench: setup-test
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# every benchmark at a small size (about 3 min): fails on an error, never on a timing
bench-quick: setup-test
	@$(BIN)/python benchmarks/quick.py

clean:
	rm -rf $(VENV) out site .pytest_cache
