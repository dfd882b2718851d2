r"""The U-Net's 3x3 convolutions one at a time, bnjax vs PyTorch, by part.

    python benchmarks/conv_parts.py                    # width 16, 64x64, batch 16
    python benchmarks/conv_parts.py --shape=64x64x16   # the paper network

Where a training step's time goes on the convolution side: for each 3x3
convolution of a U-Net (``bnjax.models.UNet`` levels: two per DoubleConv,
the decoder's first one on the concatenated skip), the forward pass, the
input gradient and the kernel gradient are timed alone, compiled as bnjax
compiles its steps (``bnjax.compiler``, ``models.Conv`` with the model's
lowering), against PyTorch's ``conv2d``, ``grad.conv2d_input`` and
``grad.conv2d_weight`` on the same shapes (NCHW, its default). The first
layer's input gradient is skipped: neither framework computes it in training.
Calls alternate in blocks of about 0.1 s (``common.per_call_blocks``).
Rows: the sums over the layers, ratio = PyTorch time / bnjax time.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bnjax import compiler, models

try:
  from benchmarks.common import per_call_blocks, print_table, row
except ImportError:  # run as a script
  from common import per_call_blocks, print_table, row

PARTS = ("forward", "input grad", "kernel grad")


def layers(width: int, side: int, depth: int = 4) -> list[tuple[int, int, int]]:
  """(side, in channels, out channels) of every 3x3 convolution, in forward order."""
  out, c, s = [], 1, side
  for i in range(depth + 1):  # encoder levels, then the bottleneck
    w = width * 2**i
    out += [(s, c, w), (s, w, w)]
    c, s = w, s // 2
  s = side // 2**depth  # the bottleneck's
  for i in reversed(range(depth)):
    w, s = width * 2**i, s * 2
    out += [(s, 2 * w, w), (s, w, w)]
  return out


def bnjax_parts(side, cin, cout, batch, impl="auto"):
  conv = models.Conv(cout, 3, use_bias=False, impl=impl)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, cin))
  g = jax.random.normal(jax.random.key(1), (batch, side, side, cout))
  params = conv.init(jax.random.key(2), x)

  apply = conv.apply
  fwd = compiler.jit(apply)
  dx = compiler.jit(lambda p, x, g: jax.vjp(lambda x: apply(p, x), x)[1](g)[0])
  dw = compiler.jit(lambda p, x, g: jax.vjp(lambda p: apply(p, x), p)[1](g)[0])
  return [lambda: fwd(params, x), lambda: dx(params, x, g), lambda: dw(params, x, g)]


def torch_parts(side, cin, cout, batch):
  import torch

  torch.manual_seed(0)
  x, w = torch.randn(batch, cin, side, side), torch.randn(cout, cin, 3, 3)
  g = torch.randn(batch, cout, side, side)
  f = torch.nn.functional
  return [lambda: f.conv2d(x, w, padding=1),
          lambda: torch.nn.grad.conv2d_input(x.shape, w, g, padding=1),
          lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, padding=1)]


def _per_call(fns, block_s, reps):
  """Median seconds per call of each function, timed in blocks of about
  ``block_s`` seconds that alternate between the functions."""
  once = [float(per_call_blocks([fn], 1, 3)[0].min()) for fn in fns]  # compile, warm up
  calls = [max(1, int(block_s / max(t, 1e-6))) for t in once]
  return [float(np.median(t)) for t in per_call_blocks(fns, calls, reps)]


def run(shape: str = "16x64x16", reps: int = 5, block_s: float = 0.1,
        torch_reference: bool = True, verbose: bool = True) -> list[dict]:
  """Rows per part (sums over the layers); per-layer times printed."""
  try:
    width, side, batch = (int(v) for v in shape.split("x"))
  except ValueError:
    raise ValueError(f"shape must be WIDTHxSIDExBATCH, e.g. 16x64x16, got {shape!r}") from None
  if min(width, side, batch) < 1 or side % 16:
    raise ValueError(f"shape {shape!r}: width, side and batch must be >= 1 and side a "
                     "multiple of 16 (four 2x2 poolings)")
  try:
    if not torch_reference:
      raise ImportError
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
    print("timing bnjax alone" if not torch_reference else
          "PyTorch is not installed (pip install torch==2.13.0): timing bnjax alone")
  sums = np.zeros((2, len(PARTS)))
  if verbose:
    print(f"width {width}, {side}x{side}, batch {batch}; ms per call, bnjax / PyTorch")
    print(f"{'side':>5} {'in':>5} {'out':>5}  " + "  ".join(f"{p:>17}" for p in PARTS))
  for k, (s, cin, cout) in enumerate(layers(width, side)):
    ours = bnjax_parts(s, cin, cout, batch)
    refs = torch_parts(s, cin, cout, batch) if have_torch else []
    cells = []
    for j in range(len(PARTS)):
      if k == 0 and j == 1:  # no input gradient for the image
        cells.append(f"{'-':>17}")
        continue
      fns = [ours[j]] + ([refs[j]] if refs else [])
      times = _per_call(fns, block_s, reps) + [np.nan] * (2 - len(fns))
      sums[:, j] += times
      cells.append(f"{1e3 * times[0]:>8.2f} {1e3 * times[1]:>8.2f}")
    if verbose:
      print(f"{s:>5} {cin:>5} {cout:>5}  " + "  ".join(cells), flush=True)
  case = f"width {width}, {side}x{side}, batch {batch}"
  print("sums (ms): " + ", ".join(
      f"{p} {1e3 * sums[0, j]:.1f}" + (f" / {1e3 * sums[1, j]:.1f}" if have_torch else "")
      for j, p in enumerate(PARTS)))
  if not have_torch:
    return []
  return [row("conv_parts", f"{p}, {case}", sums[0, j], sums[1, j], "PyTorch 2.13 CPU")
          for j, p in enumerate(PARTS)]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="16x64x16", help="width x side x batch")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--block_s", type=float, default=0.1, help="Seconds per timed block, roughly.")
  p.add_argument("--no_torch", action="store_true", help="Time bnjax alone.")
  a = p.parse_args()
  rows = run(a.shape, a.reps, a.block_s, not a.no_torch)
  if rows:
    print_table(rows)


if __name__ == "__main__":
  main()
