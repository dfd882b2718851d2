r"""One U-Net training step, bnjax vs PyTorch, side by side on this machine.

    python benchmarks/train_step.py                       # the three shapes below
    python benchmarks/train_step.py --shapes=8x32x32      # one: width x side x batch

Shapes (width, side, batch): (8, 32, 32), (16, 64, 16), (64, 64, 16) (the
paper network). Each side runs forward + backward + Adam update on float32
data, warmed up; blocks of steps (about 0.4 s, at least one step) alternate
between bnjax and PyTorch for 15 rounds, and the median step time of each is
reported as images per second, with the ratio bnjax / PyTorch (> 1: bnjax is
faster) and the middle half of the per-round ratios (how noisy the machine
was; a 2-core cloud machine drifts 10-20 % from minute to minute). bnjax's
step is the one ``fit`` runs (``bnjax.train.train_step``, jitted, state
donated). The PyTorch reference
(``benchmarks/torch_unet.py``) needs ``pip install torch==2.13.0``; without it
the script says so and times bnjax alone.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from bnjax import compiler, models, train

try:
  from benchmarks.common import per_call_blocks, print_table, row
except ImportError:  # run as a script
  from common import per_call_blocks, print_table, row

SHAPES = "8x32x32,16x64x16,64x64x16"


def bnjax_step(width, side, batch, conv_impl="auto", up_impl="matmul", bn_impl="fused",
               xla_defaults=False):
  model = models.UNet(features=width, conv_impl=conv_impl, up_impl=up_impl, bn_impl=bn_impl)
  tx = train.make_optimizer(train.TrainConfig(optimizer="adam", learning_rate=1e-3, grad_clip=None))
  state = train.init_state(model, tx, jax.random.key(0), (side, side, 1))
  x = jax.random.uniform(jax.random.key(1), (batch, side, side, 1))
  y = jax.random.uniform(jax.random.key(2), (batch, side, side)) > 0.8
  # The step ``fit`` compiles (with XLA's default options if xla_defaults).
  step = compiler.jit(functools.partial(train.train_step, model, tx, "ce+dice"),
                      donate_argnums=0, xla_defaults=xla_defaults)
  box = [state]

  def run():
    box[0], loss = step(box[0], x, y)
    return loss

  return run


def torch_step(width, side, batch):
  import torch

  try:
    from benchmarks import torch_unet
  except ImportError:
    import torch_unet
  torch.manual_seed(0)
  _, step = torch_unet.make_step(width)
  x = torch.rand(batch, 1, side, side)
  y = (torch.rand(batch, side, side) > 0.8).long()

  def run():
    return step(x, y).item()

  return run


def run(shapes: str = SHAPES, blocks: int = 15, block_s: float = 0.4,
        torch_reference: bool = True, **bnjax_options) -> list[dict]:
  """One row per shape; ``bnjax_options`` go to :func:`bnjax_step` (lowerings,
  ``xla_defaults``)."""
  try:
    if not torch_reference:
      raise ImportError
    import torch
    have_torch = True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__} "
          f"on {jax.default_backend()}")
  except ImportError:
    have_torch = False
    print("timing bnjax alone" if not torch_reference else
          "PyTorch is not installed (pip install torch==2.13.0): timing bnjax alone")
  rows = []
  for spec in shapes.split(","):
    width, side, batch = (int(v) for v in spec.split("x"))
    fns = [bnjax_step(width, side, batch, **bnjax_options)]
    if have_torch:
      fns.append(torch_step(width, side, batch))
    t_compile = time.perf_counter()
    jax.block_until_ready(fns[0]())
    t_compile = time.perf_counter() - t_compile
    once = [float(per_call_blocks([f], 1, 2)[0].min()) for f in fns]  # warm-up, size estimate
    steps = max(1, int(block_s / max(once)))
    per_block = per_call_blocks(fns, steps, blocks)
    times = [float(np.median(t)) for t in per_block]
    case = f"width {width}, {side}x{side}, batch {batch}"
    msg = f"{case}: bnjax {batch / times[0]:.1f} img/s ({1e3 * times[0]:.1f} ms/step, compile {t_compile:.1f} s)"
    if have_torch:
      # The spread of the per-round ratios shows how noisy this machine was.
      q1, q3 = np.percentile(per_block[1] / per_block[0], [25, 75])
      msg += (f", PyTorch {batch / times[1]:.1f} img/s ({1e3 * times[1]:.1f} ms/step): "
              f"{times[1] / times[0]:.2f}x (per-round ratios, middle half: {q1:.2f}-{q3:.2f}; "
              f"{blocks} rounds of {steps} step(s))")
      rows.append(row("train_step", case, times[0], times[1], "PyTorch 2.13 CPU", ">= 1x (small shapes)"))
    print(msg, flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default=SHAPES)
  p.add_argument("--blocks", type=int, default=15, help="Rounds of alternating blocks.")
  p.add_argument("--conv_impl", default="auto", choices=models.CONV_IMPLS)
  p.add_argument("--up_impl", default="matmul", choices=models.CONV_IMPLS)
  p.add_argument("--bn_impl", default="fused", choices=models.BN_IMPLS)
  p.add_argument("--xla_defaults", action="store_true",
                 help="Compile with XLA's default options instead of bnjax.compiler's.")
  p.add_argument("--block_s", type=float, default=0.4,
                 help="Seconds per block, roughly (at least one step).")
  p.add_argument("--no_torch", action="store_true", help="Time bnjax alone.")
  a = p.parse_args()
  rows = run(a.shapes, a.blocks, a.block_s, not a.no_torch, conv_impl=a.conv_impl,
             up_impl=a.up_impl, bn_impl=a.bn_impl, xla_defaults=a.xla_defaults)
  if rows:
    print_table(rows)


if __name__ == "__main__":
  main()
