"""The run directory of an experiment: what a workdir holds, written and read
by this module only.

A workdir holds::

    config.json            {"experiment": name, "config": {...}, "bnjax": version}
                           written first; the config as plain JSON (nested dicts,
                           lists, numbers), never as strings
    checkpoints/<name>/    trained variables (:mod:`bnjax.checkpoint`: orbax plus
                           a verified manifest written last), with metadata
    results/<name>.json    results as structured JSON (domains as
                           {"mu1", "sigma1", "mu2", "sigma2"}), written atomically
    *.md, *.png            tables and figures (each figure's numbers beside it
                           as JSON/CSV, :mod:`bnjax.plots`)

:meth:`Workdir.open` creates a workdir for a config, or reopens one made with
the same config (the run resumes: finished checkpoints and results are
reused), and refuses one made with a different config, naming every
difference. The command line of the experiment scripts is :mod:`bnjax.cli`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from typing import Any, Callable

import jax

from bnjax import checkpoint
from bnjax import distributed
from bnjax._io import write_json_atomic
from bnjax._version import __version__

__all__ = ["Workdir", "ConfigMismatch", "config_diff", "CONFIG"]

#: The file of a workdir that records its experiment and config, written first.
CONFIG = "config.json"


class ConfigMismatch(ValueError):
  """A workdir holds a run of another experiment or config."""


def _plain(config) -> Any:
  """A config (ConfigDict, dataclass-free mapping, tuples) as plain JSON values."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  try:
    return json.loads(json.dumps(config, sort_keys=True))
  except TypeError as e:
    raise ValueError(f"the config must hold only JSON values (numbers, strings, lists, "
                     f"dicts, None): {e}") from None


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
  """``["train.epochs: 10 -> 3", ...]``: every key whose value differs."""
  out = []
  for key in sorted(set(old) | set(new)):
    name = f"{prefix}{key}"
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      out += config_diff(a, b, f"{name}.")
    elif a != b:
      out.append(f"{name}: {a!r} -> {b!r}")
  return out


