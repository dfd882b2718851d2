"""BN adaptation of models bnjax did not write (tests/foreign_models.py, NNX).

The references are this file's own: every BatchNorm input is recorded in an
ordinary ``model.apply`` (an interceptor that sows it; dropout switched off by
the same interceptor for train-mode recordings) and its moments are taken in
float64 NumPy. Adapted statistics must match them (mean within 1e-4 of the
std, variance within 1e-4 relative).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax import traverse_util

import foreign_models as fm
from bnjax import adapt

N = 10


@dataclasses.dataclass
class Case:
  model: nn.Module                      # as bnjax gets it
  inputs: tuple                         # arrays [N, ...]
  apply_kwargs: dict | None             # as the user passes them to bnjax
  eval_kwargs: dict                     # the test's own eval-mode call
  train: Callable[[], tuple]            # (model, kwargs) of the test's train-mode call
  feature_axis: int = -1


def _rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape) * 1.5 + 0.7


def _cases() -> dict[str, Callable[[], Case]]:
  img = lambda c=1, s=6: (_rand(1, (N, s, s, c)),)
  seq = lambda c: (_rand(2, (N, 9, c)),)
  vec = (_rand(3, (N, 5)),)
  return {
      "resnet_list_attribute": lambda: Case(
          fm.ResNet(stage_sizes=[1, 1]), img(2, 8), None, {"train": False},
          lambda: (fm.ResNet(stage_sizes=[1, 1]), {"train": True})),
      "module_attribute_flag": lambda: Case(
          fm.AttributeFlagNet(train=False), img(), None, {},
          lambda: (fm.AttributeFlagNet(train=True), {})),
      "training_flag_dropout": lambda: Case(
          fm.TrainingFlagNet(), vec, {"training": False}, {"training": False},
          lambda: (fm.TrainingFlagNet(), {"training": True})),
      "is_training_default_true": lambda: Case(
          fm.IsTrainingNet(), vec, {"is_training": False}, {"is_training": False},
          lambda: (fm.IsTrainingNet(), {"is_training": True})),
      "keyword_only_deterministic": lambda: Case(
          fm.DeterministicNet(), vec, {"deterministic": True}, {"deterministic": True},
          lambda: (fm.DeterministicNet(), {"deterministic": False})),
      "mlp_setup": lambda: Case(
          fm.MLP(), vec, None, {"train": False}, lambda: (fm.MLP(), {"train": True})),
      "conv1d_c1": lambda: Case(
          fm.Conv1D(), seq(1), None, {"train": False}, lambda: (fm.Conv1D(), {"train": True})),
      "conv1d_c4": lambda: Case(
          fm.Conv1D(), seq(4), None, {"train": False}, lambda: (fm.Conv1D(), {"train": True})),
      "conv3d": lambda: Case(
          fm.Conv3D(), (_rand(4, (N, 4, 4, 4, 2)),), None, {"train": False},
          lambda: (fm.Conv3D(), {"train": True})),
      "remat_and_scan": lambda: Case(
          fm.LiftedNet(), vec, None, {}, lambda: (fm.LiftedNet(train=True), {})),
      "masked": lambda: Case(
          fm.MaskedNet(), (_rand(5, (N, 7, 3)), jnp.arange(N) % 7 + 1), None,
          {"train": False}, lambda: (fm.MaskedNet(), {"train": True})),
      "channels_first": lambda: Case(
          fm.ChannelsFirst(), (_rand(6, (N, 2, 6, 6)),), None, {"train": False},
          lambda: (fm.ChannelsFirst(), {"train": True}), feature_axis=1),
      "subclass_and_fork": lambda: Case(
          fm.SubclassAndFork(), img(), None, {"train": False},
          lambda: (fm.SubclassAndFork(), {"train": True})),
      "second_input": lambda: Case(
          fm.Conditioned(), (img()[0], _rand(7, (N, 4))), None, {"train": False},
          lambda: (fm.Conditioned(), {"train": True})),
  }


CASES = _cases()
# Run against the installed wheel too (.ci/wheel): a ResNet in Flax's own
# example style, a lifted (remat + scan) model and a masked BatchNorm.
WHEEL = ("resnet_list_attribute", "remat_and_scan", "masked")


def _randomise(variables, seed=0):
  """Source statistics and affine parameters far from the target's."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, variables))
  for k, a in flat.items():
    if k[0] == "batch_stats":
      flat[k] = (rng.uniform(0.5, 2, a.shape) if k[-1] == "var"
                 else rng.normal(size=a.shape)).astype(a.dtype)
    elif k[-1] in ("scale", "gamma"):
      flat[k] = rng.uniform(0.5, 2, a.shape).astype(a.dtype)
  return traverse_util.unflatten_dict(flat)


