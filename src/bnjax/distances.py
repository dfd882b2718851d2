"""Distances between two samples of feature vectors ``x: [n, d]``, ``y: [m, d]``.

Every function states its formula and whether it returns a squared quantity.
Inputs are float32 unless ``dtype=jnp.float64`` is asked for, which runs the
computation inside ``jax.enable_x64(True)`` (never a global switch: a global
x64 breaks ott-jax's Sinkhorn on float32 inputs).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import _checks
from bnjax._modules import layer_stats

__all__ = ["frechet", "frechet_from_moments", "gaussian_moments", "source_normalized_frechet", "sliced_wasserstein", "sort_floats", "subsample", "bhattacharyya", "histogram_bhattacharyya", "mmd", "sinkhorn", "overlap_coefficient", "diag_w2", "diag_bhattacharyya"]


def _pair(x, y, name="x, y"):
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"{name} must be [n, d] and [m, d] with the same d, got {x.shape} and {y.shape}")
  if x.shape[0] < 2 or y.shape[0] < 2:
    raise ValueError(f"{name} need at least 2 samples each, got {x.shape[0]} and {y.shape[0]}")
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
    raise ValueError(f"{name} contain NaN or infinite values")
  return x, y


def _check_dtype(dtype):
  """The computation dtype: float32 (default) or float64, else ValueError."""
  dtype = jnp.dtype(dtype or jnp.float32)
  if dtype not in (jnp.float32, jnp.float64):
    raise ValueError(f"dtype must be float32 or float64, got {dtype}")
  return dtype


def _in_dtype(fn, dtype, *arrays):
  dtype = _check_dtype(dtype)
  if dtype == jnp.float64:
    with jax.enable_x64(True):
      return float(fn(*[jnp.asarray(a, jnp.float64) for a in arrays]))
  return float(fn(*[jnp.asarray(a, jnp.float32) for a in arrays]))


def gaussian_moments(x):
  """Mean and unbiased covariance of ``x: [n, d]``."""
  mu = jnp.mean(x, axis=0)
  xc = x - mu
  return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(s):
  w, v = jnp.linalg.eigh((s + s.T) / 2)
  return (v * jnp.sqrt(jnp.clip(w, 0))) @ v.T


def frechet_from_moments(mu1, s1, mu2, s2):
  """Gaussian W2²: ‖mu1 - mu2‖² + tr S1 + tr S2 - 2 tr (S1^½ S2 S1^½)^½.

  The symmetric form (:cite:t:`dowson1982frechet`; :cite:t:`heusel2017fid` use the
  non-symmetric sqrtm(S1 S2), whose SciPy value turns complex in high
  dimension). The trace term is Σ_i sqrt(λ_i) over the eigenvalues of the
  symmetric PSD matrix Lᵀ S2 L, with S1 = L Lᵀ (Cholesky): it is similar to
  S1 S2 and has the eigenvalues of S1^½ S2 S1^½. Where S1 is singular (the
  Cholesky factor is not finite), S1^½ is taken by ``eigh`` with eigenvalues
  clipped at 0 instead. Eigenvalues are clipped at 0, so the result is real
  and non-negative up to rounding. Squared. Jittable and vmappable.
  """
  l = jnp.linalg.cholesky((s1 + s1.T) / 2)

  def via_cholesky(_):
    return l.T @ s2 @ l

  def via_eigh(_):
    r = _psd_sqrt(s1)
    return r @ s2 @ r

  m = jax.lax.cond(jnp.all(jnp.isfinite(l)), via_cholesky, via_eigh, None)
  ev = jnp.clip(jnp.linalg.eigvalsh((m + m.T) / 2), 0)
  return jnp.sum((mu1 - mu2) ** 2) + jnp.trace(s1) + jnp.trace(s2) - 2 * jnp.sum(jnp.sqrt(ev))


def _host_moments(x, dtype):
  """Mean and unbiased covariance with NumPy: on a CPU backend its BLAS
  computes the [d, d] cross-product 2.7x faster than XLA:CPU in float64
  (16 000 x 1024: 0.21 s vs 0.56 s; benchmarks/frechet.py)."""
  x = np.asarray(x, dtype)
  mu = x.mean(0)
  xc = x - mu
  return mu, xc.T @ xc / (x.shape[0] - 1)


def _host_frechet_from_moments(mu1, s1, mu2, s2):
  """:func:`frechet_from_moments` with NumPy's LAPACK (same formula and
  fallback): on a CPU backend it is 2x faster than XLA:CPU's eigvalsh, and
  it does not contend with NumPy's BLAS threads left spinning by the moments."""
  sym = lambda a: (a + a.T) / 2
  try:
    l = np.linalg.cholesky(sym(s1))
    m = l.T @ s2 @ l
  except np.linalg.LinAlgError:
    w, v = np.linalg.eigh(sym(s1))
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
  ev = np.clip(np.linalg.eigvalsh(sym(m)), 0, None)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(ev)))


