"""Run by tests/test_distributed.py, in 1 process or under ``python -m
bnjax.launch``: exact AdaBN of 7 (model, target set) pairs split with
``distributed.map_pairs``; process 0 writes what came back, and every process
prints the pairs its pair function was handed."""

import sys

from bnjax import distributed

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from bnjax import adapt, data, models, stacking  # noqa: E402

P = 7  # not a multiple of the 4 devices: the last share is padded
MODEL = models.UNet(features=4, depth=2)


def inputs():
  """Seven models (one initialisation, its parameters scaled differently in
  each) and seven target sets."""
  v = MODEL.init(jax.random.key(0), np.zeros((1, 16, 16, 1)), train=False)
  variables = stacking.tree_stack([
      {**v, "params": jax.tree_util.tree_map(lambda a: a * (1.0 + 0.1 * i), v["params"])}
      for i in range(P)])
  sets = [data.make_dataset(data.split_key(0, data.Domain(40 + 20 * i, 30, 160, 30), "adapt"),
                            data.Domain(40 + 20 * i, 30, 160, 30), 10, 16)[0] for i in range(P)]
  return jax.tree_util.tree_map(np.asarray, variables), np.stack([np.asarray(x) for x in sets])


def main(out: str):
  variables, images = inputs()
  handed = []

  def adabn(index, v, x):
    handed.extend(np.asarray(index).tolist())
    # One pass over the 10 images (benchmarks/pairs_split.py times the
    # chunked scheme's host loop of passes split the same way).
    v_ad = adapt.recompute_batch_stats_stacked(MODEL, v, x, mode="exact")
    where = {d.id for leaf in jax.tree_util.tree_leaves(v_ad) for d in leaf.devices()}
    assert where == {d.id for d in x.devices()}, (where, x.devices())  # computed where its share is
    return {"index": index, "device": np.full(len(index), where.pop()),
            "batch_stats": v_ad["batch_stats"]}

  got = distributed.map_pairs(adabn, np.arange(P), variables, images, chunk=1, name="adabn")
  print(f"handed pairs {sorted(set(handed))} ({len(handed)} rows) in process "
        f"{jax.process_index()} of {jax.process_count()}", flush=True)
  if distributed.is_primary():
    flat = traverse_util.flatten_dict(got["batch_stats"], sep="/")
    np.savez(out, index=got["index"], device=got["device"], **flat)


if __name__ == "__main__":
  main(sys.argv[1])