_VARIABLES: dict = {}


def setup(name):
  case = CASES[name]()
  if name not in _VARIABLES:
    v = case.model.init(jax.random.key(0), *(a[:2] for a in case.inputs), **case.eval_kwargs)
    _VARIABLES[name] = _randomise(v)
  return case, _VARIABLES[name]


# ---------------------------------------------------------------- references


def reference_moments(records, stats, feature_axis=-1):
  """float64 masked moments of each recorded input over all axes but the
  feature axis (and the leading axes of a scanned layer)."""
  out = {}
  for path, (x, mask) in records.items():
    lead = stats[path][0].ndim - 1
    feat = lead + feature_axis % (x.ndim - lead)
    axes = tuple(i for i in range(lead, x.ndim) if i != feat)
    w = mask.astype(np.float64)
    count = w.sum(axes)
    mean = (w * x).sum(axes) / count
    var = (w * (x - np.expand_dims(mean, axes)) ** 2).sum(axes) / count
    out[path] = (mean, var)
  return out


def stats_of(variables):
  flat = traverse_util.flatten_dict(jax.device_get(variables["batch_stats"]))
  return {"/".join(k[:-1]): (np.asarray(flat[k[:-1] + ("mean",)], np.float64),
                             np.asarray(flat[k[:-1] + ("var",)], np.float64))
          for k in flat if k[-1] == "mean"}


def assert_matches(stored, want, paths=None):
  for p in paths or want:
    (m, v), (wm, wv) = stored[p], want[p]
    np.testing.assert_array_less(np.abs(m - wm), 1e-4 * np.sqrt(wv) + 1e-7, err_msg=f"{p} mean")
    np.testing.assert_array_less(np.abs(v - wv), 1e-4 * wv + 1e-9, err_msg=f"{p} var")


def assert_params_unchanged(out, v):
  assert out["params"] is v["params"]
  for a, b in zip(jax.tree_util.tree_leaves(out["params"]), jax.tree_util.tree_leaves(v["params"])):
    np.testing.assert_array_equal(a, b)


def eval_reference(case, variables):
  records = fm.bn_inputs(case.model, variables, case.inputs, case.eval_kwargs)
  return reference_moments(records, stats_of(variables), case.feature_axis)


# ---------------------------------------------------------------- linen


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.wheel) if n in WHEEL else n
                                  for n in CASES])
def test_exact_is_self_consistent(name):
  case, v = setup(name)
  for batch_size in (None, 3):
    out = adapt.recompute_batch_stats(case.model, v, case.inputs, batch_size=batch_size,
                                      apply_kwargs=case.apply_kwargs)
    assert_params_unchanged(out, v)
    stored = stats_of(out)
    assert set(stored) == set(stats_of(v))
    assert_matches(stored, eval_reference(case, out))


@pytest.mark.parametrize("name", CASES)
def test_train_pass_one_batch_equals_batch_moments(name):
  case, v = setup(name)
  out = adapt.recompute_batch_stats(case.model, v, case.inputs, mode="train_pass",
                                    batch_size=N, apply_kwargs=case.apply_kwargs)
  assert_params_unchanged(out, v)
  train_model, kwargs = case.train()
  records = fm.bn_inputs(train_model, v, case.inputs, kwargs, train=True)
  assert_matches(stats_of(out), reference_moments(records, stats_of(v), case.feature_axis))


