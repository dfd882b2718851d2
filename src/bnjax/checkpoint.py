"""Saving and restoring ``variables`` with orbax-checkpoint.

A checkpoint is a folder holding the orbax PyTree checkpoint (``variables/``)
and ``bnjax.json``: the user's metadata and a manifest of every leaf (path,
shape, dtype, SHA-256 of its bytes). :func:`restore` checks the restored tree
against the manifest, so a missing, truncated or altered checkpoint is an
error, never a silent partial load. The manifest is written last, atomically:
a save interrupted midway leaves no manifest and is refused on restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from bnjax import distributed
from bnjax._io import write_json_atomic

__all__ = ["save", "restore", "metadata", "MANIFEST"]

#: The manifest file of a checkpoint, written last.
MANIFEST = "bnjax.json"
FORMAT = 1


def _leaves(tree) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  return {k: np.asarray(v) for k, v in sorted(flat.items())}


def _describe(leaves: dict[str, np.ndarray]) -> dict[str, dict]:
  return {k: {"shape": list(v.shape), "dtype": str(v.dtype),
              "sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()}
          for k, v in leaves.items()}


def save(path: str | os.PathLike, variables: dict, **metadata: Any) -> str:
  """Saves ``variables`` (a pytree of arrays) and JSON-serialisable metadata.

  Overwrites an existing checkpoint at ``path``. Returns the absolute path.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  leaves = _leaves(variables)
  if not leaves:
    raise ValueError("variables hold no arrays: nothing to save")
  try:
    json.dumps(metadata)
  except TypeError as e:
    raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
  manifest = os.path.join(path, MANIFEST)
  target = os.path.join(path, "variables")
  # With several processes every one takes part in orbax's save (it writes
  # each array once and its metadata from process 0); the folder and the
  # manifest are process 0's.
  if distributed.is_primary():
    os.makedirs(path, exist_ok=True)
    if os.path.exists(manifest):
      os.remove(manifest)  # the old checkpoint is invalid from here on
    if os.path.exists(target):
      shutil.rmtree(target)
  distributed.barrier(f"checkpoint cleared {path}")
  ocp.PyTreeCheckpointer().save(target, jax.device_get(variables))
  if distributed.is_primary():
    write_json_atomic(manifest, {"format": FORMAT, "metadata": metadata,
                                 "leaves": _describe(leaves)})
  distributed.barrier(f"checkpoint written {path}")
  return path


def _read_manifest(path: str) -> dict:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path!r}")
  manifest = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest):
    raise ValueError(
        f"{path!r} is not a complete bnjax checkpoint: {MANIFEST} is missing "
        "(an interrupted save, or another kind of folder)")
  try:
    with open(manifest) as f:
      info = json.load(f)
    if info.get("format") != FORMAT or "leaves" not in info:
      raise ValueError(f"unknown checkpoint format {info.get('format')!r}")
  except (ValueError, OSError) as e:
    raise ValueError(f"checkpoint manifest {manifest!r} is unreadable: {e}") from None
  return info


def metadata(path: str | os.PathLike) -> dict:
  """The metadata given to :func:`save`."""
  return _read_manifest(os.path.abspath(os.fspath(path)))["metadata"]


def restore(path: str | os.PathLike) -> dict:
  """Restores the variables saved at ``path`` (as NumPy arrays), verified
  against the manifest; raises FileNotFoundError or ValueError otherwise."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.fspath(path))
  info = _read_manifest(path)
  try:
    tree = ocp.PyTreeCheckpointer().restore(os.path.join(path, "variables"))
  except Exception as e:  # orbax raises many kinds; all mean "unreadable"
    raise ValueError(f"checkpoint {path!r} is corrupt or unreadable: {e}") from None
  leaves = _leaves(tree)
  found = _describe(leaves)
  if found != info["leaves"]:
    missing = sorted(set(info["leaves"]) - set(found))
    changed = sorted(k for k in found if info["leaves"].get(k) not in (None, found[k]))
    raise ValueError(
        f"checkpoint {path!r} does not match its manifest: missing leaves "
        f"{missing[:5]}, altered leaves {changed[:5]}")
  return traverse_util.unflatten_dict({k: v for k, v in leaves.items()}, sep="/")
