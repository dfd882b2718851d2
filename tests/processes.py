"""Starting Python processes from the tests: several forced CPU devices, a
launcher, the files a run leaves."""

import os
import subprocess


def xla_flags(name: str, value, env=None) -> str:
  """``XLA_FLAGS`` of ``env`` (default: this process's) with ``--name=value``
  in place of any value it had, its other flags kept."""
  flags = [f for f in (os.environ if env is None else env).get("XLA_FLAGS", "").split()
           if f.split("=", 1)[0] != f"--{name}"]
  return " ".join(flags + [f"--{name}={value}"])


def devices_flag(devices: int, env=None) -> str:
  """``XLA_FLAGS`` of ``env`` (default: this process's) with ``devices``
  forced host CPU devices (the suite's other flags kept: tests/conftest.py)."""
  return xla_flags("xla_force_host_platform_device_count", devices, env)


def run(args, env_extra=None, devices=None, timeout=600):
  """``args`` run to the end with this environment (plus ``env_extra``;
  ``devices`` forced host CPU devices); a ``CompletedProcess`` with text
  output."""
  env = dict(os.environ, **(env_extra or {}))
  if devices:
    env["XLA_FLAGS"] = devices_flag(devices, env)
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def files(folder):
  """Every file under ``folder``, as sorted relative paths."""
  return sorted(os.path.relpath(os.path.join(d, f), folder)
                for d, _, fs in os.walk(folder) for f in fs)
