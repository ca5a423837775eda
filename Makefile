# intervene developer tasks (GNU make). Works from a clean clone with only python3 installed.
#
#   make install   create .venv and install intervene[test] through constraints.txt
#   make model     fetch + convert the default model into the cache (no-op when cached)
#   make test      run the test suite          (PYTEST_ARGS="-k encode" to select)
#   make test-arch the full architecture matrix (about 40 tiny models; pytest -m arch_all)
#   make test-load the full server load test: 16 clients x 100 jobs (pytest -m load)
#   make test-compat  build .venv-tf4 (transformers 4.57, constraints-tf4.txt) and run
#                  COMPAT_TESTS there; TF4_TORCH=shared reuses .venv's torch instead of
#                  installing it a second time
#   make demo      run samples/basics.py and show its compiled plan; draw the logit lens
#                  (installs the plots extra; pictures in samples/out or $INTERVENE_PLOTS)
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
LINT_PATHS := $(wildcard compiler runtime tests samples bench intervene)

INSTALLED := $(VENV)/.installed-stamp
VENV_TF4 := .venv-tf4
PY_TF4 := $(VENV_TF4)/bin/python
CONSTRAINTS_TF4 := constraints-tf4.txt
TF4_INSTALLED := $(VENV_TF4)/.installed-stamp
TF4_TORCH ?=
COMPAT_TESTS ?= tests/test_hardening_inputs.py tests/test_architectures.py tests/test_invokes.py \
	tests/test_models.py tests/test_language_model.py
BENCH_INSTALLED := $(VENV)/.bench-installed-stamp

.DELETE_ON_ERROR:
.PHONY: install model test test-arch test-load test-compat demo bench lint clean distclean

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

test-arch: $(INSTALLED)
	$(PY) -m pytest -q -m arch_all tests/test_architectures.py $(PYTEST_ARGS)

test-load: $(INSTALLED)
	$(PY) -m pytest -q -s -m load tests/test_serve_load.py $(PYTEST_ARGS)

$(PY_TF4):
	$(PYTHON3) -m venv $(VENV_TF4)

# The torch pin is the same as .venv's. With TF4_TORCH=shared, .venv's site-packages come
# last on .venv-tf4's path (a .pth file): torch is found there, and every package pinned in
# constraints-tf4.txt is installed in .venv-tf4 itself, so it comes first.
$(TF4_INSTALLED): pyproject.toml $(CONSTRAINTS_TF4) | $(PY_TF4)
	$(PY_TF4) -m pip install -c $(CONSTRAINTS_TF4) --upgrade pip
ifeq ($(TF4_TORCH),shared)
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(PY_TF4) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/intervene-shared-torch.pth"
else
	$(PY_TF4) -m pip install -c $(CONSTRAINTS_TF4) $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
endif
	$(PY_TF4) -m pip install -c $(CONSTRAINTS_TF4) -e '.[test]'
	touch $@

test-compat: $(TF4_INSTALLED)
	$(PY_TF4) -m runtime.models fetch
	$(PY_TF4) -m pytest -q $(COMPAT_TESTS) $(PYTEST_ARGS)

demo: $(INSTALLED) model
	$(PY) -c 'import matplotlib' 2>/dev/null || $(PIP) install -c $(CONSTRAINTS) -e '.[test,plots]'
	$(PY) samples/basics.py
	$(PY) -m compiler show-plan samples/basics.py
	$(PY) samples/logit_lens.py
	@echo "pictures: $${INTERVENE_PLOTS:-samples/out}/ (samples/patching.py, attribution.py and steering.py draw theirs there too)"

bench: $(BENCH_INSTALLED) model
	$(PY) -m bench

lint: $(INSTALLED)
	$(PY) -m ruff check $(LINT_PATHS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(VENV_TF4)