@pytest.mark.parametrize("name", CASES)
def test_alpha_layers_and_stats_options(name):
  case, v = setup(name)
  src = stats_of(v)
  run = lambda **o: adapt.recompute_batch_stats(case.model, v, case.inputs,
                                                apply_kwargs=case.apply_kwargs, **o)
  out = run(alpha=0.3)
  m = eval_reference(case, out)
  assert_matches(stats_of(out), {p: (0.3 * m[p][0] + 0.7 * src[p][0],
                                     0.3 * m[p][1] + 0.7 * src[p][1]) for p in m})

  first = sorted(src)[0]
  out = run(layers="^" + re.escape(first) + "$")
  stored = stats_of(out)
  for p in src:
    if p != first:
      np.testing.assert_array_equal(stored[p][0], src[p][0])
      np.testing.assert_array_equal(stored[p][1], src[p][1])
  assert_matches(stored, eval_reference(case, out), [first])

  out = run(stats="mean")
  stored, m = stats_of(out), eval_reference(case, out)
  for p in src:
    np.testing.assert_array_equal(stored[p][1], src[p][1])
    np.testing.assert_array_less(np.abs(stored[p][0] - m[p][0]), 1e-4 * np.sqrt(m[p][1]) + 1e-7)


@pytest.mark.parametrize("name", ["resnet_list_attribute", "masked", "remat_and_scan"])
def test_ema_matches_pytorch_semantics(name):
  """Batches of 4 in order (the last one of 2), unbiased batch variances."""
  case, v = setup(name)
  momentum, b = 0.3, 4
  out = adapt.recompute_batch_stats(case.model, v, case.inputs, mode="ema", batch_size=b,
                                    momentum=momentum, apply_kwargs=case.apply_kwargs)
  run = stats_of(v)
  train_model, kwargs = case.train()
  for s in range(0, N, b):
    records = fm.bn_inputs(train_model, v, tuple(a[s:s + b] for a in case.inputs), kwargs, train=True)
    moments = reference_moments(records, run, case.feature_axis)
    for p, (mean, var) in moments.items():
      lead = run[p][0].ndim - 1
      x, mask = records[p]
      feat = lead + case.feature_axis % (x.ndim - lead)
      count = mask.sum(tuple(i for i in range(lead, x.ndim) if i != feat))
      run[p] = ((1 - momentum) * run[p][0] + momentum * mean,
                (1 - momentum) * run[p][1] + momentum * var * count / (count - 1))
  assert_matches(stats_of(out), run)


@pytest.mark.parametrize("name", ["resnet_list_attribute", "second_input", "masked"])
def test_under_jit(name):
  case, v = setup(name)
  for opts in (dict(mode="exact"), dict(mode="exact", batch_size=4),
               dict(mode="train_pass", batch_size=N)):
    fn = jax.jit(lambda v, x: adapt.recompute_batch_stats(case.model, v, x,
                                                          apply_kwargs=case.apply_kwargs, **opts))
    out = fn(v, case.inputs)
    eager = adapt.recompute_batch_stats(case.model, v, case.inputs,
                                        apply_kwargs=case.apply_kwargs, **opts)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(eager)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  out = jax.jit(lambda v, x: adapt.recompute_batch_stats(case.model, v, x,
                                                         apply_kwargs=case.apply_kwargs))(v, case.inputs)
  assert_matches(stats_of(out), eval_reference(case, out))


def test_rngs_and_array_kwargs_are_passed():
  """apply_kwargs values may be arrays and rngs, and need not be hashable."""
  class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x, scale, noise: bool = False):
      x = nn.Dense(3)(x) * scale
      if noise:
        x = x + jax.random.normal(self.make_rng("noise"), x.shape)
      return nn.BatchNorm(use_running_average=True)(x)

  model = Scaled()
  x = _rand(8, (N, 4))
  scale = jnp.array([1.0, 2.0, 3.0])
  v = model.init(jax.random.key(0), x, scale)
  for kwargs in ({"scale": scale}, {"scale": scale, "noise": True,
                                    "rngs": {"noise": jax.random.key(3)}}):
    out = adapt.recompute_batch_stats(model, v, x, apply_kwargs=kwargs)
    want = reference_moments(fm.bn_inputs(model, out, (x,), kwargs), stats_of(v))
    assert_matches(stats_of(out), want)
  assert not np.allclose(want["BatchNorm_0"][0], reference_moments(
      fm.bn_inputs(model, out, (x,), {"scale": scale}), stats_of(v))["BatchNorm_0"][0])


