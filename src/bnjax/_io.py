"""Small file helpers shared by the modules that write results (private)."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON to ``path`` through a temporary file and ``os.replace``."""
  path = os.fspath(path)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
