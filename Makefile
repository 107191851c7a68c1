# qdplex — two commands:
#   make demo   set up (.venv) and run the pipeline on the bundled sample slide
#   make test   set up (.venv + Debian packages for Xvfb/Qt/Chromium) and run the whole test suite + docs build
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qdplex-installed
DEMO_OUT ?= out/demo

# Debian packages: Xvfb + the libraries Qt needs (napari tests), Chromium (QC report test)
DEB_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 \
	libxcb-render-util0 libxcb-xinerama0 libxcb-xkb1 libxkbcommon-x11-0 libxcb-shape0 \
	libxcb-cursor0 libdbus-1-3 libgl1 libegl1 libfontconfig1 chromium

.PHONY: setup sysdeps demo test test-train bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $(STAMP)

setup: $(STAMP)

sysdeps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ]; then echo "warning: missing Debian packages:$$missing (napari/report tests will skip)"; \
	  else $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi; \
	fi

demo: setup
	$(BIN)/qdplex run sample_data/slides --panel sample_data/panel.toml --out $(DEMO_OUT)
	@echo "outputs in $(DEMO_OUT)/ (manifest.csv, cohort_summary.csv, one folder per slide)"

test: setup sysdeps
	@if command -v xvfb-run >/dev/null; then \
	  xvfb-run -a -s "-screen 0 1600x1200x24" $(BIN)/python -m pytest; \
	else $(BIN)/python -m pytest; fi
	$(BIN)/mkdocs build --strict --quiet -d $$(mktemp -d)

# the training smoke test, in a separate venv with the 'train' extra (PyTorch; ~1 GB)
TRAIN_VENV ?= .venv-train
$(TRAIN_VENV)/.qdplex-train: pyproject.toml
	test -x $(TRAIN_VENV)/bin/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TRAIN_VENV)/bin/python -m pip install -q -e ".[train]" pytest pytest-timeout
	touch $@

test-train: $(TRAIN_VENV)/.qdplex-train
	$(TRAIN_VENV)/bin/python -m pytest -q tests/test_segment_train.py

docs: setup
	$(BIN)/python scripts/gen_cli_docs.py
	$(BIN)/mkdocs build --strict

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out site .pytest_cache
