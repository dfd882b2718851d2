"""The figures say what they show: each one is captured as it is saved and
its titles, labels, notes and drawn positions are read back."""

import json

import pytest

matplotlib = pytest.importorskip("matplotlib")  # bnjax.plots: the "experiments" extra
matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402

from bnjax import data, plots  # noqa: E402


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


def test_plots_write_numbers(tmp_path):
  a = np.array([[0.1, 0.2], [0.3, 0.4]])
  b = np.array([[0.5, 0.6], [0.7, 0.9]])
  plots.heatmaps(a, b, ["s1", "s2"], ["t1", "t2"], tmp_path / "h.png")
  rows = (tmp_path / "h_difference.csv").read_text().splitlines()
  assert rows[0].split(",")[1:] == ["t1", "t2"]
  np.testing.assert_allclose([float(v) for v in rows[2].split(",")[1:]], b[1] - a[1])
  plots.surface(b, ["s1", "s2"], ["t1", "t2"], tmp_path / "s.png")
  targets = [data.Domain(m, 6, m + d, s2) for s2 in (6, 30) for m in (64, 112)
             for d in (24, 128) if m + d <= 192]
  plots.sigma_panels(targets, np.linspace(0, 1, len(targets)), tmp_path / "p.png")
  table = json.loads((tmp_path / "p.json").read_text())
  assert len(table) == len(targets) and all(t["mu2"] <= 192 for t in table)
  plots.histories({"train_loss": np.ones((3, 2)), "val_dice": np.full((3, 2), np.nan)},
                  ["a", "b"], tmp_path / "hist.png")
  for name in ("h.png", "s.png", "p.png", "hist.png"):
    assert (tmp_path / name).stat().st_size > 1000


def test_channel_histograms_drop_constant_channels(tmp_path):
  rng = np.random.default_rng(0)
  src = rng.normal(size=(200, 5))
  tgt = rng.normal(1.0, 2.0, size=(150, 5))
  src[:, 1] = tgt[:, 1] = 0.0  # dead in both: dropped
  src[:, 3] = 2.5  # constant in the source only: kept
  plots.channel_histograms({"source": src, "target": tgt}, tmp_path / "c.png", bins=10)
  record = json.loads((tmp_path / "c.json").read_text())
  assert record["dropped_constant"] == [1]
  assert [h["channel"] for h in record["histograms"]] == [0, 2, 3, 4]
  for h in record["histograms"]:
    assert sum(h["counts"]["source"]) == 200 and sum(h["counts"]["target"]) == 150
    lo, hi = min(src[:, h["channel"]].min(), tgt[:, h["channel"]].min()), max(
        src[:, h["channel"]].max(), tgt[:, h["channel"]].max())
    assert h["edges"][0] == pytest.approx(lo) and h["edges"][-1] == pytest.approx(hi)
  assert (tmp_path / "c.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="same C"):
    plots.channel_histograms({"a": src, "b": tgt[:, :3]}, tmp_path / "d.png")
  with pytest.raises(ValueError, match="NaN"):
    plots.channel_histograms({"a": np.full((4, 2), np.nan)}, tmp_path / "e.png")
