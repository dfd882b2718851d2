"""Small statistics for relating predictors to outcomes (NumPy only).

Rank correlations with average ranks for ties (as ``scipy.stats.spearmanr``),
Kendall's tau-b, percentile-bootstrap intervals computed for all resamples at
once, an isotonic (pool-adjacent-violators) fit for held-out prediction, and
leave-one-group-out folds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["pearson", "spearman", "kendall", "ranks", "bootstrap_ci", "isotonic_fit", "Step",
           "group_folds", "t_interval", "constant_dims",
           "difference_text"]

# Two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1..30
# (standard tables, e.g. NIST/SEMATECH e-Handbook of Statistical Methods, 1.3.6.7.2);
# beyond 30 the expansion of Abramowitz & Stegun 26.7.5 in 1/df (error < 1e-4).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def ranks(a) -> np.ndarray:
  """Ranks from 0 along the last axis; tied values share their mean rank."""
  a = np.asarray(a, float)
  if a.ndim == 1:
    s = np.sort(a)
    return (np.searchsorted(s, a, "left") + np.searchsorted(s, a, "right") - 1) / 2
  return np.stack([ranks(r) for r in a.reshape(-1, a.shape[-1])]).reshape(a.shape)


def pearson(x, y) -> np.ndarray | float:
  """Pearson correlation along the last axis (NaN where either side is constant
  or there are fewer than 3 points)."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  xc = x - x.mean(-1, keepdims=True)
  yc = y - y.mean(-1, keepdims=True)
  den = np.sqrt((xc**2).sum(-1) * (yc**2).sum(-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    r = np.where((den > 0) & (x.shape[-1] >= 3), (xc * yc).sum(-1) / np.where(den > 0, den, 1), np.nan)
  return float(r) if r.ndim == 0 else r


def spearman(x, y) -> np.ndarray | float:
  """Spearman rank correlation along the last axis."""
  return pearson(ranks(x), ranks(y))


def _finite(x, y) -> None:
  if not (np.isfinite(x).all() and np.isfinite(y).all()):
    raise ValueError("x and y must be finite (drop the NaN pairs first)")


def kendall(x, y) -> np.ndarray | float:
  """Kendall's tau-b along the last axis (ties as ``scipy.stats.kendalltau``):
  (concordant - discordant) / sqrt(pairs untied in x * pairs untied in y);
  NaN where either side is constant or there are fewer than 2 points. O(n^2)
  per row, rows taken in chunks."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  _finite(x, y)
  n = x.shape[-1]
  xs, ys = x.reshape(-1, n), y.reshape(-1, n)
  out = np.empty(len(xs))
  chunk = max(1, 2_000_000 // max(n * n, 1))
  for i in range(0, len(xs), chunk):
    sx = np.sign(xs[i:i + chunk, :, None] - xs[i:i + chunk, None, :]).astype(np.int8)
    sy = np.sign(ys[i:i + chunk, :, None] - ys[i:i + chunk, None, :]).astype(np.int8)
    num = np.einsum("bij,bij->b", sx, sy, dtype=np.int64)
    den = np.sqrt(np.abs(sx).sum((1, 2), dtype=np.int64).astype(float)
                  * np.abs(sy).sum((1, 2), dtype=np.int64))
    with np.errstate(invalid="ignore", divide="ignore"):
      out[i:i + chunk] = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
  r = out.reshape(x.shape[:-1])
  return float(r) if r.ndim == 0 else r


def bootstrap_ci(fn, x, y, n: int, rng: np.random.Generator, level: float = 0.95) -> list[float]:
  """Percentile bootstrap interval of ``fn(x, y)`` (``fn`` works along the
  last axis, as :func:`pearson` and :func:`spearman`): ``n`` resamples of the
  pairs with replacement, evaluated together; NaN resamples are dropped.
  :func:`kendall` is evaluated from each resample's counts instead (the same
  values, one O(n^2) pass for all resamples)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}")
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
    raise ValueError(f"x and y must be 1-D with the same length >= 2, got {x.shape} and {y.shape}")
  idx = rng.integers(0, len(x), (n, len(x)))
  vals = np.asarray(_kendall_of_resamples(x, y, idx) if fn is kendall else fn(x[idx], y[idx]))
  vals = vals[np.isfinite(vals)]
  if not len(vals):
    return [float("nan"), float("nan")]
  tail = 100 * (1 - level) / 2
  return [float(np.percentile(vals, tail)), float(np.percentile(vals, 100 - tail))]


