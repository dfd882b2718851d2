"""LAME for segmentation (the streams method "lame"): the kNN affinity over
each pixel's window and the fixed point of LAME's code, written in NumPy on
the dense affinity matrix of a small image."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from bnjax import streams


class _Head(nn.Module):
  """conv -> BN -> a dense head per pixel: the head's input is the feature map."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    f = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
    return nn.Dense(2)(f)


def _numpy_lame(probs, feats, knn, window, lam=1.0, max_steps=100):
  """LAME on the dense affinity matrix of the pixels of one batch."""
  b, h, w, k = probs.shape
  f = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  n = b * h * w
  idx = lambda i, r, c: (i * h + r) * w + c
  W = np.zeros((n, n))
  for i in range(b):
    for r in range(h):
      for c in range(w):
        cands = []
        for dy in range(-window, window + 1):
          for dx in range(-window, window + 1):
            rr, cc = r + dy, c + dx
            if (dy, dx) != (0, 0) and 0 <= rr < h and 0 <= cc < w:
              cands.append((np.sum((f[i, rr, cc] - f[i, r, c]) ** 2), idx(i, rr, cc)))
        for _, j in sorted(cands)[:knn]:
          W[idx(i, r, c), j] = 1.0
  unary = -np.log(probs.reshape(n, k) + 1e-10)
  softmax = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(
      a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
  y = softmax(-unary)
  old = np.inf
  for step in range(max_steps):
    pairwise = lam * W @ y
    y = softmax(-unary + pairwise)
    e = np.sum(unary * y - pairwise * y + y * np.log(np.clip(y, 1e-20, None)))
    if step > 1 and abs(e - old) <= 1e-8 * abs(old):
      break
    old = e
  return y.reshape(b, h, w, k), W


@pytest.mark.parametrize("knn,window,lam", [(5, 2, 1.0), (3, 1, 2.5)])
def test_lame_against_numpy(knn, window, lam):
  model = _Head()
  rng = np.random.default_rng(knn)
  x = rng.uniform(0, 1, (2, 3, 6, 5, 1)).astype(np.float32)  # T = 2 batches of 3 images
  v = model.init(jax.random.key(0), x[0])
  out = streams.run(model, v, x, "lame", knn=knn, window=window, bound_lambda=lam,
                    return_logits=True)
  _, captured = model.apply(v, x.reshape(-1, 6, 5, 1), capture_intermediates=True)
  conv = np.asarray(captured["intermediates"]["Conv_0"]["__call__"][0])
  bn = v["batch_stats"]["BatchNorm_0"]
  scale, bias = v["params"]["BatchNorm_0"]["scale"], v["params"]["BatchNorm_0"]["bias"]
  feats = ((conv - np.asarray(bn["mean"])) / np.sqrt(np.asarray(bn["var"]) + 1e-5)
           * np.asarray(scale) + np.asarray(bias)).astype(np.float64)
  logits = np.asarray(model.apply(v, x.reshape(-1, 6, 5, 1)), np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for t in range(2):
    s = slice(3 * t, 3 * t + 3)
    want, W = _numpy_lame(probs[s], feats[s], knn, window, lam)
    assert W.sum(1).min() == knn  # every pixel has its k neighbours in its window
    np.testing.assert_allclose(np.exp(out.logits[t]), want, atol=2e-5)
  assert not np.allclose(np.exp(out.logits[0]), probs[:3], atol=1e-3)  # it did correct them
  # No parameter or statistic changed: the state is the source's.
  assert out.state["variables"] is not None
  np.testing.assert_array_equal(out.state["variables"]["batch_stats"]["BatchNorm_0"]["mean"],
                                bn["mean"])


def test_lame_checks_its_options():
  model = _Head()
  x = np.zeros((1, 2, 6, 5, 1), np.float32)
  v = model.init(jax.random.key(0), x[0])
  with pytest.raises(ValueError, match=r"knn must be at most the 8 other pixels"):
    streams.run(model, v, x, "lame", knn=9, window=1)
  with pytest.raises(ValueError, match=r"bound_lambda"):
    streams.run(model, v, x, "lame", bound_lambda=-1.0)


def test_lame_fixed_point_checks_its_arguments():
  probs = np.full((1, 4, 4, 2), 0.5, np.float32)
  index = np.zeros((1, 4, 4, 3, 2), np.int32)
  valid = np.ones((1, 4, 4, 3), bool)
  np.testing.assert_allclose(streams.lame_fixed_point(probs, (index, valid)), 0.5, atol=1e-6)
  with pytest.raises(ValueError, match=r"probs must be float\[B, H, W, K\]"):
    streams.lame_fixed_point(probs[0], (index, valid))
  with pytest.raises(ValueError, match=r"neighbours must be indices \[B, H, W, k, 2\]"):
    streams.lame_fixed_point(probs, (index[:, :2], valid))
  with pytest.raises(ValueError, match="max_steps must be"):
    streams.lame_fixed_point(probs, (index, valid), max_steps=0)
