import glob
import json
import os

import jax
import numpy as np
import pytest

from bnjax import checkpoint, models


@pytest.fixture
def variables():
  return models.init(models.UNet(features=2, depth=1), jax.random.key(0), (4, 4, 1))


@pytest.mark.wheel
def test_roundtrip(tmp_path, variables):
  checkpoint.save(tmp_path / "ck", variables, domain=[90, 50, 170, 50], note="x")
  restored = checkpoint.restore(tmp_path / "ck")
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(
      jax.tree_util.tree_map(np.asarray, variables))
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  assert checkpoint.metadata(tmp_path / "ck") == {"domain": [90, 50, 170, 50], "note": "x"}
  # Overwriting replaces the content.
  other = jax.tree_util.tree_map(lambda a: a + 1, variables)
  checkpoint.save(tmp_path / "ck", other)
  np.testing.assert_array_equal(checkpoint.restore(tmp_path / "ck")["params"]["head"]["bias"],
                                other["params"]["head"]["bias"])


def test_missing_and_incomplete(tmp_path, variables):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.restore(tmp_path / "nothing")
  checkpoint.save(tmp_path / "ck", variables)
  os.remove(tmp_path / "ck" / checkpoint.MANIFEST)
  with pytest.raises(ValueError, match="interrupted save"):
    checkpoint.restore(tmp_path / "ck")


def test_corrupt_data_is_detected(tmp_path, variables):
  checkpoint.save(tmp_path / "ck", variables)
  manifest = json.loads((tmp_path / "ck" / checkpoint.MANIFEST).read_text())
  key = "params/head/kernel"
  manifest["leaves"][key]["sha256"] = "0" * 64  # the data no longer matches
  (tmp_path / "ck" / checkpoint.MANIFEST).write_text(json.dumps(manifest))
  with pytest.raises(ValueError, match="altered leaves \\['params/head/kernel'\\]"):
    checkpoint.restore(tmp_path / "ck")
  checkpoint.save(tmp_path / "ck2", variables)
  for f in glob.glob(str(tmp_path / "ck2" / "variables" / "**" / "d" / "*"), recursive=True):
    with open(f, "r+b") as fh:
      fh.truncate(3)
  with pytest.raises(ValueError, match="corrupt|does not match"):
    checkpoint.restore(tmp_path / "ck2")


def test_bad_metadata(tmp_path, variables):
  with pytest.raises(ValueError, match="JSON"):
    checkpoint.save(tmp_path / "ck", variables, bad=object())