@dataclasses.dataclass(frozen=True)
class Step:
  """A monotone step function: ``t`` gets the value of the first block whose
  largest x (``edges``, ascending) is >= t, the last block's beyond;
  ``increasing`` is the direction it was fitted in."""

  edges: tuple[float, ...]
  values: tuple[float, ...]
  increasing: bool = True

  def __call__(self, t):
    edges, values = np.asarray(self.edges), np.asarray(self.values)
    idx = np.clip(np.searchsorted(edges, np.asarray(t, float), side="left"), 0, len(values) - 1)
    return values[idx]


def _kendall_of_resamples(x, y, idx) -> np.ndarray:
  """``kendall(x[idx], y[idx])`` row by row, from each resample's counts ``w``:
  a pair of copies has sign 0 on both sides, so with S = sign(x_i - x_j) the
  tau-b of a resample is w'(Sx Sy)w / sqrt(w'|Sx|w w'|Sy|w) (O(n^2) once,
  then one product per resample)."""
  _finite(x, y)
  n = len(x)
  w = np.zeros((len(idx), n))
  np.add.at(w, (np.repeat(np.arange(len(idx)), n), idx.ravel()), 1.0)
  sx, sy = np.sign(x[:, None] - x[None, :]), np.sign(y[:, None] - y[None, :])
  quad = lambda m: np.einsum("bi,bi->b", w @ m, w)
  num, den = quad(sx * sy), np.sqrt(quad(np.abs(sx)) * quad(np.abs(sy)))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def isotonic_fit(x, y, increasing: bool | None = True) -> Step:
  """Pool-adjacent-violators: the monotone step function closest to y (least
  squares) over x (a new point: see :class:`Step`). ``increasing=None``
  takes the direction of the data: decreasing iff the Spearman correlation
  of x and y is negative."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  if x.shape != y.shape or x.ndim != 1 or not len(x):
    raise ValueError(f"x and y must be non-empty 1-D arrays of the same length, got {x.shape}, {y.shape}")
  _finite(x, y)
  if increasing is None:
    rho = spearman(x, y)
    increasing = not (np.isfinite(rho) and rho < 0)
  sign = 1 if increasing else -1
  order = np.argsort(x, kind="mergesort")
  xs, ys = x[order], y[order] * sign
  blocks = []  # [sum, count, x_max]
  for xi, yi in zip(xs, ys):
    blocks.append([yi, 1, xi])
    while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
      s, c, xm = blocks.pop()
      blocks[-1][0] += s
      blocks[-1][1] += c
      blocks[-1][2] = xm
  return Step(tuple(float(b[2]) for b in blocks), tuple(float(sign * b[0] / b[1]) for b in blocks),
              bool(increasing))


def group_folds(groups) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """Leave one group out: for every distinct group (sorted), ``(group,
  train indices, test indices)``; no group is ever on both sides, and every
  index is tested exactly once. Needs at least two groups."""
  groups = np.asarray([str(g) for g in groups])
  names = sorted(set(groups.tolist()))
  if len(names) < 2:
    raise ValueError(f"groups must hold at least 2 distinct values to hold one out, got {names}")
  return [(g, np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in names]


def t_interval(values, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
  """(mean, half-width) of the 95 % Student-t interval of the mean along
  ``axis``: ``t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard
  deviation; the half-width is NaN for fewer than 2 values."""
  values = np.asarray(values, float)
  n = values.shape[axis]
  mean = values.mean(axis)
  if n < 2:
    return mean, np.full_like(mean, np.nan)
  df = n - 1
  z = 1.959964
  t = (_T975[df - 1] if df <= len(_T975) else
       z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2))
  return mean, t * values.std(axis, ddof=1) / np.sqrt(n)


def constant_dims(x, tol: float = 1e-6) -> np.ndarray:
  """bool[D]: the columns of ``x: [N, D]`` whose values are all equal
  (max - min <= ``tol`` x (1 + abs(mean))), all-zero ReLU outputs included."""
  x = np.asarray(x, np.float64)
  return (x.max(0) - x.min(0)) <= tol * (1 + np.abs(x.mean(0)))


def difference_text(mean: float, half: float, digits: int = 3) -> str:
  """``"+0.012 ± 0.004"`` for a difference and the half-width of its
  interval (``"+0.012"`` when the half-width is not finite), in Markdown bold
  when the whole interval lies below 0 (a sure loss)."""
  text = f"{mean:+.{digits}f}" + (f" ± {half:.{digits}f}" if np.isfinite(half) else "")
  return f"**{text}**" if np.isfinite(half) and mean + half < 0 else text