class _Counted(nn.Module):
  """Counts its traces (a Python side effect runs only when traced)."""

  widths: list  # unhashable on purpose
  traces = [0]

  @nn.compact
  def __call__(self, x, train: bool = False):
    type(self).traces[0] += 1
    for w in self.widths:
      x = nn.BatchNorm(use_running_average=not train)(nn.Dense(w)(x))
    return x


def test_unhashable_model_is_compiled_once():
  model = _Counted(widths=[3, 2])
  x = _rand(9, (N, 4))
  v = _randomise(model.init(jax.random.key(0), x))
  first = adapt.recompute_batch_stats(model, v, x)
  before = _Counted.traces[0]
  again = adapt.recompute_batch_stats(_Counted(widths=[3, 2]), v, x + 1)  # equal, not identical
  assert _Counted.traces[0] == before
  assert not np.allclose(first["batch_stats"]["BatchNorm_0"]["mean"],
                         again["batch_stats"]["BatchNorm_0"]["mean"])


def test_errors_name_the_problem():
  case, v = setup("training_flag_dropout")
  x = case.inputs[0]
  with pytest.raises(ValueError, match=r"apply_kwargs .* training: bool"):
    adapt.recompute_batch_stats(case.model, v, x)
  with pytest.raises(ValueError, match="apply_kwargs"):
    adapt.recompute_batch_stats(case.model, v, x, apply_kwargs={"train": False})
  case_t, v_t = setup("is_training_default_true")
  with pytest.raises(ValueError, match="ran in train mode"):
    adapt.recompute_batch_stats(case_t.model, v_t, case_t.inputs)
  case_a, v_a = setup("module_attribute_flag")
  with pytest.raises(ValueError, match="ran in train mode"):
    adapt.recompute_batch_stats(fm.AttributeFlagNet(train=True), v_a, case_a.inputs)
  with pytest.raises(ValueError, match="whole variables dict"):
    adapt.recompute_batch_stats(case.model, {"params": v["params"]}, x,
                                apply_kwargs={"training": False})
  with pytest.raises(ValueError, match="no BatchNorm layer"):
    dense = nn.Dense(2)
    adapt.recompute_batch_stats(dense, dense.init(jax.random.key(0), x), x)
  case_c, v_c = setup("second_input")
  with pytest.raises(ValueError, match="sharing their leading"):
    adapt.recompute_batch_stats(case_c.model, v_c, (case_c.inputs[0], case_c.inputs[1][:5]))
  with pytest.raises(ValueError, match=r"inputs\[1\] contain NaN"):
    adapt.recompute_batch_stats(case_c.model, v_c, (case_c.inputs[0],
                                                    case_c.inputs[1].at[0, 0].set(jnp.nan)))
  with pytest.raises(ValueError, match="non-empty"):
    adapt.recompute_batch_stats(case_c.model, v_c, tuple(a[:0] for a in case_c.inputs))
  with pytest.raises(ValueError, match="is_batch_norm accepted"):
    adapt.recompute_batch_stats(case_c.model, v_c, case_c.inputs,
                                is_batch_norm=lambda m: isinstance(m, (nn.BatchNorm, nn.Conv)))


def test_is_batch_norm_predicate_limits_the_layers():
  case, v = setup("subclass_and_fork")
  with pytest.warns(UserWarning, match=r"\['fork'\] did not run as BatchNorm"):
    out = adapt.recompute_batch_stats(case.model, v, case.inputs,
                                      is_batch_norm=lambda m: isinstance(m, fm.MyBatchNorm))
  src, stored = stats_of(v), stats_of(out)
  np.testing.assert_array_equal(stored["fork"][0], src["fork"][0])
  assert not np.allclose(stored["sub"][0], src["sub"][0])


