"""Several processes on this machine: the launcher, and multi-process runs
(2 processes x 2 CPU devices) against 1 process x 4 devices."""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import processes
import tolerance
from bnjax import adapt, distributed, launch

PY = sys.executable

# Its slow or e2e tests run for minutes: scheduled first (tests/conftest.py).
RUNS_FOR_MINUTES = True


def _script(tmp_path, text):
  path = tmp_path / "script.py"
  path.write_text(text)
  return str(path)


def test_launcher_prefixes_output_and_sets_each_process_environment(tmp_path, capsys):
  script = _script(tmp_path, "import os\nprint(os.environ['BNJAX_PROCESS_ID'], "
                   "os.environ['BNJAX_NUM_PROCESSES'], os.environ['BNJAX_COORDINATOR'][:10], "
                   "os.environ['XLA_FLAGS'])\n")
  assert launch.launch([PY, script], 3, devices_per_process=2) == 0
  lines = sorted(capsys.readouterr().out.splitlines())
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert line.startswith(f"[p{i}] {i} 3 127.0.0.1:")
    assert line.endswith("--xla_force_host_platform_device_count=2")


def test_launcher_fails_as_a_whole_when_one_process_fails(tmp_path, capsys):
  script = _script(tmp_path, "import os, sys, time\n"
                   "if os.environ['BNJAX_PROCESS_ID'] == '1':\n  sys.exit(3)\n"
                   "time.sleep(120)\n")
  start = time.perf_counter()
  assert launch.launch([PY, script], 2) == 3
  assert time.perf_counter() - start < 60  # process 0 was stopped, not waited for
  assert "failed processes [1] (exit 3)" in capsys.readouterr().out


def test_launcher_bad_arguments():
  for kwargs, match in ((dict(processes=0), "processes"), (dict(processes=2, devices_per_process=0),
                                                           "devices_per_process")):
    with pytest.raises(ValueError, match=match):
      launch.launch([PY, "-c", "pass"], **kwargs)
  with pytest.raises(ValueError, match="command is empty"):
    launch.launch([], 2)


_run = processes.run