def _frechet(x, y, dtype=None):
  """W2² of the Gaussians fitted to x and y: with NumPy on a CPU backend
  (its BLAS/LAPACK are 2-3x faster than XLA:CPU's in float64 here), with the
  jitted :func:`frechet_from_moments` on the device otherwise."""
  if jax.default_backend() == "cpu":
    np_dtype = np.dtype(_check_dtype(dtype))
    return _host_frechet_from_moments(*_host_moments(x, np_dtype), *_host_moments(y, np_dtype))
  return _in_dtype(_frechet_device, dtype, x, y)


@jax.jit
def _frechet_device(x, y):
  return frechet_from_moments(*gaussian_moments(x), *gaussian_moments(y))


def frechet(x, y, bias_correction: bool = False, *, dtype=None, key=None,
            n_points: int = 10) -> float:
  """Fréchet ("FID") distance, the W2² between Gaussians fitted to x and y. Squared.

  Its plug-in estimate is biased upward in high dimension: for two
  independent 16 000 x 1024 standard normal samples it is about 33, not 0.
  With ``bias_correction=True`` it is extrapolated to infinite sample size as
  in Chong & Forsyth 2020 ("Effectively Unbiased FID", FID_∞): the distance
  on ``n_points`` random subsets of sizes from n/5 to n (drawn with ``key``,
  default key 0) is fitted by least squares as a line in 1/n and the intercept
  returned (it can be slightly negative).
  """
  x, y = _pair(x, y)
  if not bias_correction:
    return _frechet(x, y, dtype)
  if n_points < 2:
    raise ValueError(f"n_points must be >= 2, got {n_points}")
  key = jax.random.key(0) if key is None else key
  n = min(x.shape[0], y.shape[0])
  sizes = np.unique(np.linspace(max(n // 5, x.shape[1] // 4, 2), n, n_points).astype(int))
  values = []
  for i, size in enumerate(sizes):
    kx, ky = jax.random.split(jax.random.fold_in(key, i))
    ix = np.asarray(jax.random.permutation(kx, x.shape[0]))[:size]
    iy = np.asarray(jax.random.permutation(ky, y.shape[0]))[:size]
    values.append(_frechet(x[ix], y[iy], dtype))
  slope, intercept = np.polyfit(1.0 / sizes, values, 1)
  return float(intercept)


def source_normalized_frechet(x, y, *, rcond: float = 1e-6, dtype=None) -> float:
  """Fréchet distance after whitening both samples with the source (x) moments.

  With S_x^{-½} the pseudo-inverse square root of the source covariance
  (eigh, eigenvalues below ``rcond`` x the largest dropped), x' = S_x^{-½}(x - mu_x),
  y' = S_x^{-½}(y - mu_x); the result is W2² between the Gaussians of x' and y'
  = ‖S_x^{-½}(mu_y - mu_x)‖² + r + tr T - 2 tr T^½ with T = S_x^{-½} S_y S_x^{-½}
  and r the rank of S_x: a Mahalanobis-type distance in units of the source
  spread, insensitive to the overall scale of the features. Squared.
  """
  x, y = _pair(x, y)

  def fn(x, y):
    mu1, s1 = gaussian_moments(x)
    mu2, s2 = gaussian_moments(y)
    w, v = jnp.linalg.eigh((s1 + s1.T) / 2)
    keep = w > rcond * jnp.max(w)
    inv_sqrt = (v * jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, w, 1)), 0)) @ v.T
    t = inv_sqrt @ s2 @ inv_sqrt
    proj = (v * keep) @ v.T
    return frechet_from_moments(jnp.zeros_like(mu1), proj, inv_sqrt @ (mu2 - mu1), t)

  return _in_dtype(fn, dtype, x, y)


