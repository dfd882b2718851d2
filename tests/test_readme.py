"""The README's "Adapting your own model" snippets run as written."""

import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippets(heading: str) -> list[str]:
  text = open(os.path.join(ROOT, "README.md")).read()
  section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


SNIPPETS = _snippets("Adapting your own model")


def test_there_are_three_snippets():
  assert len(SNIPPETS) == 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
  namespace = {"__name__": f"readme_snippet_{index}"}
  exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
  adapted = namespace["adapted"]
  if index == 2:  # NNX: statistics changed, the given module unchanged
    module = namespace["module"]
    assert not np.allclose(adapted.bn.mean.get_value(), module.bn.mean.get_value())
    np.testing.assert_array_equal(module.bn.mean.get_value(), 0)
    return
  before = jax.tree_util.tree_leaves(namespace["variables"]["batch_stats"])
  after = jax.tree_util.tree_leaves(adapted["batch_stats"])
  assert not all(np.allclose(a, b) for a, b in zip(before, after))
  if index == 1:
    for a, b in zip(jax.tree_util.tree_leaves(namespace["fast"]["batch_stats"]),
                    jax.tree_util.tree_leaves(namespace["variables"]["batch_stats"])):
      assert a.shape == b.shape
