# intervene developer tasks (GNU make). Works from a clean clone with only python3 installed.
#
#   make install   create .venv and install intervene[test] through constraints.txt
#   make model     fetch + convert the default model into the cache (no-op when cached)
#   make test      run the test suite          (PYTEST_ARGS="-k encode" to select)
#   make demo      run samples/basics.py and show its compiled plan
#   make bench     install the bench extra and run the benchmarks
#   make lint      ruff check
#   make clean     remove build/test caches;  make distclean also removes .venv
#
# On a machine without a local CPU torch wheel, `pip install torch==X` from PyPI pulls CUDA
# wheels; to get the CPU build instead:
#   make install TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"

PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt
# The torch pin lives in constraints.txt only; install it on its own first so that nothing
# else gets a chance to choose a torch build.
TORCH_SPEC := $(shell grep -E '^torch==' $(CONSTRAINTS))
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
LINT_PATHS := $(wildcard compiler runtime tests samples bench)

INSTALLED := $(VENV)/.installed-stamp
BENCH_INSTALLED := $(VENV)/.bench-installed-stamp

.DELETE_ON_ERROR:
.PHONY: install model test demo bench lint clean distclean

install: $(INSTALLED)

$(PY):
	$(PYTHON3) -m venv $(VENV)

$(INSTALLED): pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) --upgrade pip
	$(PIP) install -c $(CONSTRAINTS) $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(PIP) install -c $(CONSTRAINTS) -e '.[test]'
	touch $@

$(BENCH_INSTALLED): $(INSTALLED)
	$(PIP) install -c $(CONSTRAINTS) -e '.[test,bench]'
	touch $@

model: $(INSTALLED)
	$(PY) -m runtime.models fetch

test: $(INSTALLED) model
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(INSTALLED) model
	$(PY) samples/basics.py
	$(PY) -m compiler show-plan samples/basics.py

bench: $(BENCH_INSTALLED) model
	$(PY) -m bench

lint: $(INSTALLED)
	$(PY) -m ruff check $(LINT_PATHS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
