"""Calling linen models that bnjax did not write (private).

Their call flags, their inputs (any rank, one array or several), their
BatchNorm layers (any module owning ``batch_stats`` ``mean`` and ``var``) and a
cache of compiled functions that needs neither the model nor the keyword
values to be hashable. Used by :mod:`bnjax.adapt` and :mod:`bnjax.features`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Mapping
from typing import Any, Callable

import jax
import flax.errors
import numpy as np
from flax import traverse_util

# Keys of model.apply that are not arguments of the called method.
APPLY_ONLY = ("rngs", "method", "capture_intermediates")


# --------------------------------------------------------------------------
# BatchNorm layers


def owns_stats(module) -> bool:
  """Whether a bound linen module owns ``batch_stats`` ``mean`` and ``var``."""
  try:
    return (module.has_variable("batch_stats", "mean")
            and module.has_variable("batch_stats", "var"))
  except Exception:  # an unbound module or one without a scope
    return False


def feature_axes(module, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(feature axes, reduction axes) of a BatchNorm-like module on a rank-``ndim``
  input: its ``axis`` attribute, or the last axis if it has none."""
  axis = getattr(module, "axis", -1)
  axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  features = tuple(sorted({int(a) % ndim for a in axis}))
  return features, tuple(i for i in range(ndim) if i not in features)


def stats_paths(batch_stats) -> dict[str, tuple]:
  """``{name: path}`` of every dict in a stats tree holding ``mean`` and ``var``
  (names join the path with ``/``)."""
  if not batch_stats:
    return {}
  flat = traverse_util.flatten_dict(batch_stats)
  paths = sorted({k[:-1] for k in flat if k[-1] == "mean" and k[:-1] + ("var",) in flat})
  return {"/".join(map(str, p)): p for p in paths}


def stats_of(batch_stats) -> dict[str, tuple[Any, Any]]:
  """``{"enc0/bn1": (mean, var)}`` of every BatchNorm layer in a stats tree
  (the arrays as stored)."""
  flat = traverse_util.flatten_dict(batch_stats) if batch_stats else {}
  return {name: (flat[p + ("mean",)], flat[p + ("var",)])
          for name, p in stats_paths(batch_stats).items()}


def layer_stats(batch_stats) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{"enc0/bn1": (mean, var)}`` of every BatchNorm layer in a ``batch_stats``
  collection, as float64 NumPy arrays."""
  return {name: (np.asarray(m, np.float64), np.asarray(v, np.float64))
          for name, (m, v) in stats_of(jax.device_get(batch_stats)).items()}


@functools.cache
def signature(fn) -> inspect.Signature:
  return inspect.signature(fn)


def first_argument(fn, args, kwargs, name: str | None = None):
  """The call's first argument (and, with ``name``, the argument of that name)."""
  try:
    bound = signature(fn).bind(*args, **kwargs).arguments
  except (TypeError, ValueError):
    bound = {**dict(enumerate(args)), **kwargs}
  first = next(iter(bound.values()))
  return first if name is None else (first, bound.get(name))


# --------------------------------------------------------------------------
# Call arguments


class _Annotation(str):
  def __repr__(self):  # shown as written, not quoted
    return str(self)


def call_signature(fn) -> str:
  """``(x, train: bool = True)``: the parameters after ``self``."""
  params = [p.replace(annotation=_Annotation(p.annotation)) if isinstance(p.annotation, str)
            else p for p in list(signature(fn).parameters.values())[1:]]
  return str(inspect.Signature(params))


def apply_kwargs(model, kwargs, n_inputs: int, name: str = "apply_kwargs") -> dict:
  """``kwargs`` for ``model.apply`` (default ``{"train": False}`` when the
  called method takes ``train``, else ``{}``), checked against its signature."""
  method = (kwargs or {}).get("method", "__call__")
  fn = getattr(type(model), method) if isinstance(method, str) else method
  if kwargs is None:
    kwargs = {"train": False} if "train" in signature(fn).parameters else {}
  if not isinstance(kwargs, Mapping):
    raise ValueError(f"{name} must be a dict, got {type(kwargs).__name__}")
  kwargs = dict(kwargs)
  if "mutable" in kwargs:
    raise ValueError(f"{name} must not set 'mutable': bnjax chooses the mutable collections")
  call = {k: v for k, v in kwargs.items() if k not in APPLY_ONLY}
  check_call(fn, model, n_inputs, call, name)
  return kwargs


def _positional_capacity(fn, kwargs: dict) -> int | None:
  """How many positional inputs ``fn`` takes after ``self`` besides ``kwargs``
  (None: any number)."""
  params = list(signature(fn).parameters.values())[1:]
  if any(p.kind is p.VAR_POSITIONAL for p in params):
    return None
  return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in kwargs
             for p in params)


