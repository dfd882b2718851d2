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


def _renderer(fig):
  """A renderer of a saved (and closed) figure, to measure where its parts lie."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  return FigureCanvasAgg(fig).get_renderer()


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


GRADUAL = (1, 2, 3, 4, 5, 4, 3, 2, 1)


def _stream_figure(tmp_path, saved, labels, blocks, name="curves.png"):
  """A stream_curves figure of ``blocks`` (4 steps a block), saved and read back."""
  rng = np.random.default_rng(0)
  panels = {s: {m: rng.uniform(0.2, 0.8, len(b)) for m in ("source", "tent")}
            for s, b in blocks.items()}
  plots.stream_curves(panels, ["source", "tent"], blocks, 4, tmp_path / name, "t",
                      labels=labels)
  fig = saved[name]
  return fig, {ax.get_title(): ax for ax in fig.axes if ax.get_title()}


def _strip(ax):
  """The strip of block names above a panel: (its axis, the names, the caption)."""
  (strip,) = ax.child_axes
  names = [t.get_text() for t in strip.xaxis.get_majorticklabels()]
  return strip, names, strip.get_xlabel()


def test_stream_curves_name_every_block_above_the_panels(tmp_path, saved):
  continual = ["brightness", "contrast", "gamma", "noise", "blur", "gradient", "edges", "zoom",
               "rotation", "elastic", "res", "threshold"]
  gradual = [f"{s} {v}" for s in ("brightness", "contrast", "blur", "threshold") for v in GRADUAL]
  labels = {"iid": ["brightness 5"], "continual": [f"{s} 5" for s in continual],
            "gradual": gradual, "mixed": ["mixed"]}
  blocks = {s: np.repeat(np.arange(len(v)), 4) for s, v in labels.items()}
  blocks["unnamed"] = np.repeat(np.arange(3), 4)
  fig, axes = _stream_figure(tmp_path, saved, {**labels, "unnamed": None}, blocks)
  renderer = _renderer(fig)
  for name, ax in axes.items():
    assert not ax.texts  # nothing written over the curves
    if name == "unnamed":
      assert not ax.child_axes
      continue
    strip, names, caption = _strip(ax)
    assert strip.xaxis.get_ticks_position() == "top"
    top = ax.get_window_extent(renderer).y1
    for t in strip.xaxis.get_majorticklabels():
      assert t.get_fontsize() >= 6.5 and t.get_window_extent(renderer).y0 >= top - 1
  assert _strip(axes["iid"])[1] == ["brightness, severity 5"]
  assert _strip(axes["mixed"])[1] == ["mixed"]
  _, names, caption = _strip(axes["continual"])
  assert names == continual and caption == "each at severity 5"
  # gradual: each shift named once, centred on its 9 blocks, the walk in the caption
  strip, names, caption = _strip(axes["gradual"])
  assert names == ["brightness", "contrast", "blur", "threshold"]
  np.testing.assert_allclose(strip.get_xticks(), (np.arange(4) * 9 + 4.5) * 4 * 4)
  assert "severity 1→5→1" in caption and strip.xaxis.label.get_fontsize() >= 6.5
  assert all(t.get_rotation() == 0 for t in strip.xaxis.get_majorticklabels())
  # darker the more severe: the shading of severity 5 darker than that of 1
  shades = [p.get_facecolor()[0] for p in axes["gradual"].patches]
  assert len(shades) == 36 and shades[4] < shades[0] and shades[0] == shades[8]
  assert any("darker = more severe" in t for t in _texts(fig))
  written = json.loads((tmp_path / "curves.json").read_text())
  assert written["labels"] == labels


def test_stream_curves_thin_names_too_many_to_read(tmp_path, saved):
  blocks = {"many": np.repeat(np.arange(60), 2)}
  _, axes = _stream_figure(tmp_path, saved, {"many": [f"domain{i}" for i in range(60)]}, blocks)
  strip, names, caption = _strip(axes["many"])
  every = int(caption.rsplit(" ", 1)[1])
  assert caption == f"one label in {every}" and every > 1
  assert names == [f"domain{i}" for i in range(0, 60, every)]
  assert all(t.get_rotation() == 90 for t in strip.xaxis.get_majorticklabels())
  with pytest.raises(ValueError, match="names 2 blocks; the panel has 60"):
    _stream_figure(tmp_path, saved, {"many": ["a", "b"]}, blocks, "bad.png")


def _history(k, val=True):
  h = {"train_loss": np.linspace(1, 0.1, 5)[:, None] * np.arange(1, k + 1),
       "val_dice": np.linspace(0.3, 0.9, 5)[:, None] * np.ones(k)}
  if val:
    h["val_loss"] = h["train_loss"] * 1.1
  return h


def test_histories_have_one_legend_below_both_panels(tmp_path, saved):
  labels = ["source (90,50,170,50)", "oracle (120,50,170,50)", "oracle (90,30,200,10)"]
  plots.histories(_history(3), labels, tmp_path / "h.png", "t", note=plots.DOMAIN_NOTE)
  fig = saved["h.png"]
  assert all(ax.get_legend() is None for ax in fig.axes)
  (legend,) = fig.legends
  texts = [t.get_text() for t in legend.get_texts()]
  assert texts == labels + ["solid: training loss", "dashed: validation loss"]
  assert all(t.get_fontsize() >= 7.5 for t in legend.get_texts())
  renderer = _renderer(fig)
  box = legend.get_window_extent(renderer)
  assert all(box.y1 <= ax.get_tightbbox(renderer).y0 for ax in fig.axes)  # below, outside
  # one colour per model, the same in the legend and in both panels
  colours = [h.get_color() for h in legend.legend_handles[:3]]
  for ax in fig.axes:
    solid = [line.get_color() for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert solid == colours
  assert [h.get_linestyle() for h in legend.legend_handles[3:]] == ["-", "--"]
  plots.histories(_history(2, val=False), ["a", "b"], tmp_path / "n.png")
  assert [t.get_text() for t in saved["n.png"].legends[0].get_texts()] == ["a", "b"]


def test_histories_of_many_models_say_what_the_colours_are(tmp_path, saved):
  k = plots.LEGEND_MODELS + 1
  plots.histories(_history(k), [str(i) for i in range(k)], tmp_path / "many.png")
  fig = saved["many.png"]
  (legend,) = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ["solid: training loss",
                                                        "dashed: validation loss"]
  assert any(f"the {k} models" in t and "many.json" in t for t in _texts(fig))
