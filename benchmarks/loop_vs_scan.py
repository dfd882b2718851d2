r"""Training steps scanned (``lax.scan``) against one compiled step called in a
Python loop, side by side in one run.

    python benchmarks/loop_vs_scan.py        # steps=50

1. ``conv_dw``: the weight gradient of one 3x3 convolution (16 -> 16
   channels, 8x8, batch 64) and one SGD update, ``steps`` times.
2. ``flow_step``: the training step of ``bnjax.flows.fit`` (RealNVP of width
   16 on 8x8 images, batch 32): the step ``fit`` compiles, called ``steps``
   times, against the same step inside ``lax.scan`` (the same batches and
   keys; the step losses are compared).

On XLA:CPU (jax 0.10) a convolution's gradient inside a loop body is lowered
without the fast library kernels the same operation gets at the top level of
a program; ``bnjax._fitting`` therefore calls a compiled step per batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import compiler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, row, side_by_side  # noqa: E402


def _conv_dw(steps: int):
  x = jax.random.uniform(jax.random.key(0), (64, 8, 8, 16))
  w0 = jax.random.normal(jax.random.key(1), (3, 3, 16, 16)) * 0.1

  def update(w):
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return w - 1e-2 * jax.grad(lambda w: jnp.mean(conv(w) ** 2))(w)

  one = jax.jit(update)
  scanned = jax.jit(lambda w: jax.lax.scan(lambda w, _: (update(w), None), w, None,
                                           length=steps)[0])

  def loop():
    w = w0
    for _ in range(steps):
      w = one(w)
    return w

  jax.block_until_ready((loop(), scanned(w0)))
  t_loop, t_scan = side_by_side([loop, lambda: scanned(w0)], reps=3)
  diff = float(jnp.max(jnp.abs(loop() - scanned(w0))))
  return row("loop_vs_scan", f"conv_dw x{steps} (3x3 16->16, 8x8, b64)", t_loop, t_scan,
             "lax.scan of the step", "> 1", values=(diff, 0.0))


def _flow_step(steps: int):
  from bnjax import flows
  model = flows.RealNVP((8, 8, 1), features=16, blocks=1)
  config = flows.FlowConfig(steps=steps, batch_size=32, levels=17)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 17, (256, 8, 8, 1)) / 16,
                       jnp.float32)
  variables = model.init(jax.random.key(0), images[:32], train=True)
  opt = flows._optimizer(config).init(variables["params"])
  carry0 = (variables["params"], variables["batch_stats"], opt)
  step = flows._train_step(model, config)
  noise_key = jax.random.key(1)
  order = np.random.default_rng(0).integers(0, 256, (steps, 32)).astype(np.int32)
  ts = np.arange(steps, dtype=np.int32)

  def loop():
    carry, losses = carry0, []
    for t in range(steps):
      carry, loss = step(carry, order[t], np.int32(t), images, noise_key)
      losses.append(loss)
    return jnp.stack(losses)

  scanned = jax.jit(lambda c, o, t: jax.lax.scan(
      lambda c, a: step(c, a[0], a[1], images, noise_key), c, (o, t))[1])
  # The same step through bnjax's driver (compiler.driven, its form for this backend).
  driven = compiler.driven(lambda c, o, t: step(
      c, jax.lax.dynamic_index_in_dim(o, t, 0, keepdims=False), t, images, noise_key))
  by_driver = lambda: driven(carry0, jnp.asarray(order), steps)[1]
  jax.block_until_ready((loop(), scanned(carry0, order, ts), by_driver()))
  t_loop, t_scan, t_driven = side_by_side(
      [loop, lambda: scanned(carry0, order, ts), by_driver], reps=3)
  # the same steps: the training losses agree (Adam turns rounding differences of
  # the two lowerings into parameter differences, so losses are compared)
  diff = float(jnp.max(jnp.abs(loop() - scanned(carry0, order, ts))))
  case = f"flow_step x{steps} (RealNVP w16, 8x8, b32)"
  return [row("loop_vs_scan", case, t_loop, t_scan, "lax.scan of the step", "> 1",
              values=(diff, 0.0)),
          row("loop_vs_scan", case, t_loop, t_driven,
              f"compiler.driven ({compiler.loop_form()})", "<= 1.5",
              values=(float(jnp.max(jnp.abs(loop() - by_driver()))), 0.0))]


def run(steps: int = 50) -> list[dict]:
  return [_conv_dw(steps), *_flow_step(steps)]


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args()
  rows = run(args.steps)
  print_table(rows)
  for r in rows:
    print(f"{r['case']}: largest difference, one call per step vs {r['reference']}: "
          f"{r['value']:.3g} (conv: weights; flow: step losses in bits/dim)")