@pytest.mark.slow
def test_map_pairs_computes_each_pair_once_across_processes_and_devices(root, tmp_path):
  """Exact AdaBN of 7 pairs split over 2 processes x 2 devices and over 1
  process x 4 devices: each pair handed to one device of one process (counted
  from what the pair function received), the shares contiguous, and every
  pair's statistics those of adapting that pair alone in this process."""
  import multiprocess_pairs as script
  path = os.path.join(root, "tests", "multiprocess_pairs.py")
  r = _run([PY, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=2", path,
            str(tmp_path / "two.npz")])
  assert r.returncode == 0, r.stdout[-3000:]
  # Shares of ceil(7 / 4) = 2 pairs per device, one pair per call: process 0 has pairs 0-3,
  # process 1 pairs 4-6 (its last device's share is pair 6 and its repeat).
  assert "[p0] handed pairs [0, 1, 2, 3] (4 rows) in process 0 of 2" in r.stdout
  assert "[p1] handed pairs [4, 5, 6] (4 rows) in process 1 of 2" in r.stdout
  assert "[p0] [adabn] process 0 of 2: 4 of 7 pairs (pairs 0..3) on 2 device(s)" in r.stdout
  assert "[p1] [adabn] process 1 of 2: 3 of 7 pairs (pairs 4..6) on 2 device(s)" in r.stdout
  r = _run([PY, path, str(tmp_path / "four.npz")], devices=4)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "handed pairs [0, 1, 2, 3, 4, 5, 6] (8 rows) in process 0 of 1" in r.stdout
  two, four = np.load(tmp_path / "two.npz"), np.load(tmp_path / "four.npz")
  for got in (two, four):
    np.testing.assert_array_equal(got["index"], np.arange(7))
    # Pair i on the (i // 2)-th device in process-then-id order.
    ids = sorted(set(got["device"].tolist()))
    assert [ids.index(d) for d in got["device"]] == [0, 0, 1, 1, 2, 2, 3]
  variables, images = script.inputs()
  keys = [k for k in four.files if k not in ("index", "device")]
  assert len(keys) >= 8  # mean and var of every BatchNorm layer
  for i in range(7):
    v = jax.tree_util.tree_map(lambda a: a[i], variables)
    alone = adapt.recompute_batch_stats(script.MODEL, v, images[i], mode="exact")
    flat = traverse_util.flatten_dict(alone["batch_stats"], sep="/")
    for k in keys:
      # Float32 statistics of the same pair; other program shapes may sum in
      # another order (a few ulps of values of order 1).
      np.testing.assert_allclose(two[k][i], flat[k], rtol=1e-5, atol=1e-6, err_msg=k)
      np.testing.assert_allclose(four[k][i], flat[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_map_pairs_on_one_device_and_its_checks():
  seen = []

  def fn(index, x, scale):
    seen.append(np.asarray(index).tolist())
    return {"sum": jnp.sum(x, axis=1) * scale, "index": index}

  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  out = distributed.map_pairs(fn, np.arange(4), x, 2.0, in_axes=(0, 0, None))
  assert seen == [[0, 1, 2, 3]]  # one device: every pair in one call
  np.testing.assert_allclose(out["sum"], x.sum(1) * 2)
  assert isinstance(out["sum"], np.ndarray)
  # Calls of 3 pairs: the last filled with repeats of pair 6, dropped after.
  seen.clear()
  x7 = np.arange(21, dtype=np.float32).reshape(7, 3)
  out = distributed.map_pairs(fn, np.arange(7), x7, 1.0, in_axes=(0, 0, None), chunk=3)
  assert seen == [[0, 1, 2], [3, 4, 5], [6, 6, 6]]
  np.testing.assert_allclose(out["sum"], x7.sum(1))
  np.testing.assert_array_equal(out["index"], np.arange(7))
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
      distributed.map_pairs(fn, np.arange(7), x7, 1.0, in_axes=(0, 0, None), chunk=bad)
  with pytest.raises(ValueError, match="in_axes must be 0 or None"):
    distributed.map_pairs(fn, np.arange(4), x, 2.0, in_axes=(0, 1, None))
  with pytest.raises(ValueError, match=r"one leading pair axis, got leading sizes \[3, 4\]"):
    distributed.map_pairs(fn, np.arange(3), x, 2.0, in_axes=(0, 0, None))
  with pytest.raises(ValueError, match="pair axis is empty"):
    distributed.map_pairs(fn, np.arange(0), x[:0], 2.0, in_axes=(0, 0, None))
  with pytest.raises(ValueError, match="maps no argument"):
    distributed.map_pairs(fn, np.arange(4), x, 2.0, in_axes=None)
  with pytest.raises(ValueError, match="devices is empty"):
    distributed.map_pairs(fn, np.arange(4), x, 2.0, in_axes=(0, 0, None), devices=[])


@pytest.mark.slow
def test_train_many_across_two_processes_equals_one_process(root, tmp_path):
  script = os.path.join(root, "tests", "multiprocess_train.py")
  two, one = tmp_path / "two.npz", tmp_path / "one.npz"
  r = _run([PY, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=2", script,
            str(two)])
  assert r.returncode == 0, r.stdout[-3000:]
  assert r.stdout.count("process 0 of 2, devices 4") == 1
  assert r.stdout.count("process 1 of 2, devices 4") == 1
  r = _run([PY, script, str(one)], devices=4)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  a, b = np.load(two), np.load(one)
  assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
  # Trained models compared by what they predict: the same up to pixels that
  # float32 rounding can flip (tests/tolerance.py; budget as in test_sweep).
  assert a["predictions"].shape == a["masks"].shape == (4, 24, 16, 16)
  assert tolerance.pixel_disagreement(a["predictions"], b["predictions"]) <= tolerance.flip_budget(a["masks"][0])
  np.testing.assert_array_equal(a["masks"], b["masks"])
  # Data that differ between processes are refused at the start, by both.
  r = _run([PY, "-m", "bnjax.launch", "--processes=2", "--devices_per_process=2", script,
            str(tmp_path / "bad.npz")], env_extra={"PERTURB_PROCESS": "1"})
  assert r.returncode != 0
  assert "the training images and masks given to train_many differ between processes" in r.stdout


@pytest.mark.slow
def test_a_process_count_that_does_not_match_is_an_error_not_a_hang(tmp_path):
  code = ("from bnjax import distributed\n"
          "distributed.initialize('127.0.0.1:%d', 2, 1, timeout_s=5)\n" % launch.free_port())
  start = time.perf_counter()
  r = _run([PY, "-c", code], timeout=120)
  assert r.returncode != 0 and time.perf_counter() - start < 100
  # JAX's client ends the process (DEADLINE_EXCEEDED) after the line saying
  # what it waited for.
  assert "process 1 of 2: joining the coordinator at 127.0.0.1:" in r.stderr
  assert "waits up to 5 s for all 2 processes" in r.stderr
  assert "DEADLINE_EXCEEDED" in r.stderr