def sliced_wasserstein(x, y, *, key=None, n_proj: int = 200, projections=None,
                       dtype=None) -> float:
  """Sliced Wasserstein distance SW₂ = sqrt(mean over directions θ of
  W2²(θᵀx, θᵀy)), NOT squared: the convention of POT's
  ``ot.sliced_wasserstein_distance`` (Rabin et al. 2011; :cite:t:`bonneel2015sliced`).

  One-dimensional W2² between the empirical measures is exact for any n, m
  (quantile functions integrated over the union of their steps). Directions
  are ``projections`` (a [d, P] array of unit columns: deterministic), else
  ``n_proj`` uniform directions drawn with ``key`` (default key 0).
  """
  x, y = _pair(x, y)
  d = x.shape[1]
  if projections is None:
    if n_proj < 1:
      raise ValueError(f"n_proj must be >= 1, got {n_proj}")
    z = np.asarray(jax.random.normal(jax.random.key(0) if key is None else key, (d, n_proj)))
    projections = z / np.linalg.norm(z, axis=0, keepdims=True)
  projections = np.asarray(projections)
  if projections.ndim != 2 or projections.shape[0] != d:
    raise ValueError(f"projections must be [d={d}, P], got {projections.shape}")
  if not np.allclose(np.linalg.norm(projections, axis=0), 1, atol=1e-4):
    raise ValueError("projections must have unit-norm columns")
  return math.sqrt(max(_in_dtype(_sw2, dtype, x, y, projections), 0.0))


def _flip_negative(i):
  """Reverse the order of the negative integers among themselves (an involution)."""
  return jnp.where(i < 0, i ^ jnp.array(jnp.iinfo(i.dtype).max, i.dtype), i)


