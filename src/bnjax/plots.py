"""Figures of the study (matplotlib, Agg). Every figure writes its numbers
beside it as JSON (``<name>.json``) and, for matrices, CSV (``<name>.csv``)."""

from __future__ import annotations

import csv
import os
import re
import textwrap
from typing import Sequence

import numpy as np

from bnjax._io import write_json_atomic
from bnjax.stats import constant_dims

__all__ = ["heatmaps", "sigma_panels", "surface", "histories", "channel_histograms",
           "severity_curves", "labelled_heatmap", "winner_grid", "predictor_scatter",
           "stream_curves", "image_grid", "DOMAIN_NOTE"]


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _stem(path):
  return os.path.splitext(os.fspath(path))[0]


#: The footnote every figure with domain labels carries.
DOMAIN_NOTE = ("domain (μ1,σ1,μ2,σ2): mean and standard deviation of the background (μ1, σ1) "
               "and of the foreground (μ2, σ2) pixels, 0-255 scale")


def _footnote(fig, note: str) -> float:
  """``note`` in small type along the bottom of ``fig``; returns the height
  (figure fraction) to keep free for it (0 without a note)."""
  if not note:
    return 0.0
  width, height = fig.get_size_inches()
  chars = max(40, int(width * 72 / (7 * 0.55)))  # 7 pt characters across the figure
  note = "\n".join(textwrap.fill(part, chars) for part in note.split("\n"))
  lines = note.count("\n") + 1
  fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom", color="0.25")
  return (lines * 7 * 1.5 / 72 + 0.05) / height  # 7 pt lines, in inches


def _write_matrix_csv(path, matrix, rows, cols, corner="source \\ target"):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([corner, *cols])
    for label, row in zip(rows, np.asarray(matrix)):
      w.writerow([label, *[f"{v:.6g}" for v in row]])


def heatmaps(no_adapt, adapted, rows: Sequence[str], cols: Sequence[str], path,
             title: str = "", note: str = "") -> str:
  """Three panels: IoU without adaptation, with, and the difference;
  ``note`` in small type below (e.g. :data:`DOMAIN_NOTE`)."""
  plt = _plt()
  no_adapt, adapted = np.asarray(no_adapt), np.asarray(adapted)
  diff = adapted - no_adapt
  k, m = no_adapt.shape
  size = max(3.0, 0.55 * max(k, m) + 1.5)
  fig, axes = plt.subplots(1, 3, figsize=(3 * size, size))
  panels = [("IoU without adaptation", no_adapt, "viridis", 0, 1),
            ("IoU with BN adaptation", adapted, "viridis", 0, 1),
            ("difference (adapted - not)", diff, "RdBu", -1, 1)]
  for ax, (name, mat, cmap, lo, hi) in zip(axes, panels):
    im = ax.imshow(mat, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_title(name, fontsize=9)
    ax.set_xticks(range(m), cols, rotation=90, fontsize=6)
    ax.set_yticks(range(k), rows, fontsize=6)
    ax.set_xlabel("target", fontsize=8)
    ax.set_ylabel("source", fontsize=8)
    if k * m <= 400:
      for i in range(k):
        for j in range(m):
          dark = abs(mat[i, j]) > 0.6 if lo < 0 else mat[i, j] < 0.5
          ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=5,
                  color="w" if dark else "k")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, _footnote(fig, note), 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)
  stem = _stem(path)
  for name, mat in (("no_adapt", no_adapt), ("adapted", adapted), ("difference", diff)):
    _write_matrix_csv(f"{stem}_{name}.csv", mat, rows, cols)
  write_json_atomic(f"{stem}.json", {"rows": list(rows), "cols": list(cols),
                                     "iou_no_adapt": no_adapt.tolist(),
                                     "iou_adapted": adapted.tolist()})
  return path


