r"""Online test-time adaptation of a U-Net, bnjax vs PyTorch, side by side in one run.

    python benchmarks/tent_online.py                          # the four shapes below
    python benchmarks/tent_online.py --shapes=16x64x16 --methods=tent --steps=8

For each shape (U-Net width x image side x batch size): a stream of
``--steps`` batches of random images, adapted online by

* bnjax: ``bnjax.streams.run(model, variables, stream, method)`` with the
  driver it picks on this backend (``loop="auto"``: on CPU the compiled step
  called once per batch, elsewhere one ``lax.scan``) and, for ``tent``, the
  other form (on CPU the whole stream as one ``lax.scan``, the form every
  stream ran in before; on an accelerator the step called per batch);
* PyTorch 2.13 (CPU): the methods' reference pattern written out per batch
  on ``benchmarks/torch_unet.py`` (the same architecture): the model in
  train mode with BatchNorm using the batch's moments (no running
  statistics), only the BatchNorm scale and bias trainable, Adam 1e-3;
  ``tent``: forward, mean per-pixel entropy, backward, step; ``eata``: the
  per-pixel reliable-entropy weighting (E < 0.4 ln C, weight exp(E0 - E))
  and the Fisher anchor (alpha 2000, Fisher of the argmax cross-entropy on
  32 unlabelled source images in batches of 8, computed with every stream as
  ``streams.run`` does); ``sar``: the reliable pixels' entropy, a
  sharpness-aware step (rho 0.05: weights moved by rho g / |g|, a second
  forward and backward pass, the update of the original weights) and the
  reset check on the moving average of the loss.

Set-wise TENT (``--no_setwise`` skips it), once per width and side: ``bnjax.methods.tent``
(``steps`` Adam steps on minibatches of 16 drawn from 64 images, then exact
statistics of the set) against the same in PyTorch (the statistics by one
pass with a cumulative average, ``momentum=None``).

Each callable runs a whole stream (or set-wise adaptation); their calls
alternate (``common.side_by_side``) and the medians are compared:
ratio = PyTorch time / bnjax time (> 1: bnjax faster). Without torch the
script times bnjax alone.
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import numpy as np

from bnjax import compiler, methods, models, streams

try:
  from benchmarks.common import print_table, row, side_by_side
except ImportError:  # run as a script
  from common import print_table, row, side_by_side

SHAPES = "8x32x1,8x32x16,16x64x1,16x64x16"
METHODS = "tent,eata,sar"


def _model(width: int, side: int):
  model = models.UNet(features=width)
  return model, models.init(model, jax.random.key(0), (side, side, 1))


def bnjax_stream(width, side, batch, steps, method, loop="auto"):
  model, v = _model(width, side)
  x = jax.random.uniform(jax.random.key(1), (steps, batch, side, side, 1))
  options = {}
  if method == "eata":
    options["source_images"] = jax.random.uniform(jax.random.key(2), (32, side, side, 1))
  return lambda: streams.run(model, v, x, method, loop=loop, **options).masks


def _torch_setup(width, side):
  import torch
  from torch import nn
  try:
    from benchmarks import torch_unet
  except ImportError:
    import torch_unet
  torch.manual_seed(0)
  model = torch_unet.UNet(width, 4)
  source = {k: t.clone() for k, t in model.state_dict().items()}
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

  def configure():
    """The source weights, train mode, BatchNorm on the batch's moments, only
    the BatchNorm affine parameters trainable; a new Adam."""
    model.load_state_dict(source, strict=False)
    model.train()
    model.requires_grad_(False)
    for m in bns:
      m.requires_grad_(True)
      m.track_running_stats, m.running_mean, m.running_var = False, None, None
    params = [p for m in bns for p in (m.weight, m.bias)]
    return params, torch.optim.Adam(params, lr=1e-3)

  return model, bns, configure


def _entropy(out):
  """Per-pixel softmax entropy [B, H, W] of logits [B, C, H, W]."""
  logp = out.log_softmax(1)
  return -(logp.exp() * logp).sum(1)


def torch_stream(width, side, batch, steps, method):
  import torch

  model, bns, configure = _torch_setup(width, side)
  xs = torch.rand(steps, batch, 1, side, side)
  src = torch.rand(32, 1, side, side)
  e0 = 0.4 * math.log(2)

  def fisher(params):
    """EATA's Fisher: squared gradients of the argmax cross-entropy."""
    f = [torch.zeros_like(p) for p in params]
    for i in range(0, len(src), 8):
      out = model(src[i:i + 8])
      loss = torch.nn.functional.cross_entropy(out, out.argmax(1))
      grads = torch.autograd.grad(loss, params)
      f = [a + g ** 2 / 4 for a, g in zip(f, grads)]
    return f

  def run():
    params, opt = configure()
    if method == "eata":
      fish, anchor = fisher(params), [p.detach().clone() for p in params]
    ema, preds = None, []
    for x in xs:
      out = model(x)
      ent = _entropy(out)
      if method == "tent":
        loss = ent.mean()
      else:
        keep = (ent < e0).float()
        if method == "eata":
          w = keep * torch.exp(e0 - ent.detach())
          loss = (w * ent).sum() / keep.sum().clamp(min=1)
          loss = loss + 2000 * sum((f * (p - a) ** 2).sum()
                                   for f, p, a in zip(fish, params, anchor))
        else:
          loss = (keep * ent).sum() / keep.sum().clamp(min=1)
      opt.zero_grad()
      loss.backward()
      if method == "sar":  # sharpness-aware: a second pass at the perturbed weights
        with torch.no_grad():
          norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
          moves = [0.05 * p.grad / (norm + 1e-12) for p in params]
          for p, e in zip(params, moves):
            p.add_(e)
        opt.zero_grad()
        ent2 = _entropy(model(x))
        keep2 = keep * (ent2 < e0).float()
        loss2 = (keep2 * ent2).sum() / keep2.sum().clamp(min=1)
        loss2.backward()
        with torch.no_grad():
          for p, e in zip(params, moves):
            p.sub_(e)
        value = float(loss2)
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        if ema < 0.2 * math.log(2) / math.log(1000):
          params, opt = configure()
      opt.step()
      preds.append(out.argmax(1))
    return torch.stack(preds)

  return run


