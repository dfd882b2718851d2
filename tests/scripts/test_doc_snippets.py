"""The snippets of the guide "Adapting your own model" (docs/guides/your_model.md)
and README's example run as written."""

import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


GUIDE = os.path.join(ROOT, "docs", "guides", "your_model.md")


def _snippets(path: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", open(path).read(), re.S)


SNIPPETS = _snippets(GUIDE)


def test_there_are_three_snippets():
  assert len(SNIPPETS) == 3


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index):
  namespace = {"__name__": f"readme_snippet_{index}"}
  exec(compile(SNIPPETS[index], f"{GUIDE} snippet {index}", "exec"), namespace)
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


@pytest.mark.e2e
def test_the_readme_example_runs_and_adaptation_helps():
  """README.md's "In a few lines" example, as written: AdaBN lifts the IoU on
  the brighter target above the unadapted model's (which predicts about
  everything foreground there: IoU near the mask fraction)."""
  text = open(os.path.join(ROOT, "README.md")).read()
  (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
  printed = []
  namespace = {"__name__": "readme_example", "print": lambda *a: printed.append(a)}
  exec(compile(snippet, "README.md example", "exec"), namespace)
  before, after = (float(p[0]) for p in printed)
  y_t = np.asarray(namespace["y_t"])
  assert before < y_t.mean() + 0.1 and after > before + 0.3, (before, after, y_t.mean())
