import json

import jax
import numpy as np
import pytest

# bnjax.workdir keeps ml_collections configs: the "experiments" extra.
config_dict = pytest.importorskip("ml_collections.config_dict")

from bnjax import config as bnjax_config
from bnjax import data, models, workdir
from bnjax.workdir import ConfigMismatch, Workdir


def config(**train):
  c = config_dict.ConfigDict()
  c.source = (90.0, 50.0, 170.0, 50.0)
  c.train = config_dict.ConfigDict({"epochs": 3, "optimizer": "adam", **train})
  c.adapt = config_dict.ConfigDict({"batch_size": config_dict.placeholder(int)})
  return c


def test_config_is_written_as_plain_json_and_compared(tmp_path):
  quiet = lambda *a: None
  wd = Workdir.open(tmp_path / "run", "study", config(), log=quiet)
  assert not wd.resumed
  stored = json.loads((tmp_path / "run" / "config.json").read_text())
  assert stored["experiment"] == "study"
  assert stored["config"] == {"source": [90.0, 50.0, 170.0, 50.0],
                              "train": {"epochs": 3, "optimizer": "adam"},
                              "adapt": {"batch_size": None}}
  assert Workdir.open(tmp_path / "run", "study", config(), log=quiet).resumed
  wd.write_result("scores", {"iou": 0.5})  # the run keeps something: another config is refused
  with pytest.raises(ConfigMismatch) as e:
    Workdir.open(tmp_path / "run", "study", config(epochs=5, momentum=0.9), log=quiet)
  assert "train.epochs: 3 -> 5" in str(e.value) and "train.momentum: '<absent>' -> 0.9" in str(e.value)
  assert "keeps 0 trained model checkpoints and 1 result file" in str(e.value)
  with pytest.raises(ConfigMismatch, match="experiment 'study', not 'other'"):
    Workdir.open(tmp_path / "run", "other", config(), log=quiet)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "notes.txt").write_text("mine")
  with pytest.raises(ConfigMismatch, match="not empty and has no config.json"):
    Workdir.open(tmp_path / "full", "study", config(), log=quiet)
  with pytest.raises(FileNotFoundError, match="not a bnjax workdir"):
    Workdir.read(tmp_path / "full")


def test_config_diff_names_nested_keys():
  assert workdir.config_diff({"a": {"b": 1, "c": 2}, "d": [1]}, {"a": {"b": 1, "c": 3}, "d": [2]}) \
      == ["a.c: 2 -> 3", "d: [1] -> [2]"]


def test_results_and_checkpoints_round_trip(tmp_path):
  wd = Workdir.open(tmp_path, "study", config(), log=lambda *a: None)
  domain = data.Domain(90, 50, 170, 50)
  wd.write_result("scores", {"domain": domain.to_json(), "iou": [0.5, 0.25]})
  back = wd.read_result("scores")
  assert data.Domain.from_json(back["domain"]) == domain and back["iou"] == [0.5, 0.25]
  assert wd.read_result("missing") is None and wd.results() == ["scores"]
  v = models.init(models.UNet(features=2, depth=1), jax.random.key(0), (4, 4, 1))
  wd.save_model("m", v, seed=3, domains=[domain.to_json()])
  assert wd.load_model("m", seed=4) is None  # another identity: train again
  got, meta = wd.load_model("m", seed=3, domains=[domain.to_json()])
  for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(got)):
    np.testing.assert_array_equal(a, b)
  assert wd.checkpoints() == ["m"]
  assert wd.kept() == "1 trained model checkpoint and 1 result file"
  with pytest.raises(ValueError, match="exactly the keys"):
    data.Domain.from_json({"mu1": 1, "sigma1": 2, "mu2": 3})


def test_csv_and_config_lists(tmp_path):
  import csv
  wd = Workdir.open(str(tmp_path / "run"), "test", config_dict.ConfigDict({"a": 1}), log=lambda *_: None)
  wd.write_csv("rows.csv", [{"name": "x", "v": 1 / 3, "n": 2}], ("name", "v"), ".3f")
  with open(tmp_path / "run" / "rows.csv") as f:
    assert list(csv.DictReader(f)) == [{"name": "x", "v": "0.333"}]
  assert bnjax_config.names("b, a,b", ("a", "b"), "methods") == ["b", "a"]
  with pytest.raises(bnjax_config.ConfigError,
                     match=r"config.methods must be a comma-separated list"):
    bnjax_config.names("a,c", ("a", "b"), "methods")
  assert bnjax_config.ints("5,1,3,1", 1, 5, "severities") == [1, 3, 5]
  with pytest.raises(bnjax_config.ConfigError, match=r"config.severities .* integers in 1..5"):
    bnjax_config.ints("0,2", 1, 5, "severities")


def test_a_workdir_whose_run_kept_nothing_takes_another_config(tmp_path):
  """A run that stopped before keeping anything (an error, a crash) is no
  trap: the corrected config replaces its config.json."""
  said = []
  Workdir.open(tmp_path / "run", "study", config(epochs=0), log=said.append)
  (tmp_path / "run" / "history.png").write_bytes(b"a figure, not a result")
  wd = Workdir.open(tmp_path / "run", "study", config(epochs=3), log=said.append)
  assert not wd.resumed and "kept nothing" in said[-1]
  stored = json.loads((tmp_path / "run" / "config.json").read_text())
  assert stored["config"]["train"]["epochs"] == 3
  assert Workdir.open(tmp_path / "run", "study", config(epochs=3), log=said.append).resumed


def test_train_or_restore_trains_once_and_retrains_for_other_metadata(tmp_path):
  wd = Workdir.open(tmp_path / "run", "study", config(), log=lambda *a: None)
  calls = []

  def train():
    calls.append(1)
    return {"params": {"w": np.arange(3.0) + len(calls)}}, {"history": [0.5, 0.25]}

  v, meta, restored = wd.train_or_restore("m", train, seed=3)
  assert not restored and len(calls) == 1 and meta == {"seed": 3, "history": [0.5, 0.25]}
  np.testing.assert_array_equal(v["params"]["w"], [1.0, 2.0, 3.0])
  v2, meta2, restored2 = wd.train_or_restore("m", train, seed=3)   # the same run: restored
  assert restored2 and len(calls) == 1
  np.testing.assert_array_equal(v2["params"]["w"], [1.0, 2.0, 3.0])
  assert meta2["history"] == [0.5, 0.25] and meta2["seed"] == 3
  v3, _, restored3 = wd.train_or_restore("m", train, seed=4)       # other metadata: trained again
  assert not restored3 and len(calls) == 2
  np.testing.assert_array_equal(v3["params"]["w"], [2.0, 3.0, 4.0])


def test_split_dataset_is_the_split_key_draw():
  d = data.Domain(90, 50, 170, 50)
  x, y = data.split_dataset(5, d, "adapt", 4, 16)
  x2, y2 = data.make_dataset(data.split_key(5, d, "adapt"), d, 4, 16)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  x3, _ = data.split_dataset(5, d, "eval", 4, 16)   # another split: other images
  assert not np.allclose(x, x3)
