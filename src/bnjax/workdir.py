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
difference. :func:`main` is the command line of an experiment script
(``--config`` and ``--workdir``, as Flax's examples and big_vision): it turns
an interrupt into one line saying what the workdir keeps and how to resume.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable

from bnjax import checkpoint
from bnjax import distributed

__all__ = ["Workdir", "ConfigMismatch", "config_diff", "interruptible", "main", "CONFIG"]

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
    from bnjax import __version__

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
      checkpoint.write_json_atomic(file, {"experiment": experiment, "config": plain,
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

  def write_csv(self, name: str, rows, fields, float_format: str = ".6g") -> str:
    """``rows`` (mappings) as a CSV with the columns ``fields``, floats
    written with ``float_format``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields))
    w.writeheader()
    for r in rows:
      w.writerow({k: (format(r[k], float_format) if isinstance(r[k], float) else r[k])
                  for k in fields})
    return self.write_text(name, buf.getvalue())

  # Results --------------------------------------------------------------

  def write_result(self, name: str, value: Any) -> str:
    """``results/<name>.json``, written atomically."""
    path = self.file(os.path.join("results", f"{name}.json"))
    checkpoint.write_json_atomic(path, value)
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


@contextlib.contextmanager
def interruptible(path: str | os.PathLike, experiment: str = "the run"):
  """Turns a KeyboardInterrupt into one line on stderr (what the workdir
  keeps; the same command resumes) and ``SystemExit(130)``."""
  try:
    yield
  except KeyboardInterrupt:
    try:
      kept = Workdir.read(path).kept()
    except (FileNotFoundError, ValueError):
      kept = "nothing yet"
    print(f"\ninterrupted: {os.fspath(path)} keeps {kept}; run the same command again to "
          f"resume {experiment} from there", file=sys.stderr, flush=True)
    raise SystemExit(130) from None


_FLAGS: dict = {}


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for an error of the command line: an override that names no
  config field (ml_collections raises an AttributeError or KeyError whose
  message is a quoted repr) names its flag and the suggestion; any other
  message is folded onto one line."""
  text = str(error)
  if isinstance(error, (AttributeError, KeyError)):
    try:
      text = ast.literal_eval(text) if text[:1] in "'\"" else text
    except (ValueError, SyntaxError):
      pass
    lines = [t.strip() for t in str(text).splitlines() if t.strip()]
    name = lines[0].strip("'\"") if lines else "?"
    flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")
                 and a.split("=", 1)[0].rsplit(".", 1)[-1] == name), "--config.*")
    hint = " ".join(lines[1:])
    return f"{flag}: the config has no field {name!r}" + (f" ({hint})" if hint else "")
  if "Traceback (most recent call last)" in text:  # a config file's own error: its last line
    head = text.split("Traceback (most recent call last)")[0]
    text = f"{head} {[t for t in text.splitlines() if t.strip()][-1]}"
  return " ".join(text.split())


def main(run: Callable[[Any, str], Any], default_config: str, experiment: str,
         argv: list[str] | None = None) -> None:
  """The command line of an experiment: ``--config=<file>[:arg]`` (an
  ``ml_collections`` config file, fields overridden as ``--config.train.epochs=3``)
  and ``--workdir``; calls ``run(config, workdir)``. A bad config or a workdir
  of another config is a usage error; an interrupt ends with one line saying
  what the workdir keeps and that the same command resumes.

  Every error of the command line (an unknown field, a value of the wrong
  type, a bad config argument) and every :class:`~bnjax.config.ConfigError`
  (a value the experiment cannot run, found before anything is written) or
  :class:`ConfigMismatch` is one line on stderr, ``error: ...``, and exit
  status 2."""
  from absl import app, flags, logging
  from ml_collections import config_flags

  from bnjax import compiler
  from bnjax.config import ConfigError

  @contextlib.contextmanager
  def one_line_errors(args):
    try:
      yield
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
      print(f"error: {_flag_error(e, args)}", file=sys.stderr, flush=True)
      sys.exit(2)

  def parse(args):
    with one_line_errors(args):
      return flags.FLAGS(args)

  if not _FLAGS:  # defined once per process
    # Defining the config flag loads the default file and applies the
    # --config.* overrides of sys.argv already: its errors are the command line's.
    with one_line_errors(sys.argv if argv is None else argv):
      _FLAGS["config"] = config_flags.DEFINE_config_file(
          "config", default_config, "An ml_collections config file (get_config()).",
          lock_config=True)
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run directory (created).")
    flags.mark_flag_as_required("workdir")

  def _main(argv):
    # Under `python -m bnjax.launch` (or with BNJAX_COORDINATOR set): join the
    # other processes before anything uses a device.
    distributed.initialize()
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are --config.* flags")
    compiler.enable_persistent_cache()  # a rerun loads its compiled programs from disk
    if not flags.FLAGS["verbosity"].present:  # keep orbax's per-save INFO lines out
      logging.set_verbosity(logging.WARNING)
    workdir = _FLAGS["workdir"].value
    try:
      with interruptible(workdir, experiment):
        run(_FLAGS["config"].value, workdir)
    except (ConfigError, ConfigMismatch) as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(_main, argv=argv, flags_parser=parse)
