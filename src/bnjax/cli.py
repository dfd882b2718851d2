"""The command line of the experiment scripts (absl + ml_collections, as Flax's
examples and big_vision write them).

``main(run, default_config, experiment)`` parses ``--config=<file>[:arg]``
(fields overridden as ``--config.train.epochs=3``) and ``--workdir``, joins the
other processes of a multi-process run (:func:`bnjax.distributed.initialize`),
turns on the persistent compile cache and calls ``run(config, workdir)``. Every
error of the command line or of the config is one line, ``error: ...``, and
exit status 2; an interrupt is one line saying what the workdir keeps
(:func:`interruptible`). ``--help`` prints the experiment's description,
its config file's (commands, runtime) and every config field with its value.
The only module of bnjax that imports absl and ml_collections.
"""

from __future__ import annotations

import ast
import contextlib
import os
import runpy
import sys
from typing import Any, Callable

from bnjax import compiler
from bnjax import distributed
from bnjax.config import ConfigError
from bnjax.workdir import ConfigMismatch, Workdir

__all__ = ["main", "interruptible"]


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


_HELP = ("-h", "--help", "--helpshort")


def _fields(config, prefix: str = "config") -> list[str]:
  """``config.a.b = value`` for every leaf field of a ConfigDict, in order."""
  lines = []
  for name, value in config.items():
    if hasattr(value, "items") and hasattr(value, "lock"):  # a nested ConfigDict
      lines += _fields(value, f"{prefix}.{name}")
    else:
      lines.append(f"  {prefix}.{name} = {value!r}")
  return lines


def _help(run: Callable, default_config: str, argv: list[str]) -> str:
  """The experiment's description, its config file's docstring and every
  field of the config the command line names (the default otherwise)."""
  module = sys.modules.get(getattr(run, "__module__", ""))
  doc = ((module.__doc__ if module is not None else None) or "").strip()
  spec = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")),
              default_config)
  path, _, arg = spec.partition(":")
  module = runpy.run_path(path)
  config = module["get_config"](arg) if arg else module["get_config"]()
  config_doc = (module.get("__doc__") or "").strip()
  return "\n\n".join(part for part in (
      doc, f"Config {spec}:\n{config_doc}" if config_doc else f"Config {spec}:",
      "Flags: --workdir=<run directory> (required; the same command resumes it), "
      "--config=<file>[:arg], and any field below as --config.<field>=<value> (e.g. "
      "--config.seed=1):\n" + "\n".join(_fields(config)),
      "absl's own flags: --helpfull.") if part)


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
  :class:`~bnjax.workdir.ConfigMismatch` is one line on stderr, ``error: ...``, and exit
  status 2."""
  from absl import app, flags, logging
  from ml_collections import config_flags

  args = sys.argv if argv is None else argv
  if any(a in _HELP for a in args[1:]):
    print(_help(run, default_config, args), flush=True)
    sys.exit(0)

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
