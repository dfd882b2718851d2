"""The edges of the public API and the direction of imports."""

import ast
import os

import pytest

import bnjax

from bnjax._map import ORDER

MODULES = sorted(ORDER)


def _bnjax_imports(path):
  tree = ast.parse(open(path).read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bnjax"):
      parts = node.module.split(".")
      found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("bnjax.")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("experiments"):
      found.add("experiments")
  return found


# The package as imported: the source tree, or the installed wheel (.ci/wheel).
PACKAGE = os.path.dirname(bnjax.__file__)


@pytest.mark.wheel
def test_every_module_lists_its_public_names():
  assert set(MODULES) <= set(bnjax.__all__)
  # the map names every public module of the package, and only those
  files = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py") and not f.startswith("_")}
  assert files == set(ORDER), files ^ set(ORDER)
  assert set(bnjax.__all__) & files == files
  for name in MODULES:
    module = getattr(bnjax, name)
    assert module.__all__, name
    for public in module.__all__:
      assert hasattr(module, public), f"bnjax.{name}.__all__ names a missing {public!r}"
      assert not public.startswith("_"), public
  for name in bnjax.__all__:
    assert hasattr(bnjax, name)
  assert bnjax.predict is bnjax.inference.predict and bnjax.fit is bnjax.train.fit
  assert os.path.isfile(os.path.join(os.path.dirname(bnjax.__file__), "py.typed"))


@pytest.mark.wheel
def test_imports_point_one_way():
  for name in ORDER:
    imported = _bnjax_imports(os.path.join(PACKAGE, f"{name}.py"))
    assert "experiments" not in imported, name
    later = set(ORDER[ORDER.index(name) + 1:])
    assert not (imported & later), f"bnjax.{name} imports {imported & later}"
  assert "train" not in _bnjax_imports(os.path.join(PACKAGE, "models.py"))


def test_library_tests_do_not_import_the_scripts(root):
  """tests/*.py test the library (and run against the installed wheel);
  the experiment and benchmark scripts are tested in tests/scripts/."""
  folder = os.path.join(root, "tests")
  for name in sorted(os.listdir(folder)):
    if name.endswith(".py"):
      tree = ast.parse(open(os.path.join(folder, name)).read())
      modules = [a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for a in node.names]
      modules += [node.module or "" for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom)]
      assert not [m for m in modules if m.split(".")[0] == "experiments"], name


def test_a_clone_named_bnjax_does_not_shadow_the_package(root, tmp_path):
  """A script in the folder that holds a clone named ``bnjax`` imports the
  package, not the clone folder as an empty namespace package."""
  import subprocess
  import sys

  os.symlink(root, tmp_path / "bnjax")
  proc = subprocess.run([sys.executable, "-c", "import bnjax; print(bnjax.__file__, bnjax.UNet)"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300,
                        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith(os.path.join(root, "src", "bnjax", "__init__.py"))
  assert "bnjax.models.UNet" in proc.stdout