def bnjax_setwise(width, side, steps):
  model, v = _model(width, side)
  x = jax.random.uniform(jax.random.key(1), (64, side, side, 1))
  return lambda: methods.tent(model, v, x, steps=steps, batch_size=16, key=jax.random.key(3))


def torch_setwise(width, side, steps):
  import torch

  model, bns, configure = _torch_setup(width, side)
  x = torch.rand(64, 1, side, side)

  def run():
    params, opt = configure()
    g = torch.Generator().manual_seed(3)
    order = torch.cat([torch.randperm(64, generator=g) for _ in range(-(-steps * 16 // 64))])
    for s in range(steps):
      out = model(x[order[16 * s:16 * (s + 1)]])
      loss = _entropy(out).mean()
      opt.zero_grad()
      loss.backward()
      opt.step()
    with torch.no_grad():  # the set's statistics under the adapted affine parameters
      for m in bns:
        m.track_running_stats, m.momentum = True, None
        m.running_mean, m.running_var = torch.zeros(m.num_features), torch.ones(m.num_features)
        m.num_batches_tracked = torch.tensor(0)
      for i in range(0, 64, 16):
        model(x[i:i + 16])
    return [m.running_mean for m in bns]

  return run


def _have_torch() -> bool:
  try:
    import torch
  except ImportError:
    print("PyTorch is not installed (pip install torch==2.13.0): timing bnjax alone")
    return False
  torch.set_num_threads(max(1, torch.get_num_threads()))
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; jax {jax.__version__} "
        f"on {jax.default_backend()}", flush=True)
  return True


def run(shapes: str = SHAPES, methods_: str = METHODS, steps: int = 16, reps: int = 5,
        setwise: bool = True, scan: bool = True) -> list[dict]:
  have_torch = _have_torch()
  rows = []
  for spec in shapes.split(","):
    width, side, batch = (int(v) for v in spec.split("x"))
    case = f"w{width} {side}x{side} B{batch}, {steps} batches"
    for method in methods_.split(","):
      fns = [bnjax_stream(width, side, batch, steps, method)]
      names = ["bnjax"]
      other = "scan" if compiler.loop_form() == "loop" else "loop"
      if scan and method == "tent":
        fns.append(bnjax_stream(width, side, batch, steps, method, loop=other))
        names.append(f"bnjax {other}")
      if have_torch:
        fns.append(torch_stream(width, side, batch, steps, method))
        names.append("PyTorch")
      t0 = time.perf_counter()
      for fn in fns:  # compile, warm up
        jax.block_until_ready(fn())
      times = side_by_side(fns, reps)
      print(f"{method} {case}: " + ", ".join(
          f"{n} {1e3 * t / steps:.1f} ms/batch" for n, t in zip(names, times))
          + f" (warm-up {time.perf_counter() - t0:.0f} s)", flush=True)
      if have_torch:
        rows.append(row(f"online {method}", case, times[0], times[-1], "PyTorch 2.13 CPU",
                        ">= 1x"))
      if f"bnjax {other}" in names:
        rows.append(row(f"online {method}", case, times[0], times[1],
                        "bnjax lax.scan" if other == "scan" else "bnjax step per batch",
                        "the chosen form's gain"))
  if setwise:
    for width, side in dict.fromkeys(tuple(int(v) for v in spec.split("x")[:2])
                                     for spec in shapes.split(",")):
      case = f"w{width} {side}x{side}, 64 images, {steps} steps of 16"
      fns = [bnjax_setwise(width, side, steps)]
      if have_torch:
        fns.append(torch_setwise(width, side, steps))
      for fn in fns:
        jax.block_until_ready(fn())
      times = side_by_side(fns, reps)
      print(f"set-wise tent {case}: bnjax {times[0]:.2f} s"
            + (f", PyTorch {times[1]:.2f} s" if have_torch else ""), flush=True)
      if have_torch:
        rows.append(row("set-wise tent", case, times[0], times[1], "PyTorch 2.13 CPU", ">= 1x"))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shapes", default=SHAPES, help="width x side x batch, comma-separated")
  p.add_argument("--methods", default=METHODS, help="online methods, comma-separated")
  p.add_argument("--steps", type=int, default=16, help="batches per stream (set-wise steps)")
  p.add_argument("--reps", type=int, default=5, help="alternating calls of each side")
  p.add_argument("--no_setwise", action="store_true", help="skip set-wise TENT")
  p.add_argument("--no_scan", action="store_true",
                 help="skip the other loop form's column (lax.scan on CPU)")
  a = p.parse_args()
  rows = run(a.shapes, a.methods, a.steps, a.reps, not a.no_setwise, not a.no_scan)
  if rows:
    print_table(rows)


if __name__ == "__main__":
  main()
