"""experiments/sweep.py: its configs hold the study's grids, its figures say
which grid they show, and a run killed mid-way resumes to the numbers of an
uninterrupted one (slow)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bnjax import data
from experiments import sweep as experiment
from experiments.configs import sweep as configs


def test_sweep_configs_hold_the_study_grids():
  groups = experiment.groups_of(configs.get_config("brightness,full"))
  assert [g.label for g in groups] == ["k20", "k40", "k80"]
  assert [d.mu1 for d in groups[0].sources] == list(range(10, 171, 20))
  assert all(d.mu2 - d.mu1 == 80 and d.sigma1 == d.sigma2 == 50 for d in groups[2].sources)
  (c,) = experiment.groups_of(configs.get_config("clip_corrected,full"))
  assert c.sources == (data.Domain(96, 18, 138, 18),) and c.layout == "sigma_panels"
  assert all(t.mu2 <= 192 for t in c.targets)
  # 7 mu1 x 7 deltas, filtered by mu2 <= 192, times 5 x 5 sigmas.
  valid = sum(1 for m in range(64, 161, 16) for d in (24, 32, 42, 55, 73, 97, 128) if m + d <= 192)
  assert len(c.targets) == 25 * valid
  assert len(experiment.groups_of(configs.get_config("geometric,full"))[0].sources) == 5
  assert len(experiment.groups_of(configs.get_config("geometric"))[0].sources) == 4
  assert experiment.parse_values("10:170:20", "mu1") == [float(v) for v in range(10, 171, 20)]
  assert experiment.parse_values("1,2.5", "mu1") == [1.0, 2.5]
  with pytest.raises(ValueError, match="config.custom.delta must be a list"):
    experiment.parse_values("1:2:0", "delta")
  custom = configs.get_config("custom")
  custom.custom.mu1, custom.custom.delta, custom.custom.sigma2 = "40,90", "90,200", "20,30"
  (g,) = experiment.groups_of(custom)
  assert set(g.sources) == {data.Domain(m, 50, m + d, s2) for m in (40, 90) for d in (90, 200)
                            for s2 in (20, 30) if m + d <= 255}
  assert len(g.sources) == 6
  with pytest.raises(ValueError, match="'<grid>\\[,full\\]'"):
    configs.get_config("contrast")


def test_sweep_titles_name_the_grid_once(tmp_path, saved):
  class Wd:
    def file(self, name):
      return str(tmp_path / name)
  doms = [data.Domain(68, 50, 188, 50), data.Domain(1, 50, 255, 50)]
  res = {"sources": [d.to_json() for d in doms], "targets": [d.to_json() for d in doms],
         "iou_no_adapt": [[0.1, 0.2], [0.3, 0.4]], "iou_adapted": [[0.5, 0.6], [0.7, 0.8]],
         "source_iou": [[0.9, 0.9], [0.8, 0.8]], "mask_fraction": 0.2}
  experiment._figures(Wd(), experiment.Group("geometric", tuple(doms), tuple(doms)), res, "geometric")
  experiment._figures(Wd(), experiment.Group("k20", tuple(doms), tuple(doms)), res, "brightness")
  assert saved["geometric_heatmaps.png"]._suptitle.get_text().startswith("geometric: IoU")
  assert saved["k20_heatmaps.png"]._suptitle.get_text().startswith("brightness k20: IoU")
  assert any("μ1" in t.get_text() for t in saved["geometric_heatmaps.png"].texts)


SWEEP_CONFIG = ["--config.custom.mu1=40,90,140", "--config.custom.delta=90",
                "--config.custom.sigma1=30", "--config.data.size=16", "--config.data.n_train=24",
                "--config.data.n_eval=8", "--config.data.n_adapt=8", "--config.model.features=2",
                "--config.model.depth=2", "--config.train.epochs=2", "--config.train.batch_size=8",
                "--config.chunk=1", "--config.pair_chunk=4"]


def sweep_cmd(root, out, *extra):
  return [sys.executable, os.path.join(root, "experiments", "sweep.py"),
          f"--config={os.path.join(root, 'experiments', 'configs', 'sweep.py')}:custom",
          f"--workdir={out}", *SWEEP_CONFIG, *extra]


@pytest.mark.slow
def test_sweep_killed_then_resumed(root, tmp_path):
  env = {**os.environ, "PYTHONPATH": root}
  out = tmp_path / "run"
  proc = subprocess.Popen(sweep_cmd(root, out), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  first = out / "checkpoints" / "chunk_0000" / "bnjax.json"
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert first.exists(), "the first chunk was never checkpointed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "summary.md").exists()
  resumed = subprocess.run(sweep_cmd(root, out), env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "models 1-1 of 3 restored" in resumed.stderr
  fresh = subprocess.run(sweep_cmd(root, tmp_path / "fresh"), env=env, capture_output=True,
                         text=True, timeout=600)
  assert fresh.returncode == 0, fresh.stderr[-3000:]
  a = json.loads((out / "results" / "custom.json").read_text())
  b = json.loads((tmp_path / "fresh" / "results" / "custom.json").read_text())
  for key in ("source_iou", "iou_no_adapt", "iou_adapted"):
    # The same programs on the same machine (the restored chunk is the saved
    # one bit for bit): the same numbers, exactly.
    np.testing.assert_array_equal(a[key], b[key])
  for name in ("custom_heatmaps.png", "custom_surface.png", "histories.png", "summary.md",
               "custom_heatmaps_adapted.csv"):
    assert (out / name).exists()
  # Everything done is reused; another config into the same workdir is refused.
  again = subprocess.run(sweep_cmd(root, out), env=env, capture_output=True, text=True, timeout=600)
  assert "scores restored" in again.stdout and again.stderr.count("restored") >= 3
  other = subprocess.run(sweep_cmd(root, out, "--config.seed=1"), env=env, capture_output=True,
                         text=True, timeout=600)
  assert other.returncode == 2 and "seed: 0 -> 1" in other.stderr