def sigma_panels(targets, values, path, title: str = "", label: str = "IoU") -> str:
  """One source, many targets: subplot rows sigma1, columns sigma2; inside,
  rows mu1, columns mu2 - mu1; blank (grey hatching) where a combination is
  not in the grid, as a note below the panels says.

  ``targets`` are Domains; ``values`` float[len(targets)] (e.g. adapted IoU).
  """
  plt = _plt()
  values = np.asarray(values, float)
  s1s = sorted({t.sigma1 for t in targets})
  s2s = sorted({t.sigma2 for t in targets})
  mus = sorted({t.mu1 for t in targets})
  deltas = sorted({t.mu2 - t.mu1 for t in targets})
  fig, axes = plt.subplots(len(s1s), len(s2s), squeeze=False,
                           figsize=(max(2.2 * len(s2s) + 1.8, 6.5), 2.2 * len(s1s) + 1.2))
  table = []
  for t, v in zip(targets, values):
    table.append({"mu1": t.mu1, "sigma1": t.sigma1, "mu2": t.mu2, "sigma2": t.sigma2,
                  "value": float(v)})
  im = None
  for a, s1 in enumerate(s1s):
    for b, s2 in enumerate(s2s):
      mat = np.full((len(mus), len(deltas)), np.nan)
      for t, v in zip(targets, values):
        if t.sigma1 == s1 and t.sigma2 == s2:
          mat[mus.index(t.mu1), deltas.index(t.mu2 - t.mu1)] = v
      ax = axes[a, b]
      ax.set_facecolor("0.92")
      ax.patch.set_hatch("//")
      ax.patch.set_edgecolor("0.75")
      im = ax.imshow(mat, cmap="viridis", vmin=0, vmax=1)
      ax.set_xticks(range(len(deltas)), [f"{d:g}" for d in deltas], fontsize=5, rotation=90)
      ax.set_yticks(range(len(mus)), [f"{m:g}" for m in mus], fontsize=5)
      if a == 0:
        ax.set_title(f"σ2 = {s2:g}", fontsize=8)
      if b == 0:
        ax.set_ylabel(f"σ1 = {s1:g}\nμ1", fontsize=8)
      if a == len(s1s) - 1:
        ax.set_xlabel("μ2 − μ1", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  bottom = _footnote(fig, "hatched: no target of the grid has these values (e.g. μ2 beyond the "
                          "grid's limit)\n" + DOMAIN_NOTE)
  fig.subplots_adjust(left=0.14, right=0.84, top=0.88, bottom=bottom + 0.1, hspace=0.35)
  fig.colorbar(im, cax=fig.add_axes([0.87, bottom + 0.1, 0.02, 0.78 - bottom]), label=label)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  write_json_atomic(f"{_stem(path)}.json", table)
  with open(f"{_stem(path)}.csv", "w", newline="") as f:
    w = csv.DictWriter(f, ["mu1", "sigma1", "mu2", "sigma2", "value"])
    w.writeheader()
    w.writerows(table)
  return path


def surface(matrix, rows: Sequence[str], cols: Sequence[str], path, zlabel="IoU",
            title: str = "", note: str = "") -> str:
  """A 3-D surface of a source x target matrix."""
  plt = _plt()
  matrix = np.asarray(matrix, float)
  fig = plt.figure(figsize=(6, 5))
  ax = fig.add_subplot(projection="3d")
  yy, xx = np.meshgrid(np.arange(matrix.shape[0]), np.arange(matrix.shape[1]), indexing="ij")
  ax.plot_surface(xx, yy, matrix, cmap="viridis", vmin=0, vmax=1)
  ax.set_xticks(range(len(cols)), cols, fontsize=5)
  ax.set_yticks(range(len(rows)), rows, fontsize=5)
  ax.set_xlabel("target", fontsize=8)
  ax.set_ylabel("source", fontsize=8)
  ax.set_zlabel(zlabel, fontsize=8)
  ax.set_zlim(0, 1)
  if title:
    ax.set_title(title, fontsize=9)
  _footnote(fig, note)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  _write_matrix_csv(f"{_stem(path)}.csv", matrix, rows, cols)
  return path


def _colours(n: int):
  """One colour per model, the same in every panel."""
  plt = _plt()
  if n <= 10:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"][:n]
  return [plt.get_cmap("viridis")(i / max(n - 1, 1)) for i in range(n)]


#: The most models :func:`histories` names one by one in its legend.
LEGEND_MODELS = 24


def _legend_below(fig, handles, below: float, fontsize: float = 8.0) -> float:
  """One legend for the whole figure, centred along its bottom above a
  footnote of height ``below`` (figure fraction), in as many columns as the
  figure's width holds (evened out, filled column by column); returns the
  height (figure fraction) it takes."""
  from matplotlib.textpath import TextPath

  if not handles:
    return 0.0
  # An entry: its text, the handle (2 em), the gap to it (0.8 em), between columns (2 em).
  entry = max(TextPath((0, 0), h.get_label(), size=fontsize).get_extents().width
              for h in handles) + 4.8 * fontsize
  most = int(max(1, min(len(handles), fig.get_figwidth() * 72 * 0.95 // entry)))
  ncol = -(-len(handles) // -(-len(handles) // most))  # as many in each column
  legend = fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, below),
                      ncol=ncol, fontsize=fontsize, frameon=False)
  height = legend.get_window_extent(fig.canvas.get_renderer()).height
  return height / (fig.get_figheight() * fig.dpi) + 0.01


def histories(history: dict, labels: Sequence[str], path, title: str = "",
              note: str = "") -> str:
  """Training (solid) and validation (dashed, when ``history`` has
  ``val_loss``) loss and validation Dice of every model, one colour per model
  in both panels, one legend for both below them (each model by name, up to
  ``LEGEND_MODELS`` (24) of them, and what solid and dashed mean).
  ``history`` arrays are float[epochs, K] (NaN after a model stopped), as
  :func:`bnjax.train.train_many` returns."""
  plt = _plt()
  from matplotlib.lines import Line2D

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  train_loss = np.asarray(history["train_loss"], float)
  val_loss = np.asarray(history["val_loss"], float) if "val_loss" in history else None
  val_dice = np.asarray(history["val_dice"], float)
  epochs = np.arange(1, train_loss.shape[0] + 1)
  colours = _colours(len(labels))
  for i, (label, colour) in enumerate(zip(labels, colours)):
    axes[0].plot(epochs, train_loss[:, i], color=colour, label=label, lw=1)
    if val_loss is not None:
      axes[0].plot(epochs, val_loss[:, i], "--", color=colour, lw=1)
    axes[1].plot(epochs, val_dice[:, i], color=colour, label=label, lw=1)
  axes[0].set(xlabel="epoch", ylabel="loss",
              title="training (solid) and validation (dashed) loss" if val_loss is not None
              else "training loss")
  axes[1].set(xlabel="epoch", ylabel="validation Dice", ylim=(0, 1), title="validation Dice")
  handles = []
  if len(labels) <= LEGEND_MODELS:
    handles = [Line2D([], [], color=c, lw=2, label=l) for l, c in zip(labels, colours)]
  elif labels:
    note = "\n".join(filter(None, [
        f"colours: the {len(labels)} models from dark purple (first) to yellow (last), in the "
        f"order of {os.path.basename(_stem(path))}.json", note]))
  if val_loss is not None:
    handles += [Line2D([], [], color="0.2", lw=1.2, label="solid: training loss"),
                Line2D([], [], color="0.2", lw=1.2, ls="--", label="dashed: validation loss")]
  if title:
    fig.suptitle(title, fontsize=10)
  below = _footnote(fig, note)
  legend = _legend_below(fig, handles, below)
  fig.tight_layout(rect=(0, below + legend, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  clean = lambda a: np.where(np.isnan(a), None, a).tolist()
  numbers = {"labels": list(labels), "train_loss": clean(train_loss), "val_dice": clean(val_dice)}
  if val_loss is not None:
    numbers["val_loss"] = clean(val_loss)
  write_json_atomic(f"{_stem(path)}.json", numbers)
  return path


def channel_histograms(samples: dict, path, max_channels: int = 16, drop_constant: bool = True,
                       bins: int = 40, title: str = "", note: str = "",
                       xlabel: str = "feature value") -> str:
  """Per-dimension histograms: a grid of channels, one outline per sample
  (e.g. ``{"source": fs, "target": ft, "adapted": fa}``, each [N, C] from
  :func:`bnjax.features.extract`), on shared bins per channel. With
  ``drop_constant``, channels constant (or all zero) in every sample are
  left out. The first ``max_channels`` remaining channels are drawn; their
  counts go to ``<name>.json`` (channel, bin edges, counts per sample)."""
  if not samples:
    raise ValueError("samples must hold at least one [N, C] array")
  arrays = {k: np.asarray(v, np.float64) for k, v in samples.items()}
  c = {a.shape[1] if a.ndim == 2 else -1 for a in arrays.values()}
  if len(c) != 1 or -1 in c:
    raise ValueError(f"samples must all be [N, C] with the same C, got "
                     f"{[a.shape for a in arrays.values()]}")
  if not all(np.all(np.isfinite(a)) for a in arrays.values()):
    raise ValueError("samples contain NaN or infinite values")
  if max_channels < 1 or bins < 1:
    raise ValueError(f"max_channels and bins must be >= 1, got {max_channels}, {bins}")
  channels = np.arange(c.pop())
  dropped = []
  if drop_constant:
    const = np.all([constant_dims(a) for a in arrays.values()], axis=0)
    dropped = channels[const].tolist()
    channels = channels[~const]
  shown = channels[:max_channels]
  plt = _plt()
  cols = int(np.ceil(np.sqrt(max(len(shown), 1))))
  rows = int(np.ceil(max(len(shown), 1) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.8 * rows), squeeze=False)
  record = []
  styles = [dict(lw=2.2, alpha=0.45, ls="-"), dict(lw=1.1, ls="--"), dict(lw=1.1, ls=":")]
  for i, (ax, ch) in enumerate(zip(axes.flat, shown)):
    lo = min(a[:, ch].min() for a in arrays.values())
    hi = max(a[:, ch].max() for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    counts = {}
    for j, (label, a) in enumerate(arrays.items()):
      counts[label], _ = np.histogram(a[:, ch], edges, density=False)
      # Each sample its own line style, so that coinciding outlines stay visible.
      ax.stairs(counts[label] / len(a), edges, label=label, **styles[j % len(styles)])
    ax.set_title(f"channel {ch}", fontsize=7)
    ax.tick_params(labelsize=5)
    if i % cols == 0:
      ax.set_ylabel("fraction of rows", fontsize=6)
    if i // cols == rows - 1 or i + cols >= len(shown):
      ax.set_xlabel(xlabel, fontsize=6)
    record.append({"channel": int(ch), "edges": edges.tolist(),
                   "counts": {k: v.tolist() for k, v in counts.items()}})
  for ax in list(axes.flat)[len(shown):]:
    ax.axis("off")
  if len(shown):
    axes.flat[0].legend(fontsize=5)
  fig.suptitle(f"{title} ({len(dropped)} constant channels dropped)" if drop_constant else title,
               fontsize=8)
  fig.tight_layout(rect=(0, _footnote(fig, note), 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)
  write_json_atomic(f"{_stem(path)}.json", {"dropped_constant": dropped, "histograms": record})
  return path


def _panel_grid(n: int, width: float, height: float):
  """(figure, axes) of ``n`` panels in up to 4 columns, the spare axes off."""
  plt = _plt()
  cols = min(4, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  return fig, axes


def _finish_panels(fig, axes, path, title: str, bottom: float, dpi: int, note: str = "",
                   **legend) -> None:
  """The first panel's legend below the grid (above ``note``), the title
  above, saved and closed."""
  plt = _plt()
  handles, labels = axes.flat[0].get_legend_handles_labels()
  below = _footnote(fig, note)
  fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), legend.pop("ncol", 99)),
             fontsize=8, frameon=False, bbox_to_anchor=(0.5, below), **legend)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, bottom + below, 1, 1))
  fig.savefig(path, dpi=dpi)
  plt.close(fig)


def _fixed_colours(names: Sequence[str]) -> dict:
  """One colour per name, the same in every panel and figure of a run."""
  return dict(zip(names, _colours(len(names))))


def severity_curves(curves: dict, methods: Sequence[str], path, title: str = "",
                    ylabel: str = "IoU") -> str:
  """One panel per shift, IoU against severity, one line per method (mean
  with its 95 % interval as a bar), as the corruption benchmarks plot.

  ``curves[panel][method] = (severities, mean, half_width)``; ``methods``
  fixes the colours (and the legend's order) across panels.
  """
  panels = list(curves)
  fig, axes = _panel_grid(len(panels), 3.2, 2.6)
  colour = _fixed_colours(methods)
  # Methods that coincide (AdaBN and TENT often do) would hide each other:
  # each gets its own marker and line style and a small offset along x.
  markers, dashes = "osD^vP*X", ["-", "--", "-.", ":"]
  offset = {m: 0.08 * (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}
  for ax, panel in zip(axes.flat, panels):
    for i, method in enumerate(methods):
      if method not in curves[panel]:
        continue
      sev, mean, half = (np.asarray(a, float) for a in curves[panel][method])
      x = sev + offset[method]
      ax.plot(x, mean, marker=markers[i % len(markers)], ls=dashes[i % len(dashes)],
              color=colour[method], label=method, lw=1.2, ms=3.5)
      if np.isfinite(half).any():
        ax.errorbar(x, mean, yerr=half, fmt="none", ecolor=colour[method], elinewidth=0.8,
                    capsize=1.5, alpha=0.7)
    ax.set(title=panel, xlabel="severity", ylabel=ylabel, ylim=(0, 1))
    ax.title.set_fontsize(9)
  _finish_panels(fig, axes, path, title, 0.05, 110,
                 note="bars: 95 % interval over seeds; the methods are offset by a few "
                      "hundredths of a severity step so that coinciding lines stay visible")
  write_json_atomic(f"{_stem(path)}.json", {
      panel: {m: [np.asarray(a, float).tolist() for a in v] for m, v in c.items()}
      for panel, c in curves.items()})
  return path


_SEVERITY = re.compile(r"^(.*\S)\s+(\d+)$")
#: The type size of the block labels above a stream panel (points).
STRIP_FONTSIZE = 7.0


def _runs(values: Sequence) -> list[tuple[int, int]]:
  """(first, last + 1) of every run of equal consecutive ``values``."""
  cuts = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
  return list(zip([0, *cuts], [*cuts, len(values)]))


def _turns(seq: Sequence[int]) -> str:
  """A sequence by its turning points: 1, 2, 3, 2, 1 -> "1→3→1"."""
  keep = [seq[0]] + [b for a, b, c in zip(seq, seq[1:], seq[2:]) if b != a
                     and (b - a) * (c - b) <= 0] + ([seq[-1]] if len(seq) > 1 else [])
  return "→".join(str(v) for v in keep)


def _block_names(names: Sequence[str]) -> dict:
  """How to name a stream's blocks (one name each) in the strip above its
  panel. Names of the form ``"<domain> <int>"`` are read as a domain and
  its severity: a severity the same in every block goes to the caption
  ("each at severity 5"); one that changes within a run of blocks of the
  same domain (the ``"gradual"`` setting) is a ramp: the blocks are shaded
  darker the more severe, the runs named, and the caption gives the walk
  ("each: severity 1→5→1 over its blocks"). Returns ``{"runs": [(first,
  last + 1)] of blocks, "text": a name per run, "caption", "severity": per
  block or None, "ramp": bool}``."""
  parsed = [_SEVERITY.match(str(n)) for n in names]
  severity = [int(m.group(2)) for m in parsed] if all(parsed) else None
  domains = [m.group(1) for m in parsed] if severity else [str(n) for n in names]
  caption, ramp = "", False
  if severity and len(set(severity)) == 1:
    if len(_runs(domains)) == 1:
      domains = [f"{domains[0]}, severity {severity[0]}"] * len(domains)
    else:
      caption = f"each at severity {severity[0]}"
  elif severity:
    walks = [tuple(severity[a:b]) for a, b in _runs(domains)]
    if all(len(set(w)) == 1 for w in walks):  # constant within each domain: name both
      domains = [f"{d} {v}" for d, v in zip(domains, severity)]
    else:
      ramp = True
      caption = (f"each: severity {_turns(walks[0])} over its blocks" if len(set(walks)) == 1
                 else "severity changes within each (darker: more severe)")
  runs = _runs(domains)
  return {"runs": runs, "text": [domains[a] for a, _ in runs], "caption": caption,
          "severity": severity, "ramp": ramp}


def _shade_blocks(ax, spans, batch_size: int, plan: dict | None) -> None:
  """Alternate blocks shaded; for a severity ramp (:func:`_block_names`)
  every block shaded by its severity and a line between runs."""
  if plan is None or not plan["ramp"]:
    for i, (a0, a1) in enumerate(spans):
      if i % 2:
        ax.axvspan(a0 * batch_size, a1 * batch_size, color="0.92", lw=0)
    return
  top = max(max(plan["severity"]), 1)
  for (a0, a1), v in zip(spans, plan["severity"]):  # grey 0.96 (mildest) to 0.72 (most severe)
    ax.axvspan(a0 * batch_size, a1 * batch_size, color=str(round(0.96 - 0.24 * v / top, 3)),
               lw=0)
  for a, _ in plan["runs"][1:]:
    ax.axvline(spans[a][0] * batch_size, color="0.35", lw=0.8)


def _block_strip(ax, spans, batch_size: int, plan: dict) -> dict:
  """Names the blocks of a stream panel in a strip above its plotting area:
  a secondary x axis with a tick label at the centre of each run of equally
  named blocks (``plan`` from :func:`_block_names`), horizontal where every
  name fits its run at the axes' present width, else upright, else one run
  in k named; the caption above them. Returns ``{"ticks", "text",
  "caption", "rotation"}``."""
  from matplotlib.textpath import TextPath

  runs, text, caption = plan["runs"], list(plan["text"]), plan["caption"]
  total = spans[-1][1] - spans[0][0]
  width_pt = ax.get_position().width * ax.figure.get_figwidth() * 72
  room = [(spans[b - 1][1] - spans[a][0]) / total * width_pt for a, b in runs]
  centres = [(spans[a][0] + spans[b - 1][1]) / 2 * batch_size for a, b in runs]
  wide = [TextPath((0, 0), t, size=STRIP_FONTSIZE).get_extents().width + 4 for t in text]
  rotation, every = 0, 1
  if any(w > r for w, r in zip(wide, room)):
    rotation = 90
    every = max(1, int(np.ceil(STRIP_FONTSIZE * 1.4 / min(room))))
  if every > 1:
    centres, text = centres[::every], text[::every]
    caption = "; ".join(filter(None, [caption, f"one label in {every}"]))
  strip = ax.secondary_xaxis("top")
  strip.set_xticks(centres, text, fontsize=STRIP_FONTSIZE, rotation=rotation, color="0.15")
  strip.set_xticks([spans[a][0] * batch_size for a, _ in runs[1:]], minor=True)
  # Ticks between the runs; the names start above them.
  strip.tick_params(which="minor", length=4, width=0.8, color="0.35")
  strip.tick_params(which="major", length=0, pad=5 if len(runs) > 1 else 2)
  if caption:
    strip.set_xlabel(caption, fontsize=STRIP_FONTSIZE, color="0.15", labelpad=3)
  return {"ticks": centres, "text": text, "caption": caption, "rotation": rotation}


def stream_curves(panels: dict, methods: Sequence[str], blocks: dict, batch_size: int, path,
                  title: str = "", window_images: int = 32, ylabel: str = "online IoU",
                  labels: dict | None = None) -> str:
  """One panel per stream (setting): each method's per-step score against
  the images seen, as a moving average over about ``window_images`` images,
  one colour per method in every panel; the stream's blocks (domain
  segments, ``blocks[panel]`` int[T]) shaded alternately.

  ``panels[panel][method]`` is float[T] (one value per batch of
  ``batch_size`` images); ``labels[panel]`` optionally names each block
  (one name per block, e.g. ``"contrast 3"``): the names go in a strip
  above the panel, one at the centre of each run of equally named blocks,
  thinned where too many to read; a severity walk within a domain (the
  ``"gradual"`` setting) is shaded and spelled out in the strip's caption
  (how they are grouped into shifts and severities). The raw values and the labels go beside the
  figure as JSON.
  """
  names = list(panels)
  labels = {n: list(v) for n, v in (labels or {}).items() if v is not None}
  fig, axes = _panel_grid(len(names), 3.6, 3.1 if labels else 2.6)
  colour = _fixed_colours(methods)
  window = max(1, window_images // max(batch_size, 1))
  strips, ramps = [], False
  for ax, name in zip(axes.flat, names):
    block = np.asarray(blocks[name])
    edges = np.flatnonzero(np.diff(block)) + 1
    spans = list(zip(np.r_[0, edges].tolist(), np.r_[edges, len(block)].tolist()))
    plan = None
    if name in labels:
      if len(labels[name]) != len(spans):
        raise ValueError(f"labels[{name!r}] names {len(labels[name])} blocks; the panel has "
                         f"{len(spans)}")
      plan = _block_names(labels[name])
      strips.append((ax, spans, plan))
      ramps |= plan["ramp"]
    _shade_blocks(ax, spans, batch_size, plan)
    for method in methods:
      if method not in panels[name]:
        continue
      y = np.asarray(panels[name][method], float)
      smooth = np.convolve(y, np.ones(window) / window, mode="valid") if len(y) >= window else y
      x = (np.arange(len(smooth)) + window) * batch_size
      ax.plot(x, smooth, color=colour[method], label=method, lw=1.1)
    ax.set(title=name, xlabel="images seen", ylabel=ylabel, ylim=(0, 1),
           xlim=(0, len(block) * batch_size))
    ax.title.set_fontsize(9)
  if strips:
    fig.tight_layout()  # the panels' widths, which the strips' labels must fit
    for ax, spans, plan in strips:
      _block_strip(ax, spans, batch_size, plan)
  note = "shaded: alternate blocks of the stream (one domain each)" + (
      (", named above each panel" if len(strips) == len(names) else ", named above the panel")
      if strips else "")
  note += f"; lines: moving averages over {window * batch_size} images"
  if ramps:
    note += ("\nwhere the severity changes within a domain (e.g. gradual): darker = more "
             "severe, a vertical line between domains")
  _finish_panels(fig, axes, path, title, 0.07, 110, ncol=5, note=note)
  numbers = {"batch_size": batch_size,
             "blocks": {n: np.asarray(b).tolist() for n, b in blocks.items()},
             "per_step": {n: {m: np.asarray(v, float).tolist() for m, v in c.items()}
                          for n, c in panels.items()}}
  if labels:
    numbers["labels"] = {n: [str(s) for s in v] for n, v in labels.items()}
  write_json_atomic(f"{_stem(path)}.json", numbers)
  return path


def labelled_heatmap(matrix, rows: Sequence[str], cols: Sequence[str], path, title: str = "",
                     label: str = "IoU", corner: str = "row \\ column", lo: float = 0.0,
                     hi: float = 1.0, cmap: str = "viridis") -> str:
  """One heatmap with every value written in its cell (NaN cells blank),
  labelled rows and columns; the numbers beside it as CSV."""
  plt = _plt()
  matrix = np.asarray(matrix, float)
  fig, ax = plt.subplots(figsize=(0.7 * len(cols) + 2.5, 0.45 * len(rows) + 1.8))
  im = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
  ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  for i in range(matrix.shape[0]):
    for j in range(matrix.shape[1]):
      if np.isfinite(matrix[i, j]):
        frac = (matrix[i, j] - lo) / (hi - lo)
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=6,
                color="w" if (frac < 0.5 if cmap == "viridis" else abs(frac - 0.5) > 0.3)
                else "k")
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=label)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  _write_matrix_csv(f"{_stem(path)}.csv", matrix, rows, cols, corner)
  return path


def winner_grid(winners: Sequence[Sequence[str]], margins, rows: Sequence[str],
                cols: Sequence[str], methods: Sequence[str], path, title: str = "") -> str:
  """Which method wins each cell: cells coloured by the winning method
  (colours as :func:`severity_curves`), its margin over the runner-up written in."""
  plt = _plt()
  from matplotlib.colors import ListedColormap
  from matplotlib.patches import Patch

  colour = _fixed_colours(methods)
  index = {m: i for i, m in enumerate(methods)}
  codes = np.array([[index.get(w, np.nan) if w else np.nan for w in r] for r in winners], float)
  fig, ax = plt.subplots(figsize=(0.8 * len(cols) + 3.5, 0.45 * len(rows) + 1.8))
  ax.imshow(np.ma.masked_invalid(codes), cmap=ListedColormap([colour[m] for m in methods]),
            vmin=-0.5, vmax=len(methods) - 0.5, aspect="auto")
  margins = np.asarray(margins, float)
  for i in range(len(rows)):
    for j in range(len(cols)):
      if winners[i][j]:
        ax.text(j, i, f"+{margins[i, j]:.2f}", ha="center", va="center", fontsize=6)
  ax.set_xticks(range(len(cols)), cols, fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  ax.legend(handles=[Patch(color=colour[m], label=m) for m in methods], fontsize=7,
            bbox_to_anchor=(1.02, 1), loc="upper left", frameon=False)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  write_json_atomic(f"{_stem(path)}.json", {"rows": list(rows), "cols": list(cols),
                                            "winners": [list(r) for r in winners],
                                            "margins": np.where(np.isnan(margins), None,
                                                                margins).tolist()})
  return path


def _symlog_axis(ax, x) -> str:
  """A symmetric-log x axis for non-negative, heavy-tailed values: linear
  below the smallest positive value (zeros kept), ticks at 0 and at the
  decades from three times that on, so that 0 and the first decade never
  print over each other. Returns the axis-label suffix."""
  from matplotlib import ticker

  positive = x[x > 0]
  threshold = float(np.min(positive)) if len(positive) else 1.0
  ax.set_xscale("symlog", linthresh=threshold, linscale=0.6)
  if len(x) and x.min() >= 0:
    ax.set_xlim(left=0)
    top = float(np.max(x)) if len(x) else 1.0
    # Decades from 3x the linear threshold on: at least a decade of axis from 0.
    first = int(np.ceil(np.log10(threshold * 3)))
    decades = [10.0 ** k for k in range(first, int(np.floor(np.log10(max(top, threshold)))) + 1)]
    ax.set_xticks([0.0] + decades)
    ax.xaxis.set_minor_locator(ticker.NullLocator())
  return f" (log scale, linear below {threshold:.2g})"


def predictor_scatter(panels: dict, groups: Sequence[str], path, title: str = "",
                      ylabel: str = "gain", note: str = "") -> str:
  """One panel per predictor: an outcome against the predictor, one point per
  row coloured by its group (the same colours in every panel), a fitted
  monotone step drawn as a line, held-out predictions as black crosses.

  ``panels[name] = {"x", "y", "group", "heldout" (or None), "fit": (edges,
  values) (or None), "note", "xscale" (optional, e.g. "symlog" for
  heavy-tailed distances)}``; the numbers go beside the figure as JSON;
  ``note`` is printed below the legend.
  """
  names = list(panels)
  fig, axes = _panel_grid(len(names), 3.3, 2.7)
  colour = _fixed_colours(groups)
  for ax, name in zip(axes.flat, names):
    p = panels[name]
    x, y = np.asarray(p["x"], float), np.asarray(p["y"], float)
    g = np.asarray(p["group"])
    for group in groups:
      m = g == group
      if m.any():
        ax.scatter(x[m], y[m], s=7, color=colour[group], alpha=0.7, lw=0, label=group)
    if p.get("heldout") is not None:
      ax.scatter(x, np.asarray(p["heldout"], float), s=9, marker="x", color="k", lw=0.6,
                 label="a row's predicted gain, fitted without its group")
    if p.get("fit") is not None:
      edges, values = (np.asarray(a, float) for a in p["fit"])
      ax.step(edges, values, where="pre", color="0.3", lw=1.2, label="fit on every row")
    ax.axhline(0.0, color="0.6", lw=0.6, ls=":")
    suffix = _symlog_axis(ax, x) if p.get("xscale") == "symlog" else ""
    ax.set_xlabel(name + suffix, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(p.get("note", ""), fontsize=8)
  _finish_panels(fig, axes, path, title, 0.06, 100, note=note, ncol=6, markerscale=2)
  write_json_atomic(f"{_stem(path)}.json", {
      n: {k: (v if isinstance(v, str) else np.asarray(v).tolist()) for k, v in p.items()}
      for n, p in panels.items()})
  return path


def image_grid(images, rows: Sequence[str], cols: Sequence[str], path, title: str = "",
               lo: float = 0.0, hi: float = 1.0) -> str:
  """Images in a labelled grid (``images[i][j]``: float[H, W] or [H, W, 1],
  grey from ``lo`` to ``hi``; row labels on the left, column titles on top);
  beside it a JSON of each image's mean, standard deviation and range."""
  plt = _plt()
  if len(images) != len(rows) or any(len(r) != len(cols) for r in images):
    raise ValueError(f"images must be {len(rows)} rows of {len(cols)} images (rows x cols), "
                     f"got {[len(r) for r in images]}")
  fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols) + 0.6,
                                                          1.6 * len(rows) + 0.6), squeeze=False)
  stats = []
  for i, r in enumerate(images):
    stats.append([])
    for j, img in enumerate(r):
      a = np.asarray(img, float)
      a = a[..., 0] if a.ndim == 3 else a
      ax = axes[i, j]
      ax.imshow(a, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(cols[j], fontsize=7)
      if j == 0:
        ax.set_ylabel(rows[i], fontsize=7)
      stats[-1].append({"mean": float(a.mean()), "std": float(a.std()),
                        "min": float(a.min()), "max": float(a.max())})
  if title:
    fig.suptitle(title, fontsize=9)
  # leave the title a strip of its own above the column titles
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()) if title else None)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  write_json_atomic(f"{_stem(path)}.json", {"rows": list(rows), "cols": list(cols),
                                            "pixels": stats})
  return path