def test_stacked_pairs_match_single_pairs():
  case, v = setup("second_input")
  v2 = _randomise(v, seed=1)
  stack = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), v, v2)
  inputs = tuple(jnp.stack([a, a[::-1] * 2]) for a in case.inputs)
  out = adapt.recompute_batch_stats_stacked(case.model, stack, inputs, batch_size=4)
  for i, vi in enumerate((v, v2)):
    single = adapt.recompute_batch_stats(case.model, vi, tuple(a[i] for a in inputs), batch_size=4)
    for a, b in zip(jax.tree_util.tree_leaves(out["batch_stats"]),
                    jax.tree_util.tree_leaves(single["batch_stats"])):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- NNX


class NnxCNN(nnx.Module):
  traces = [0]  # Python side effects run only when traced

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 3, (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(3, momentum=0.99, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    type(self).traces[0] += 1
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = self.dropout(x)
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean((1, 2)))


@pytest.fixture(scope="module")
def nnx_cnn():
  module = NnxCNN(nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for bn in (module.bn1, module.bn2):
    c = bn.mean.get_value().shape
    bn.mean.set_value(jnp.asarray(rng.normal(size=c), jnp.float32))
    bn.var.set_value(jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32))
    bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32))
  return module, _rand(10, (N, 6, 6, 1))


def nnx_stats(module):
  return {name: (np.asarray(getattr(module, name).mean.get_value(), np.float64),
                 np.asarray(getattr(module, name).var.get_value(), np.float64))
          for name in ("bn1", "bn2")}


def nnx_bn_inputs(module, x, train, monkeypatch):
  """This test's own recording: nnx.BatchNorm.__call__ patched to keep its
  input; dropout off; eval (stored statistics) or train (batch moments) mode."""
  seen = []
  original = nnx.BatchNorm.__call__

  def recording(self, x, use_running_average=None, *, mask=None):
    seen.append(np.asarray(x, np.float64))
    return original(self, x, use_running_average=not train)

  copy = nnx.clone(module)
  copy.dropout.deterministic = True
  with monkeypatch.context() as m:
    m.setattr(nnx.BatchNorm, "__call__", recording)
    copy(x)
  return {name: (a.reshape(-1, a.shape[-1]).mean(0), a.reshape(-1, a.shape[-1]).var(0))
          for name, a in zip(("bn1", "bn2"), seen)}


def _host(module):
  """Every leaf of an NNX module's state as NumPy (PRNG keys as their data)."""
  as_np = lambda a: np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                               else a)
  return jax.tree_util.tree_map(as_np, nnx.to_pure_dict(nnx.state(module)))


@pytest.mark.wheel
def test_nnx_modes_and_options(nnx_cnn, monkeypatch):
  module, x = nnx_cnn
  before = _host(module)
  flags = lambda: (module.bn1.use_running_average, module.dropout.deterministic)
  flags_before = flags()
  src = nnx_stats(module)

  def check_params(out):
    for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(out, nnx.Param)),
                              nnx.to_flat_state(nnx.state(module, nnx.Param))):
      np.testing.assert_array_equal(a.get_value(), b.get_value())

  for batch_size in (None, 3):
    out = adapt.recompute_batch_stats_nnx(module, x, batch_size=batch_size)
    check_params(out)
    assert type(out.bn1) is nnx.BatchNorm
    assert_matches(nnx_stats(out), nnx_bn_inputs(out, x, False, monkeypatch))

  out = adapt.recompute_batch_stats_nnx(module, x, mode="train_pass", batch_size=N)
  assert_matches(nnx_stats(out), nnx_bn_inputs(module, x, True, monkeypatch))

  out = adapt.recompute_batch_stats_nnx(module, x, alpha=0.3)
  m = nnx_bn_inputs(out, x, False, monkeypatch)
  assert_matches(nnx_stats(out), {p: (0.3 * m[p][0] + 0.7 * src[p][0],
                                      0.3 * m[p][1] + 0.7 * src[p][1]) for p in m})

  out = adapt.recompute_batch_stats_nnx(module, x, layers="bn2")
  stored = nnx_stats(out)
  np.testing.assert_array_equal(stored["bn1"][0], src["bn1"][0])
  assert_matches(stored, nnx_bn_inputs(out, x, False, monkeypatch), ["bn2"])

  out = adapt.recompute_batch_stats_nnx(module, x, stats="mean")
  stored, m = nnx_stats(out), nnx_bn_inputs(out, x, False, monkeypatch)
  for p in src:
    np.testing.assert_array_equal(stored[p][1], src[p][1])
    np.testing.assert_array_less(np.abs(stored[p][0] - m[p][0]), 1e-4 * np.sqrt(m[p][1]) + 1e-7)

  momentum, b = 0.1, 4
  out = adapt.recompute_batch_stats_nnx(module, x, mode="ema", batch_size=b, momentum=momentum)
  run = dict(src)
  for s in range(0, N, b):
    moments = nnx_bn_inputs(module, x[s:s + b], True, monkeypatch)
    for p, (mean, var) in moments.items():
      count = x[s:s + b].shape[0] * 36
      run[p] = ((1 - momentum) * run[p][0] + momentum * mean,
                (1 - momentum) * run[p][1] + momentum * var * count / (count - 1))
  assert_matches(nnx_stats(out), run)

  after = _host(module)
  for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    np.testing.assert_array_equal(a, b)
  assert flags() == flags_before


