r"""Start a script as several JAX processes on this machine, for trying and
testing multi-process runs:

    python -m bnjax.launch --processes=2 --devices_per_process=2 experiments/sweep.py --config=...

Picks a free loopback port for the coordinator, starts ``processes`` copies of
the script (each sees ``devices_per_process`` CPU devices), forwards their
output line by line with a ``[p<i>]`` prefix, and fails as a whole: when one
process fails the others are stopped and the launcher exits with its status.
Each process finds its coordinator, process count and id in the environment
(``BNJAX_COORDINATOR``, ``BNJAX_NUM_PROCESSES``, ``BNJAX_PROCESS_ID``), which
:func:`bnjax.distributed.initialize` reads.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from bnjax import _checks

__all__ = ["free_port", "launch", "main"]


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _raise_interrupt(signum, frame):
  raise KeyboardInterrupt


def _forward(stream, prefix: str, out):
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


def launch(command: list[str], processes: int, devices_per_process: int = 1,
           env: dict | None = None, out=None, poll_s: float = 0.2) -> int:
  """Runs ``command`` (argv, e.g. ``[sys.executable, "script.py", ...]``) as
  ``processes`` JAX processes; returns 0, or the first failing exit status."""
  processes = _checks.positive_int("processes", processes)
  devices_per_process = _checks.positive_int("devices_per_process", devices_per_process)
  if not command:
    raise ValueError("command is empty: give the script and its arguments")
  out = out or sys.stdout
  coordinator = f"127.0.0.1:{free_port()}"
  base = dict(os.environ if env is None else env)
  flags = [f for f in base.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  base["XLA_FLAGS"] = " ".join(flags + [
      f"--xla_force_host_platform_device_count={devices_per_process}"])
  base.setdefault("JAX_PLATFORMS", "cpu")
  base["PYTHONUNBUFFERED"] = "1"
  procs, threads = [], []
  # A SIGTERM to the launcher stops every process, as Ctrl-C does.
  previous = signal.getsignal(signal.SIGTERM)
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _raise_interrupt)
  for i in range(processes):
    penv = dict(base, BNJAX_COORDINATOR=coordinator, BNJAX_NUM_PROCESSES=str(processes),
                BNJAX_PROCESS_ID=str(i))
    p = subprocess.Popen(command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, bufsize=1)
    t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", out), daemon=True)
    t.start()
    procs.append(p)
    threads.append(t)
  status = 0
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        status = failed[0].returncode
        break
      time.sleep(poll_s)
    else:
      status = next((p.returncode for p in procs if p.returncode), 0)
  except KeyboardInterrupt:
    status = 130
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    for p in procs:
      try:
        p.wait(timeout=10)
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    for t in threads:
      t.join(timeout=5)
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, previous)
  if status:
    bad = [i for i, p in enumerate(procs) if p.returncode not in (0, None, -15)]
    out.write(f"launch: failed processes {bad} (exit {status}); the others were stopped\n")
    out.flush()
  return status


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m bnjax.launch", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("script", help="the Python script to run in every process")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
  ns = parser.parse_args(argv)
  try:
    code = launch([sys.executable, ns.script, *ns.args], ns.processes, ns.devices_per_process)
  except ValueError as e:
    parser.error(str(e))
  sys.exit(code)


if __name__ == "__main__":
  main()