class Workdir:
  """A run directory (see the module docstring). Open it with :meth:`open`
  (to run an experiment) or :meth:`read` (to use another run's outputs)."""

  def __init__(self, path: str | os.PathLike, experiment: str, config: dict, resumed: bool):
    self.path = os.path.abspath(os.fspath(path))
    self.experiment = experiment
    self.config = config
    self.resumed = resumed

  @classmethod
  def open(cls, path: str | os.PathLike, experiment: str, config, log=print) -> "Workdir":
    """Creates ``path`` for ``config``, or reopens it if it holds a run of the
    same experiment and config; raises :class:`ConfigMismatch` if it holds a
    run of another experiment or config that kept a checkpoint or a result
    (one that kept nothing, e.g. stopped by an error, is replaced).

    With several processes (:mod:`bnjax.distributed`) every process checks
    the folder (which must be on a filesystem they share) before any writes,
    so all of them resume, start or refuse alike, and process 0 writes."""
    path = os.path.abspath(os.fspath(path))
    plain = _plain(config)
    file = os.path.join(path, CONFIG)
    distributed.barrier(f"workdir check {path}")
    try:
      resumed = cls._check(path, file, experiment, plain,
                           log if distributed.is_primary() else (lambda *_: None))
    finally:
      distributed.barrier(f"workdir checked {path}")
    if resumed:
      log(f"resuming the run in {path} (same config): finished models and results are reused")
    elif distributed.is_primary():
      os.makedirs(path, exist_ok=True)
      write_json_atomic(file, {"experiment": experiment, "config": plain,
                                          "bnjax": __version__})
    distributed.barrier(f"workdir open {path}")
    return cls(path, experiment, plain, resumed)

  @classmethod
  def _check(cls, path, file, experiment, plain, log) -> bool:
    """True: the folder holds this run (resume); False: it is new or empty,
    or holds only the config of a run that kept nothing (replaced)."""
    if os.path.exists(file):
      old = cls.read(path)
      if old.experiment != experiment or config_diff(old.config, plain):
        if not old.checkpoints() and not old.results():
          log(f"{path} holds the config of a run that kept nothing (no checkpoint, no "
              "result): replacing it with this config")
          return False
      if old.experiment != experiment:
        raise ConfigMismatch(
            f"{path} holds a run of the experiment {old.experiment!r}, not {experiment!r}; "
            "choose another workdir")
      diff = config_diff(old.config, plain)
      if diff:
        raise ConfigMismatch(
            f"{path} holds a run made with another config ({'; '.join(diff)}) and keeps "
            f"{old.kept()}; rerun with the same config to resume it, or choose another workdir")
      return True
    if os.path.isdir(path) and os.listdir(path):
      raise ConfigMismatch(f"{path} is not empty and has no {CONFIG}: choose another workdir")
    return False

  @classmethod
  def read(cls, path: str | os.PathLike, experiment: str | None = None) -> "Workdir":
    """An existing workdir (of ``experiment``, if given), for reading."""
    path = os.path.abspath(os.fspath(path))
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{path} is not a bnjax workdir: {CONFIG} is missing")
    with open(file) as f:
      info = json.load(f)
    if not isinstance(info, dict) or "experiment" not in info or "config" not in info:
      raise ValueError(f"{file} is not a bnjax workdir config")
    if experiment is not None and info["experiment"] != experiment:
      raise ValueError(f"{path} holds a run of {info['experiment']!r}, not {experiment!r}")
    return cls(path, info["experiment"], info["config"], True)

  # Files ----------------------------------------------------------------

  def file(self, name: str) -> str:
    """The path of ``name`` inside the workdir (its folder created). In a
    process other than process 0 it points into that process's private
    scratch folder instead, so that every file of the workdir is written
    once, by process 0, and code that writes figures needs no guard."""
    root = self.path if distributed.is_primary() else self._scratch()
    out = os.path.join(root, name)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    return out

  def _scratch(self) -> str:
    if getattr(self, "_scratch_dir", None) is None:
      import atexit
      import shutil
      import tempfile
      self._scratch_dir = tempfile.mkdtemp(prefix="bnjax-process-")
      atexit.register(shutil.rmtree, self._scratch_dir, True)
    return self._scratch_dir

  def write_text(self, name: str, text: str) -> str:
    path = self.file(name)
    with open(path, "w") as f:
      f.write(text)
    return path

  def write_json(self, name: str, value: Any) -> str:
    """``<name>`` (a path inside the workdir) as JSON, written atomically."""
    path = self.file(name)
    write_json_atomic(path, value)
    return path

  def write_csv(self, name: str, rows, fields, float_format: str | None = ".6g") -> str:
    """``rows`` (mappings) as a CSV with the columns ``fields``, floats
    written with ``float_format`` (None: as ``str`` writes them, every digit)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    for r in rows:
      w.writerow({k: (format(r[k], float_format)
                      if isinstance(r[k], float) and float_format is not None else r[k])
                  for k in fields})
    return self.write_text(name, buf.getvalue())

  # Results --------------------------------------------------------------

  def write_result(self, name: str, value: Any) -> str:
    """``results/<name>.json``, written atomically."""
    path = self.file(os.path.join("results", f"{name}.json"))
    write_json_atomic(path, value)
    distributed.barrier(f"result {name}")  # readable by every process from here on
    return path

  def read_result(self, name: str) -> Any:
    """The value :meth:`write_result` stored; None if it is not there."""
    path = os.path.join(self.path, "results", f"{name}.json")
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      return json.load(f)

  def results(self) -> list[str]:
    folder = os.path.join(self.path, "results")
    return sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json")) if (
        os.path.isdir(folder)) else []

  # Checkpoints ----------------------------------------------------------

  def _checkpoint(self, name: str) -> str:
    return os.path.join(self.path, "checkpoints", name)

  def save_model(self, name: str, variables, **metadata) -> str:
    """Saves variables under ``checkpoints/<name>`` with JSON metadata."""
    return checkpoint.save(self._checkpoint(name), variables, **metadata)

  def load_model(self, name: str, **expected) -> tuple[dict, dict] | None:
    """(variables, metadata) of ``checkpoints/<name>`` if it is complete and
    its metadata holds ``expected``; None otherwise (train it again)."""
    path = self._checkpoint(name)
    try:
      meta = checkpoint.metadata(path)
    except (FileNotFoundError, ValueError):
      return None
    if any(meta.get(k) != _plain(v) for k, v in expected.items()):
      return None
    try:
      return checkpoint.restore(path), meta
    except ValueError:
      return None

  def train_or_restore(self, name: str, train: Callable[[], tuple[Any, dict]],
                       **expected) -> tuple[Any, dict, bool]:
    """``(variables, metadata, restored)``: ``checkpoints/<name>`` when it is
    complete and was saved with ``expected`` (the run resumes), else
    ``train()`` -> ``(variables, metadata)``, saved under ``name`` with
    ``expected`` and that metadata before it is returned."""
    found = self.load_model(name, **expected)
    if found is not None:
      return found[0], found[1], True
    variables, metadata = train()
    variables = jax.device_get(variables)
    self.save_model(name, variables, **expected, **metadata)
    return variables, {**expected, **metadata}, False

  def checkpoints(self) -> list[str]:
    """Names of the complete checkpoints."""
    folder = os.path.join(self.path, "checkpoints")
    if not os.path.isdir(folder):
      return []
    return sorted(n for n in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, n, checkpoint.MANIFEST)))

  def kept(self) -> str:
    """What the workdir holds, in words."""
    models, results = self.checkpoints(), self.results()
    return (f"{len(models)} trained model checkpoint{'s' * (len(models) != 1)} and "
            f"{len(results)} result file{'s' * (len(results) != 1)}")
