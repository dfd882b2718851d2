r"""K CycleGAN translators in one compiled program vs the same K trained one
after another, and the cost of a translator against AdaBN's one pass.

    python benchmarks/cyclegan_many.py                 # CPU: K = 4, 32x32, width 8, 2 blocks, 100 steps of batch 4
    python benchmarks/cyclegan_many.py --k=32 --features=32 --n_blocks=6 --size=64   # on a GPU

Side by side in one process, the calls alternating (``benchmarks/common.py``):
``bnjax.cyclegan.train_translators`` with K target sets in one call (the
stack mapped by ``--strategy``) against K calls with one target set each,
every call after its program has compiled. Reported: the seconds of each,
the ratio (one at a time / stacked; > 1: the stack is faster), translator
images per second (``K x steps x batch`` target images over the wall time of
the K trainings) and the compile time of each. Both sides
train the same translators (the same keys): the final mean cycle loss of
each is printed beside it.

The translator's cost is then set against AdaBN's: one exact pass of
``bnjax.adapt.recompute_batch_stats`` over the same target set with a
U-Net of the benchmark's width (``--unet_features``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import adapt, cyclegan, data, models, stacking

try:
  from benchmarks.common import first_call, row, side_by_side
except ImportError:  # run as a script
  from common import first_call, row, side_by_side


def run(k: int = 4, steps: int = 100, size: int = 32, features: int = 8, n_blocks: int = 2,
        disc_features: int = 8, disc_layers: int = 2, batch: int = 4, n: int = 64,
        strategy: str = "auto", unet_features: int = 8, reps: int = 3) -> list[dict]:
  cfg = cyclegan.CycleGANConfig(steps=steps, batch_size=batch, features=features,
                                n_blocks=n_blocks, disc_features=disc_features,
                                disc_layers=disc_layers, steps_per_call=min(50, steps),
                                verbose=False)
  source = data.Domain(90, 50, 170, 50)
  src, _ = data.make_dataset(jax.random.key(0), source, n, size=size)
  targets = jnp.stack([data.make_dataset(jax.random.key(1 + i),
                                         data.Domain(90 + 15 * (i + 1), 50, 170 + 15 * (i + 1),
                                                     50), n, size=size)[0]
                       for i in range(k)])
  keys = jax.random.split(jax.random.key(2), k)
  name = stacking.resolve(strategy)
  print(f"backend {jax.default_backend()}, {jax.devices()[0].device_kind}; K = {k} translators, "
        f"{size}x{size}, generator width {features} x {n_blocks} blocks, discriminator "
        f"{disc_features} x {disc_layers} layers, {steps} steps of batch {batch}, "
        f"strategy {name}", flush=True)

  last = {}  # each side's latest losses, read after the timing

  def stacked():
    last["stack"] = cyclegan.train_translators(keys, src, targets, cfg,
                                               strategy=strategy)[1]["losses"]
    return last["stack"]

  def one_by_one():
    last["one"] = [cyclegan.train_translators(keys[i:i + 1], src, targets[i:i + 1], cfg,
                                              strategy=strategy)[1]["losses"] for i in range(k)]
    return last["one"]

  c_stack = first_call(stacked)
  c_one = first_call(one_by_one)
  t_stack, t_one = side_by_side([stacked, one_by_one], reps)
  cycle = cyclegan.LOSS_NAMES.index("cycle")
  loss_stack = float(np.mean(last["stack"][-1, :, cycle]))
  loss_one = float(np.mean([h[-1, 0, cycle] for h in last["one"]]))
  images = k * steps * batch
  print(f"{'':>22} {'seconds':>9} {'translator img/s':>17} {'compile':>9} "
        f"{'final cycle loss':>17}")
  print(f"{'K in one program':>22} {t_stack:>9.2f} {images / t_stack:>17.1f} "
        f"{c_stack - t_stack:>8.1f}s {loss_stack:>17.4f}")
  print(f"{'one at a time':>22} {t_one:>9.2f} {images / t_one:>17.1f} "
        f"{c_one - t_one:>8.1f}s {loss_one:>17.4f}")
  print(f"ratio (one at a time / stacked): {t_one / t_stack:.2f}x", flush=True)
  rows = [row("cyclegan_many", f"K={k} {name}, width {features} {size}x{size}", t_stack,
              t_one, f"{k} trainings one by one", "> 1 (stack faster)",
              values=(loss_stack, loss_one))]

  # Against AdaBN: one exact pass over one target set.
  model = models.UNet(features=unet_features, depth=4)
  variables = models.init_variables(model, jax.random.key(3), (size, size, 1))
  adabn = lambda: adapt.recompute_batch_stats(model, variables, targets[0], mode="exact")
  first_call(adabn)
  (t_adabn,) = side_by_side([adabn], reps)
  per_translator = t_stack / k
  print(f"AdaBN, one exact pass over {n} images (U-Net width {unet_features}): {t_adabn:.3f} s; "
        f"a translator's training (stacked, per translator): {per_translator:.2f} s = "
        f"{per_translator / t_adabn:.0f}x AdaBN", flush=True)
  rows.append(row("cyclegan_cost", f"1 translator ({steps} steps) vs AdaBN pass", per_translator,
                  t_adabn, "AdaBN exact pass", "< 1: translation costs more"))
  rows[0]["translator_images_per_s"] = images / t_stack
  rows[0]["translator_images_per_s_one_by_one"] = images / t_one
  rows[0]["compile_stack_s"] = c_stack - t_stack
  rows[0]["compile_one_s"] = c_one - t_one
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in (("k", 4), ("steps", 100), ("size", 32), ("features", 8), ("n_blocks", 2),
                        ("disc_features", 8), ("disc_layers", 2), ("batch", 4), ("n", 64),
                        ("unet_features", 8), ("reps", 3)):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--strategy", default="auto")
  run(**vars(p.parse_args()))


if __name__ == "__main__":
  main()
