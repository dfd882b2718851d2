"""Run by tests/test_distributed.py, in 1 process or under ``python -m
bnjax.launch``: trains a 4-model stack and writes its parameters (process 0)."""

import os
import sys

from bnjax import distributed

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from bnjax import data, inference, models, train  # noqa: E402


def main(out: str):
  domains = [data.Domain(60 + 30 * i, 30, 150 + 20 * i, 30) for i in range(4)]
  pairs = [data.make_dataset(data.split_key(0, d, "train"), d, 24, 16) for d in domains]
  images = np.stack([np.asarray(p[0]) for p in pairs])
  masks = np.stack([np.asarray(p[1]) for p in pairs])
  if os.environ.get("PERTURB_PROCESS") == str(jax.process_index()):
    images = images * 0.99  # this process's data differ from the others'
  model = models.UNet(features=4, depth=2)
  config = train.TrainConfig(epochs=2, batch_size=8, verbose=False, patience=None)
  variables, history = train.train_many(model, images, masks, config, strategy="vmap")
  gathered = distributed.gather(variables)
  flat = traverse_util.flatten_dict(gathered, sep="/")
  # What the models predict on their training images (compared across runs).
  predictions = inference.stacked_predict(model, gathered, images, strategy="unroll")
  print(f"process {jax.process_index()} of {jax.process_count()}, devices "
        f"{len(jax.devices())}: val_dice {np.round(history['val_dice'][-1], 4).tolist()}",
        flush=True)
  if distributed.is_primary():
    np.savez(out, **flat, val_dice=history["val_dice"], predictions=predictions, masks=masks)


if __name__ == "__main__":
  main(sys.argv[1])
