import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def root():
  return ROOT


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Experiment scripts run by the tests keep their persistent compilation
  cache in a temporary folder, not in the user's ~/.cache."""
  os.environ["BNJAX_COMPILATION_CACHE"] = str(tmp_path_factory.mktemp("xla_cache"))
  yield
