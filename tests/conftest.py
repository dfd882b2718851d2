"""The suite's shared set-up: the repository root on ``sys.path``, one
persistent XLA compilation cache for the whole session, and the tiers.

Tiers (markers, pyproject's ``addopts`` runs the first):

* default (``make test``): the library's unit and reference tests, and the
  experiment scripts' config checks;
* ``slow`` (``make test-slow``): several devices, several processes, a
  process killed and resumed;
* ``e2e`` (``make test-e2e``): an experiment or benchmark script run end to
  end at tiny sizes;
* ``wheel``: the compatibility subset that ``.ci/wheel`` runs against the
  installed wheel (also part of the default tier).

The compilation cache: every program the tests compile, in this process and
in the scripts and processes they start, is written to (and read from)
``.cache/xla-tests`` under the checkout (ignored by git), so that a second
``make test`` on the same machine starts warm. ``BNJAX_TEST_CACHE=<folder>``
puts it elsewhere, ``BNJAX_TEST_CACHE=off`` turns it off (every program is
compiled afresh: what a first run on a new machine pays).
"""

import collections
import os
import sys

import processes  # tests/, on the path as the conftest's folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# XLA's backend optimisation level for every program the tests compile (here
# and in every process they start, which inherit XLA_FLAGS): 0 by default,
# which compiles in about 3/4 of the time (the suite's programs run for
# milliseconds; compiling them is most of its time). The computation is the
# same; float32 results may round differently, which the tests' tolerances
# allow for, as they allow for another CPU's. BNJAX_TEST_XLA_OPT=default
# compiles as users do (XLA's default level), another value sets the level.
XLA_OPT_ENV = "BNJAX_TEST_XLA_OPT"
_level = os.environ.get(XLA_OPT_ENV, "0").strip()
if _level.lower() != "default":
  if not _level.isdigit():
    raise ValueError(f"{XLA_OPT_ENV} must be 'default' or a level >= 0, got {_level!r}")
  os.environ["XLA_FLAGS"] = processes.xla_flags("xla_backend_optimization_level", _level)

import pytest  # noqa: E402

from bnjax import compiler  # noqa: E402

CACHE_ENV = "BNJAX_TEST_CACHE"


def _cache_folder() -> str | None:
  value = os.environ.get(CACHE_ENV, "").strip()
  if value.lower() in ("off", "0", "none"):
    return None
  return value or os.path.join(ROOT, ".cache", "xla-tests")


# Before any test compiles anything: JAX reads the cache setting at its first
# compilation. The experiment scripts that tests start read
# BNJAX_COMPILATION_CACHE (bnjax.compiler.enable_persistent_cache); any other
# Python process they start (python -c, the launcher's processes) reads JAX's
# own variables: all share the folder.
CACHE = compiler.enable_persistent_cache(_cache_folder() or "off")
os.environ[compiler.CACHE_ENV] = CACHE or "off"
if CACHE:
  os.environ.update(JAX_COMPILATION_CACHE_DIR=CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="session")
def root():
  return ROOT


@pytest.fixture
def saved(monkeypatch):
  """The matplotlib figures saved during a test, by file name (each captured
  as it is saved, so a test can read its titles, labels and drawn data)."""
  figure = pytest.importorskip("matplotlib.figure")
  figures = {}
  real = figure.Figure.savefig

  def capture(fig, path, *args, **kwargs):
    figures[str(path).rsplit("/", 1)[-1]] = fig
    return real(fig, path, *args, **kwargs)

  monkeypatch.setattr(figure.Figure, "savefig", capture)
  return figures


@pytest.hookimpl(trylast=True)  # after -m has deselected: the counts are of what runs
def pytest_collection_modifyitems(config, items):
  """The files that run for minutes first (a module sets ``RUNS_FOR_MINUTES =
  True``), then the rest by their number of tests, largest first (what
  pytest-xdist's ``--loadscope-reorder`` does; the Makefile turns that off
  for this order): the test runner hands files to its workers in this order,
  and the longest ones started last would leave a worker idle at the end.
  The sort is stable and per file, so a file's tests stay together and in
  order."""
  file_of = lambda item: item.nodeid.split("::")[0]
  count = collections.Counter(map(file_of, items))
  long_ = lambda item: getattr(getattr(item, "module", None), "RUNS_FOR_MINUTES", False)
  items.sort(key=lambda item: (not long_(item), -count[file_of(item)]))
