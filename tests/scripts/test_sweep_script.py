"""experiments/sweep.py: its configs hold the study's grids and its figures
say which grid they show (a run killed mid-way, in one process and in two:
tests/scripts/test_multiprocess_sweep.py)."""

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
