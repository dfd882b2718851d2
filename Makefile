# The two commands of the README:
#   make run    builds .venv, installs bnjax, runs the end-to-end study (experiments/adapt_pair.py)
#   make test   builds or reuses .venv, installs bnjax[test], runs the test suite
#               (the default tier; make test-slow: several devices and processes,
#               kill and resume; make test-e2e: the scripts end to end), the test
#               files spread over TEST_WORKERS processes (default 2). Compiled
#               programs are cached in .cache/xla-tests (BNJAX_TEST_CACHE=off: none)
#   make docs   installs bnjax[docs] into .venv and builds the documentation (docs/_build/html),
#               executing the notebooks, warnings as errors
# Every install uses the exact versions of constraints.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= runs/adapt_pair

PYTEST_FLAGS ?=
# Test files spread over this many processes (pytest-xdist; 0: one process).
TEST_WORKERS ?= 2
# (--no-loadscope-reorder: the files in tests/conftest.py's order, longest first)
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: run test test-slow test-e2e test-slow-e2e docs gpu-wheels bench clean

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=/path/to/python3.11 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $@

run: $(VENV)/.installed
	$(PY) experiments/adapt_pair.py --config=experiments/configs/adapt_pair.py --workdir=$(OUT)

test: $(VENV)/.installed
	$(PYTEST) $(PYTEST_FLAGS)

test-slow: $(VENV)/.installed
	$(PYTEST) -m slow $(PYTEST_FLAGS)

test-e2e: $(VENV)/.installed
	$(PYTEST) -m e2e $(PYTEST_FLAGS)

# The slow and e2e tiers in one run: one pool of workers for both (CI).
test-slow-e2e: $(VENV)/.installed
	$(PYTEST) -m "slow or e2e" $(PYTEST_FLAGS)

docs: $(VENV)/.docs
	rm -rf docs/_build
	$(PY) -m sphinx -W --keep-going -n -b html docs docs/_build/html
	$(PY) docs/_check_built.py docs/_build

# Pure-Python wheels the accelerator machine lacks (it has no package registry),
# carried with the working tree by the device tool; benchmarks/gpu.sh installs
# only those the machine cannot import.
gpu-wheels: $(VENV)/bin/python
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -c constraints.txt \
	  -d benchmarks/wheels ott-jax jaxopt lineax equinox jaxtyping wadler-lindig ml-collections

clean:
	rm -rf $(VENV) runs .cache
