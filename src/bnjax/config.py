"""An experiment's config, checked whole before anything is written or trained.

An experiment script turns its ``ml_collections`` config (any mapping with
attribute access) into what it runs with (domains, the model, a
:class:`~bnjax.train.TrainConfig`, adaptation and TENT options, comma-separated
lists) through these functions, all of them before it opens its workdir. Each
value is checked by the code that will use it (``TrainConfig``'s own checks,
:meth:`bnjax.models.UNet.check`, the options check of
:func:`bnjax.adapt.recompute_batch_stats`, ...), and every failure is one
:class:`ConfigError` whose message starts with the key::

    config.adapt.mode must be one of ('exact', 'train_pass', 'ema'), got 'foo'
    config.train.epochs must be an integer >= 1, got 0
    config.source: Domain.mu2 must be in [0, 255], got 300.0

so a bad value costs a second, not a training run, and leaves no workdir
behind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax

from bnjax import _checks
from bnjax import adapt
from bnjax import cyclegan
from bnjax import data
from bnjax import features
from bnjax import models
from bnjax import stacking
from bnjax import train

__all__ = ["ConfigError", "value", "names", "ints", "positive_int", "positive_number",
           "unit_interval", "choice", "domain", "domains", "image_size", "unet", "taps", "train_config", "adapt_options",
           "tent_options", "cyclegan_config", "strategy"]


class ConfigError(ValueError):
  """A config value that cannot run; the message starts with its key."""


def _message(key: str, error: Exception, prefix: str | None) -> str:
  """``config.<key> ...`` from the message of the code that refused the value:
  ``"mode must be ..."`` for the key ``adapt.mode`` becomes ``"config.adapt.mode
  must be ..."``; ``"TrainConfig.epochs must be ..."`` with ``prefix=
  "TrainConfig."`` becomes ``"config.train.epochs must be ..."``."""
  text = str(error)
  leaf = key.rsplit(".", 1)[-1]
  if prefix and text.startswith(prefix):
    return f"config.{key}.{text[len(prefix):]}"
  if text.startswith(leaf + " "):
    return f"config.{key}{text[len(leaf):]}"
  return f"config.{key}: {text}"


def value(key: str, fn: Callable, *args, prefix: str | None = None, **kwargs):
  """``fn(*args, **kwargs)``; a ValueError, TypeError or FileNotFoundError it
  raises becomes a :class:`ConfigError` naming ``config.<key>``."""
  try:
    return fn(*args, **kwargs)
  except ConfigError:
    raise
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise ConfigError(_message(key, e, prefix)) from None


def names(text, allowed: Sequence[str], key: str) -> list[str]:
  """A comma-separated list of names (``"a,b"``), each in ``allowed``,
  duplicates dropped in order."""
  items = [t.strip() for t in str(text).split(",") if t.strip()]
  bad = [n for n in items if n not in allowed]
  if not items or bad:
    raise ConfigError(f"config.{key} must be a comma-separated list of {tuple(allowed)}, "
                      f"got {text!r}")
  return list(dict.fromkeys(items))


def ints(text, lo: int, hi: int, key: str, note: str = "") -> list[int]:
  """A comma-separated list of integers in ``lo..hi``, sorted, unique."""
  try:
    values = sorted({int(t) for t in str(text).split(",") if t.strip()})
  except ValueError:
    values = []
  if not values or not all(lo <= v <= hi for v in values):
    raise ConfigError(f"config.{key} must be a comma-separated list of integers in {lo}..{hi}"
                      f"{note}, got {text!r}")
  return values


def positive_int(v, key: str, minimum: int = 1) -> int:
  return value(key, _checks.positive_int, key.rsplit(".", 1)[-1], v, minimum)


def positive_number(v, key: str) -> float:
  """``v`` as a float when it is a finite number > 0, else a
  :class:`ConfigError` naming ``config.<key>``."""
  return value(key, _checks.positive_number, key.rsplit(".", 1)[-1], v)


def unit_interval(v, key: str) -> float:
  return value(key, _checks.unit_interval, key.rsplit(".", 1)[-1], v)


def choice(v, allowed: Sequence[Any], key: str):
  return value(key, _checks.choice, key.rsplit(".", 1)[-1], v, allowed)


def domain(v, key: str) -> data.Domain:
  """A domain given as four numbers (mu1, sigma1, mu2, sigma2) or as a dict."""
  return value(key, data.Domain.from_json, v)


def domains(values, key: str) -> list[data.Domain]:
  """At least one domain."""
  out = [value(f"{key}[{i}]", data.Domain.from_json, v) for i, v in enumerate(values or ())]
  if not out:
    raise ConfigError(f"config.{key} must name at least one domain (mu1, sigma1, mu2, sigma2)")
  return out


def _section(section, key: str) -> dict:
  if hasattr(section, "to_dict"):
    section = section.to_dict()
  if not isinstance(section, Mapping):
    raise ConfigError(f"config.{key} must be a group of fields, got {section!r}")
  return dict(section)


def _fields(cls, given: Mapping, key: str) -> None:
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(given) - known)
  if unknown:
    raise ConfigError(f"config.{key}.{unknown[0]} is not a field of {cls.__name__} "
                      f"(its fields: {', '.join(sorted(known))})")


def image_size(v, key: str = "data.size", res: int = 2) -> int:
  """A side of the square images the Perlin lattice of ``res`` cells tiles."""
  size = positive_int(v, key)
  value(key, data._check_lattice, size, res)
  return size


def unet(section, key: str = "model", image_size: int | None = None,
         **options) -> models.UNet:
  """The U-Net of ``section`` (its fields are :class:`~bnjax.models.UNet`'s,
  ``options`` added), checked, with ``image_size`` x ``image_size`` images
  (sides the ``depth`` down-samplings must halve)."""
  fields = {**_section(section, key), **options}
  _fields(models.UNet, fields, key)
  model = models.UNet(**fields)
  value(key, model.check, (image_size, image_size) if image_size else None, prefix="UNet.")
  return model


def taps(values, model, image_size: int, key: str = "taps") -> list[str]:
  """Feature taps of ``model`` on one-channel images of that size: each of
  ``values`` (a name or a sequence of names) must be one it sows; none given:
  all of them, in forward order."""
  example = jax.ShapeDtypeStruct((1, image_size, image_size, 1), jax.numpy.float32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), example, train=False))
  available = features.available_taps(model, abstract, (image_size, image_size, 1))
  given = [values] if isinstance(values, str) else list(values or ())
  bad = [t for t in given if t not in available]
  if bad:
    raise ConfigError(f"config.{key} must name taps of the model, {tuple(available)}, got "
                      f"{bad[0]!r}")
  return given or available


def train_config(section, key: str = "train", n_images: int | None = None,
                 **overrides) -> train.TrainConfig:
  """The :class:`~bnjax.train.TrainConfig` of ``section`` (``overrides``
  added, e.g. ``seed``), checked; with ``n_images``, also that a set of that
  many images leaves a batch for training after the validation split."""
  fields = {**_section(section, key), **overrides}
  _fields(train.TrainConfig, fields, key)
  tc = value(key, train.TrainConfig, **fields, prefix="TrainConfig.")
  if n_images is not None:
    value(key, tc.split_sizes, n_images)
  return tc


def adapt_options(section, key: str = "adapt") -> dict:
  """``mode``, ``batch_size``, ``momentum``, ``alpha``, ``stats`` and ``prior``
  of ``section`` (those it has), checked as
  :func:`~bnjax.adapt.recompute_batch_stats` checks them; returns them as
  keyword arguments of that function."""
  given = _section(section, key)
  options = {k: given[k] for k in ("mode", "batch_size", "momentum", "alpha", "stats", "prior")
             if k in given}
  defaults = {"mode": "exact", "batch_size": None, "momentum": 0.1, "alpha": 1.0,
              "stats": "both"}
  for name in sorted(defaults.keys() & options.keys()):  # one at a time: the error names it
    value(f"{key}.{name}", adapt._check_options, **{**defaults, name: options[name]})
  if options.get("prior") is not None:
    value(f"{key}.prior", adapt._prior_alpha, 1.0, options["prior"], 1)
  return options


def tent_options(section, key: str = "tent") -> dict:
  """``steps``, ``learning_rate`` and ``batch_size`` of ``section`` for
  :func:`bnjax.methods.tent` (a batch larger than a set is cut to the set)."""
  given = _section(section, key)
  return {"steps": positive_int(given.get("steps"), f"{key}.steps"),
          "learning_rate": value(f"{key}.learning_rate", _checks.number, "learning_rate",
                                 given.get("learning_rate")),
          "batch_size": positive_int(given.get("batch_size"), f"{key}.batch_size")}


def cyclegan_config(section, key: str = "cyclegan.train", image_size: int | None = None,
                    **overrides) -> cyclegan.CycleGANConfig:
  """The :class:`~bnjax.cyclegan.CycleGANConfig` of ``section`` (``overrides``
  added, e.g. ``up``), checked; with ``image_size``, also that square images
  of that side fit its networks."""
  fields = {**_section(section, key), **overrides}
  _fields(cyclegan.CycleGANConfig, fields, key)
  cc = value(key, cyclegan.CycleGANConfig, **fields, prefix="CycleGANConfig.")
  if image_size is not None:
    value(key, cc.check_images, image_size, image_size)
  return cc


def strategy(v, key: str = "strategy") -> str:
  """A stacking strategy (``"auto"``, ``"vmap"``, ``"unroll"``), as given."""
  value(key, stacking.resolve, v)
  return v
