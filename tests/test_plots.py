"""The figures say what they show: each one is captured as it is saved and
its titles, labels, notes and drawn positions are read back."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bnjax import data, plots  # noqa: E402
from experiments import sweep  # noqa: E402


@pytest.fixture
def saved(monkeypatch):
  """The figures saved during a test, by file name."""
  figures = {}
  real = matplotlib.figure.Figure.savefig

  def capture(fig, path, *args, **kwargs):
    figures[str(path).rsplit("/", 1)[-1]] = fig
    return real(fig, path, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
  return figures


def _texts(fig):
  return [t.get_text() for t in fig.texts]


def test_coinciding_methods_stay_visible(tmp_path, saved):
  same = ([0, 1, 3], [0.8, 0.6, 0.4], [0.05, 0.05, 0.05])
  plots.severity_curves({"brightness": {"adabn": same, "tent": same}}, ["adabn", "tent"],
                        tmp_path / "s.png", "t")
  ax = saved["s.png"].axes[0]
  lines = {line.get_label(): line for line in ax.get_lines() if line.get_label() in ("adabn", "tent")}
  xa, xt = (np.asarray(lines[m].get_xdata()) for m in ("adabn", "tent"))
  assert np.all(xa != xt) and np.all(np.abs(xa - xt) < 0.2)  # side by side, same severity
  assert lines["adabn"].get_linestyle() != lines["tent"].get_linestyle()
  assert lines["adabn"].get_marker() != lines["tent"].get_marker()
  assert any("offset" in t for t in _texts(saved["s.png"]))


def test_channel_histograms_have_axis_labels(tmp_path, saved):
  rng = np.random.default_rng(0)
  plots.channel_histograms({"a": rng.normal(size=(50, 6)), "b": rng.normal(size=(40, 6))},
                           tmp_path / "c.png", note=plots.DOMAIN_NOTE)
  axes = [ax for ax in saved["c.png"].axes if ax.get_visible() and ax.axison]
  assert len(axes) == 6
  assert all(ax.get_ylabel() == "fraction of rows" for ax in axes[::3])
  assert all(ax.get_xlabel() == "feature value" for ax in axes[3:])
  assert any("μ1" in t and "background" in t for t in _texts(saved["c.png"]))


def test_symlog_axis_keeps_zero_apart_from_the_first_decade(tmp_path, saved):
  x = np.array([0.0, 0.0, 0.12, 0.5, 3.0, 40.0, 900.0])
  panel = {"x": x, "y": np.linspace(-0.1, 0.3, len(x)), "group": ["a"] * len(x),
           "heldout": np.zeros(len(x)), "fit": None, "note": "n", "xscale": "symlog"}
  plots.predictor_scatter({"bn_w2": panel, "overlap †": {**panel, "xscale": "linear"}}, ["a"],
                          tmp_path / "p.png", note="† needs the target masks")
  ax = saved["p.png"].axes[0]
  ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
  assert ticks[0] == 0 and min(ticks[1:]) >= 3 * 0.12
  assert "linear below 0.12" in ax.get_xlabel()
  legend = [t.get_text() for t in saved["p.png"].legends[0].get_texts()]
  assert "a row's predicted gain, fitted without its group" in legend
  assert any("†" in t for t in _texts(saved["p.png"]))


def test_sigma_panels_explain_their_blank_cells(tmp_path, saved):
  targets = [data.Domain(m, s1, m + d, 6) for s1 in (6, 30) for m in (64, 112)
             for d in (24, 128) if m + d <= 192]
  plots.sigma_panels(targets, np.linspace(0, 1, len(targets)), tmp_path / "p.png")
  (note,) = _texts(saved["p.png"])
  assert "hatched: no target of the grid" in note and "μ2" in note


def test_sweep_titles_name_the_grid_once(tmp_path, saved):
  class Wd:
    def file(self, name):
      return str(tmp_path / name)
  doms = [data.Domain(68, 50, 188, 50), data.Domain(1, 50, 255, 50)]
  res = {"sources": [d.to_json() for d in doms], "targets": [d.to_json() for d in doms],
         "iou_no_adapt": [[0.1, 0.2], [0.3, 0.4]], "iou_adapted": [[0.5, 0.6], [0.7, 0.8]],
         "source_iou": [[0.9, 0.9], [0.8, 0.8]], "mask_fraction": 0.2}
  sweep._figures(Wd(), sweep.Group("geometric", tuple(doms), tuple(doms)), res, "geometric")
  sweep._figures(Wd(), sweep.Group("k20", tuple(doms), tuple(doms)), res, "brightness")
  assert saved["geometric_heatmaps.png"]._suptitle.get_text().startswith("geometric: IoU")
  assert saved["k20_heatmaps.png"]._suptitle.get_text().startswith("brightness k20: IoU")
  assert any("μ1" in t for t in _texts(saved["geometric_heatmaps.png"]))