def sort_floats(x, axis=-1):
  """``jnp.sort`` for NaN-free floats, by sorting order-preserving integer keys.

  IEEE floats of one sign order like their bit patterns read as signed
  integers, negative ones in reverse; flipping the magnitude bits of the
  negative ones gives integers in the floats' order. XLA:CPU sorts int32
  about 6x faster than float32, whose comparator also orders NaNs and signed
  zeros (200 x 80 000 values: 0.6 s vs 3.3 s; ``benchmarks/sliced_wasserstein.py``).
  Same values as ``jnp.sort`` (tested), except that -0.0 sorts before +0.0.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float array, got dtype {x.dtype}")
  itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
  keys = _flip_negative(jax.lax.bitcast_convert_type(x, itype))
  return jax.lax.bitcast_convert_type(_flip_negative(jnp.sort(keys, axis=axis)), x.dtype)


@jax.jit
def _sw2(x, y, theta):
  # x @ theta, materialised, then transposed: XLA:CPU fuses a transposed
  # product (theta.T @ x.T) into a GEMM 4x slower than the plain one, and
  # sorts rows of [P, n] 2x faster than columns of [n, P]
  # (benchmarks/sliced_wasserstein.py).
  px, py = jax.lax.optimization_barrier((x @ theta, y @ theta))
  px, py = jax.lax.optimization_barrier((px.T, py.T))
  px, py = sort_floats(px, axis=1), sort_floats(py, axis=1)  # [P, n], [P, m]
  n, m = px.shape[1], py.shape[1]
  if n == m:
    return jnp.mean(jnp.mean((px - py) ** 2, axis=1))
  levels = jnp.sort(jnp.concatenate([jnp.arange(1, n + 1) / n, jnp.arange(1, m + 1) / m]))
  widths = jnp.diff(levels, prepend=0.0)
  mid = levels - widths / 2
  ix = jnp.clip(jnp.floor(mid * n).astype(jnp.int32), 0, n - 1)
  iy = jnp.clip(jnp.floor(mid * m).astype(jnp.int32), 0, m - 1)
  return jnp.mean(jnp.sum(widths * (px[:, ix] - py[:, iy]) ** 2, axis=1))


def bhattacharyya(x, y, *, ridge: float = 1e-6, dtype=None) -> float:
  """Bhattacharyya distance between Gaussians fitted to x and y:
  (1/8) Δμᵀ S⁻¹ Δμ + (1/2) ln(det S / sqrt(det S1 det S2)), S = (S1 + S2)/2
  (Bhattacharyya 1943; Fukunaga 1990, eq. 3.152). ``ridge`` x mean variance is
  added to every diagonal so that collapsed (constant) features do not make
  the determinants vanish. Not a squared quantity; 0 for identical Gaussians.
  """
  x, y = _pair(x, y)

  def fn(x, y):
    mu1, s1 = gaussian_moments(x)
    mu2, s2 = gaussian_moments(y)
    eye = jnp.eye(s1.shape[0]) * ridge * (jnp.trace(s1) + jnp.trace(s2)) / (2 * s1.shape[0])
    s1, s2 = s1 + eye, s2 + eye
    s = (s1 + s2) / 2
    dm = mu1 - mu2
    maha = dm @ jnp.linalg.solve(s, dm)
    logdet = lambda a: jnp.linalg.slogdet(a)[1]
    return maha / 8 + 0.5 * (logdet(s) - 0.5 * (logdet(s1) + logdet(s2)))

  return _in_dtype(fn, dtype, x, y)


def histogram_bhattacharyya(x, y, bins: int = 64) -> float:
  """Mean over dimensions of -ln Σ_b sqrt(p_b q_b), with p, q the histograms of
  one dimension of x and y on shared equal-width bins over their joint range
  (the study's per-dimension variant). Dimensions constant in both samples
  count as identical (0)."""
  x, y = _pair(x, y)
  if bins < 2:
    raise ValueError(f"bins must be >= 2, got {bins}")
  out = []
  for j in range(x.shape[1]):
    lo, hi = min(x[:, j].min(), y[:, j].min()), max(x[:, j].max(), y[:, j].max())
    if hi <= lo:
      out.append(0.0)
      continue
    p, _ = np.histogram(x[:, j], bins=bins, range=(lo, hi))
    q, _ = np.histogram(y[:, j], bins=bins, range=(lo, hi))
    bc = np.sum(np.sqrt(p / p.sum() * q / q.sum()))
    out.append(float(-np.log(max(bc, 1e-300))))
  return float(np.mean(out))


def _median_distance(z) -> float:
  """The median of the nonzero pairwise distances of the rows of ``z`` (1.0
  when there are none: collapsed features)."""
  sq = (z * z).sum(1)
  d2 = np.maximum(sq[:, None] + sq[None] - 2 * z @ z.T, 0)[np.triu_indices(len(z), 1)]
  d2 = d2[d2 > 0]
  return float(np.sqrt(np.median(d2))) if len(d2) else 1.0


def mmd(x, y, bandwidth: float | None = None, *, dtype=None) -> float:
  """Unbiased squared MMD with the RBF kernel k(a, b) = exp(-‖a - b‖² / (2 h²))
  (:cite:t:`gretton2012mmd`, eq. 3): mean off-diagonal k(x, x') + mean off-diagonal
  k(y, y') - 2 mean k(x, y). ``bandwidth`` h defaults to the median nonzero
  pairwise distance of the pooled sample (up to 500 rows of each side; 1
  when every row is the same point, where the MMD is 0 for any h).
  Squared; can be slightly negative."""
  x, y = _pair(x, y)
  if bandwidth is None:
    bandwidth = _median_distance(np.concatenate([x[:500], y[:500]]).astype(np.float64))
  if not bandwidth > 0:
    raise ValueError(f"bandwidth must be > 0, got {bandwidth}")

  def fn(x, y):
    def k(a, b):
      d2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None] - 2 * a @ b.T
      return jnp.exp(-jnp.maximum(d2, 0) / (2 * bandwidth**2))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy = k(x, x), k(y, y)
    return ((jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
            + (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1)) - 2 * jnp.mean(k(x, y)))

  return _in_dtype(fn, dtype, x, y)


def subsample(x, n: int, key) -> np.ndarray:
  """``n`` rows of ``x`` drawn at random without replacement with ``key`` (the
  first ``n`` of a permutation), or ``x`` itself when it has at most ``n``."""
  n = _checks.positive_int("n", n)
  return x if x.shape[0] <= n else x[np.asarray(jax.random.permutation(key, x.shape[0]))[:n]]


def sinkhorn(x, y, epsilon: float | None = None, *, max_points: int = 4096, key=None) -> float:
  """Debiased Sinkhorn divergence with squared Euclidean cost (Genevay et al.
  2018; Feydy et al. 2019): OT_ε(x, y) - (OT_ε(x, x) + OT_ε(y, y)) / 2, through
  ott-jax (dense ``PointCloud`` geometry). ``epsilon`` defaults to 5 % of the
  mean squared distance between points of the pooled sample (0 is returned
  when that is 0: all points equal). Samples larger than ``max_points`` are subsampled at
  random with ``key`` (ott's online mode, which would avoid that, fails with
  jax >= 0.9). Squared-cost units."""
  x, y = _pair(x, y)
  key = jax.random.key(0) if key is None else key
  kx, ky = jax.random.split(key)
  x, y = subsample(x, max_points, kx), subsample(y, max_points, ky)
  x, y = x.astype(np.float32), y.astype(np.float32)
  if epsilon is None:
    # ott's own default, 5 % of the mean cost, computed here so that a zero
    # cost (e.g. collapsed features, all equal) never becomes epsilon = 0.
    xy = np.concatenate([x, y])
    mean_cost = 2 * xy.var(0).sum() * len(xy) / max(len(xy) - 1, 1)
    if not mean_cost > 1e-12:
      return 0.0
    epsilon = 0.05 * float(mean_cost)
  if not epsilon > 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}")
  return float(_sinkhorn_divergence(jnp.asarray(x), jnp.asarray(y), jnp.float32(epsilon)))


@jax.jit
def _sinkhorn_divergence(x, y, epsilon):
  """One compiled program per shape (ott's function is traced op by op
  otherwise: ~2 s per call on CPU whatever the size)."""
  from ott.geometry import pointcloud
  from ott.tools import sinkhorn_divergence

  value, _ = sinkhorn_divergence.sinkhorn_divergence(pointcloud.PointCloud, x, y, epsilon=epsilon)
  return value


def overlap_coefficient(mu1: float, sigma1: float, mu2: float, sigma2: float) -> float:
  """Overlap ∫ min(f1, f2) of the densities N(mu1, sigma1²) and N(mu2, sigma2²),
  in [0, 1]: the class-intensity overlap of a domain (the study's
  "difficulty"; 1 when the classes are indistinguishable). Exact, from the
  crossing points of the two densities (Inman & Bradley 1989). Unclipped
  Gaussians; a zero sigma is a point mass (overlap 0 unless both are equal)."""
  from math import erf, log, sqrt

  for name, v in (("mu1", mu1), ("mu2", mu2)):
    if not math.isfinite(v):
      raise ValueError(f"{name} must be finite, got {v}")
  for name, v in (("sigma1", sigma1), ("sigma2", sigma2)):
    if not (math.isfinite(v) and v >= 0):
      raise ValueError(f"{name} must be finite and >= 0, got {v}")
  if sigma1 == 0 or sigma2 == 0:
    return float(sigma1 == sigma2 and mu1 == mu2)
  cdf = lambda t, m, s: 0.5 * (1 + erf((t - m) / (s * sqrt(2))))
  if sigma1 == sigma2:
    if mu1 == mu2:
      return 1.0
    c = (mu1 + mu2) / 2
    lo, hi = (mu1, mu2) if mu1 < mu2 else (mu2, mu1)
    return float(2 * (1 - cdf(c, lo, sigma1)))
  # Crossing points of the two log-densities: a t² + b t + c = 0.
  a = 1 / (2 * sigma2**2) - 1 / (2 * sigma1**2)
  b = mu1 / sigma1**2 - mu2 / sigma2**2
  c = mu2**2 / (2 * sigma2**2) - mu1**2 / (2 * sigma1**2) + log(sigma2 / sigma1)
  disc = math.sqrt(max(b * b - 4 * a * c, 0.0))
  t1, t2 = sorted(((-b - disc) / (2 * a), (-b + disc) / (2 * a)))
  # The narrower density is the smaller one outside [t1, t2].
  (mn, sn), (mw, sw) = sorted([(mu1, sigma1), (mu2, sigma2)], key=lambda p: p[1])
  outside_narrow = cdf(t1, mn, sn) + 1 - cdf(t2, mn, sn)
  inside_wide = cdf(t2, mw, sw) - cdf(t1, mw, sw)
  return float(outside_narrow + inside_wide)


def diag_w2(source_stats, target_stats) -> dict[str, float]:
  """Per BatchNorm layer, W2² between the diagonal Gaussians of two
  ``batch_stats`` collections: Σ_c (m1 - m2)² + (sqrt v1 - sqrt v2)². Squared.
  Needs no features: compare a source model's statistics with its adapted ones."""
  a, b = layer_stats(source_stats), layer_stats(target_stats)
  if a.keys() != b.keys():
    raise ValueError("the two batch_stats have different layers")
  return {p: float(np.sum((a[p][0] - b[p][0]) ** 2 + (np.sqrt(a[p][1]) - np.sqrt(b[p][1])) ** 2))
          for p in a}


def diag_bhattacharyya(source_stats, target_stats, eps: float = 1e-12) -> dict[str, float]:
  """Per BatchNorm layer, the Bhattacharyya distance of diagonal Gaussians:
  Σ_c (m1 - m2)² / (4 (v1 + v2)) + ½ ln((v1 + v2) / (2 sqrt(v1 v2)))."""
  a, b = layer_stats(source_stats), layer_stats(target_stats)
  if a.keys() != b.keys():
    raise ValueError("the two batch_stats have different layers")
  out = {}
  for p in a:
    (m1, v1), (m2, v2) = a[p], b[p]
    v1, v2 = v1 + eps, v2 + eps
    out[p] = float(np.sum((m1 - m2) ** 2 / (4 * (v1 + v2))
                          + 0.5 * np.log((v1 + v2) / (2 * np.sqrt(v1 * v2)))))
  return out