def test_nnx_second_call_does_not_recompile(nnx_cnn):
  module, x = nnx_cnn
  first = adapt.recompute_batch_stats_nnx(module, x, batch_size=4)
  before = NnxCNN.traces[0]
  second = adapt.recompute_batch_stats_nnx(module, x * 2, batch_size=4)
  assert NnxCNN.traces[0] == before
  assert not np.allclose(first.bn1.mean.get_value(), second.bn1.mean.get_value())


def test_nnx_errors(nnx_cnn):
  module, x = nnx_cnn
  with pytest.raises(ValueError, match="nnx.Module"):
    adapt.recompute_batch_stats_nnx(object(), x)
  with pytest.raises(ValueError, match="no BatchNorm layer"):
    adapt.recompute_batch_stats_nnx(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match="call_kwargs"):
    adapt.recompute_batch_stats_nnx(module, x, call_kwargs={"train": False})
  with pytest.raises(ValueError, match="matches no BatchNorm"):
    adapt.recompute_batch_stats_nnx(module, x, layers="enc")
  with pytest.raises(ValueError, match="NaN"):
    adapt.recompute_batch_stats_nnx(module, x.at[0].set(jnp.nan))


class NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(4, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return x + nnx.relu(self.bn(self.linear(x)))


class NnxLifted(nnx.Module):
  """One block under nnx.remat, three stacked blocks under nnx.scan."""

  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(3, 4, rngs=rngs)
    self.remat_block = NnxBlock(rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    x = nnx.remat(lambda block, x: block(x))(self.remat_block, self.inp(x))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(block, x):
      return block(x)

    return body(self.blocks, x)


def test_nnx_remat_and_scan(monkeypatch):
  module = NnxLifted(nnx.Rngs(0))
  x = _rand(11, (N, 3))
  original = nnx.BatchNorm.__call__
  for batch_size in (None, 4):
    out = adapt.recompute_batch_stats_nnx(module, x, batch_size=batch_size)
    assert out.blocks.bn.mean.get_value().shape == (3, 4)
    seen = []

    def recording(self, x, use_running_average=None, *, mask=None):
      # Inside nnx.remat/nnx.scan the values are traced: read them out by callback.
      jax.debug.callback(lambda *a: seen.append([np.asarray(b, np.float64) for b in a]),
                         x, self.mean.get_value(), self.var.get_value())
      return original(self, x, use_running_average=True)

    with monkeypatch.context() as m:
      m.setattr(nnx.BatchNorm, "__call__", recording)
      jax.block_until_ready(out(x))
    assert len(seen) == 4
    for a, mean, var in seen:
      np.testing.assert_array_less(np.abs(mean - a.mean(0)), 1e-4 * np.sqrt(a.var(0)) + 1e-7)
      np.testing.assert_array_less(np.abs(var - a.var(0)), 1e-4 * a.var(0) + 1e-9)