def check_call(fn, self, n_inputs: int, kwargs: dict, name: str):
  """ValueError naming ``name`` unless ``fn(self, *inputs, **kwargs)`` binds."""
  try:
    signature(fn).bind(self, *range(n_inputs), **kwargs)
  except TypeError as e:
    capacity = _positional_capacity(fn, kwargs)
    if capacity is not None and n_inputs > capacity:
      raise ValueError(
          f"the inputs hold {n_inputs} arrays (a tuple or a list is read as that many "
          f"positional inputs), and {type(self).__name__}."
          f"{getattr(fn, '__name__', 'method')}{call_signature(fn)} takes {capacity} besides "
          f"{name} {sorted(kwargs)}: pass one array [n, ...] for a model of one input "
          "(np.stack a list of examples; never their labels)") from None
    raise ValueError(
        f"{name} {sorted(kwargs)} with {n_inputs} input(s) do not fit "
        f"{type(self).__name__}.{getattr(fn, '__name__', 'method')}{call_signature(fn)}: "
        f"{e}. The inputs are passed positionally; pass the other arguments in {name}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Kwargs:
  """A kwargs pytree split into its array leaves (traced) and the rest (static)."""

  treedef: Any
  static: tuple
  is_array: tuple

  @classmethod
  def split(cls, kwargs) -> tuple["Kwargs", list]:
    leaves, treedef = jax.tree_util.tree_flatten(kwargs)
    is_array = tuple(isinstance(a, (jax.Array, np.ndarray)) for a in leaves)
    static = tuple(None if arr else a for a, arr in zip(leaves, is_array))
    return cls(treedef, static, is_array), [a for a, arr in zip(leaves, is_array) if arr]

  def join(self, arrays) -> Any:
    it = iter(arrays)
    return self.treedef.unflatten(
        [next(it) if arr else s for s, arr in zip(self.static, self.is_array)])

  def key(self) -> tuple:
    return (self.treedef, self.static, self.is_array)


# --------------------------------------------------------------------------
# Inputs


# --------------------------------------------------------------------------
# Compiled functions, cached without hashing


def _same(a, b) -> bool:
  if a is b:
    return True
  try:
    return bool(a == b)
  except Exception:  # array-valued or failing comparisons
    return False


_CACHE: list = []  # (owner, key, fn), most recently used last
_CACHE_SIZE = 64


def cached(owner, key, build: Callable[[], Callable]) -> Callable:
  """``build()``'s function for (``owner``, ``key``), built once: entries are
  found by identity or equality (a model with a list attribute, a dict of
  flags), so neither needs to be hashable. The jitted function it returns
  then compiles once per input shape."""
  for i, (o, k, fn) in enumerate(_CACHE):
    if _same(o, owner) and _same(k, key):
      _CACHE.append(_CACHE.pop(i))
      return fn
  fn = build()
  _CACHE.append((owner, key, fn))
  del _CACHE[:-_CACHE_SIZE]
  return fn


def init(model, key, *inputs, **flags):
  """``model.init(key, *inputs, **flags)`` compiled once per model, flags and
  input shapes, at XLA's lowest backend optimisation level (as
  :func:`bnjax.models.init_variables`): an eager ``init`` of a flow or a VAE
  dispatches its initialisers and its first forward pass op by op, a program
  compiled for every primitive and shape (~10 s on CPU); this is one, of ~1 s.
  ``flags`` must be hashable (``train=True``)."""

  def build():
    return jax.jit(lambda key, *inputs: model.init(key, *inputs, **flags),
                   compiler_options={"xla_backend_optimization_level": 0})

  return cached(model, ("init", tuple(sorted(flags.items()))), build)(key, *inputs)


@contextlib.contextmanager
def inputs_fit(name: str, arrays):
  """Flax's ``ScopeParamShapeError`` (the inputs do not fit the parameters the
  model was built with: most often images of another channel count) as a
  ``ValueError`` naming the inputs' shapes and their channels."""
  try:
    yield
  except flax.errors.ScopeParamShapeError as e:
    shapes = [tuple(np.shape(a)) for a in arrays]
    channels = ", ".join(str(s[-1]) for s in shapes if s)
    raise ValueError(
        f"{name} of shape {shapes[0] if len(shapes) == 1 else shapes} do not fit the model's "
        f"parameters: {channels} channel(s) on the last axis, and the model was built for "
        f"another number (Flax: {e}). Pass inputs with the channels the model was initialised "
        f"with.") from None
