r"""When do a flow's BatchNorm running statistics blow up its validation loss?
A search over what the flow diary had and bnjax's generative study did not.

    python experiments/flow_blowup.py --config=experiments/configs/flow_blowup.py --workdir=runs/flow_blowup
    python experiments/flow_blowup.py --config=experiments/configs/flow_blowup.py --config.run=bnjax,diary --config.batch_sizes=8 --workdir=runs/flow_blowup_small

Expected on 2 CPU cores (the default: scikit-learn's digits, padded to
16x16 where a setting says so, RealNVP of width 8 with one residual block per
coupling, 300 steps at batch sizes 8, 32, 128 and 500, one seed, the
settings below): about 14 minutes (850 s measured; with batch 500 too, 37
minutes). One statistic per pixel on pixels that are 0 in every training
image, without dequantisation, blows the validation loss up to 1e15-1e17
bits/dim while training reads -15, at every batch size; dequantisation or
one statistic per channel removes it, exact recomputation mostly, a larger
epsilon and float64 do not.
``flow_blowup.md`` has every table, docs/guides/generative.md the summary.

Each setting overrides ``base``; ``run`` names the settings to train.
"""

import os
import runpy

from ml_collections import config_dict

# The fields every experiment shares (_base.py), loaded by path as config files are.
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))

# One factor at a time from bnjax's generative study toward the diary's
# flow (MNIST-like constant borders, one statistic per pixel, unbounded
# log-scales, no dequantization), then the diary's flow with one repair each.
SETTINGS = {
    "bnjax": {},                                            # the generative study's flow
    "padded": {"size": 16},                                 # constant 4-pixel borders
    "per_pixel": {"size": 16, "norm_axes": "dimension"},    # one statistic per pixel
    "no_dequantization": {"size": 16, "norm_axes": "dimension", "dequantize": False},
    "diary": {"size": 16, "norm_axes": "dimension", "dequantize": False, "bounded": False},
    "diary_float64": {"size": 16, "norm_axes": "dimension", "dequantize": False,
                      "bounded": False, "dtype": "float64"},
    "diary_momentum_099": {"size": 16, "norm_axes": "dimension", "dequantize": False,
                            "bounded": False, "momentum": 0.99},
    # Repairs of the diary's flow (exact recomputation is measured on every one).
    "repair_epsilon": {"size": 16, "norm_axes": "dimension", "dequantize": False,
                            "bounded": False, "epsilon": 1e-2},
    # ActNorm per channel, as Glow has it (per pixel it is initialised to
    # 1/sqrt(eps) on the constant border and diverges at once).
    "repair_actnorm": {"size": 16, "dequantize": False, "bounded": False, "norm": "actnorm"},
    "repair_per_channel": {"size": 16, "dequantize": False, "bounded": False},
    "repair_dequantize": {"size": 16, "norm_axes": "dimension", "bounded": False},
}


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  if arg not in ("cpu",):
    raise ValueError(f"flow_blowup config: the argument must be 'cpu', got {arg!r}")
  c = config_dict.ConfigDict()
  c.preset = arg
  c.seed = 0
  c.seeds = 1                 # retrainings of every (setting, batch size)
  c.n_val = 297               # digits held out (of 1797): the first n_val of a seeded permutation
  c.batch_sizes = "8,32,128"  # 500 too (the diary's): --config.batch_sizes=8,32,128,500, 27 min
  c.run = ",".join(SETTINGS)  # the settings trained, in this order
  # The flow every setting starts from (bnjax.flows.RealNVP, FlowConfig).
  c.base = config_dict.ConfigDict(dict(
      size=8,                 # 8: the digits; 16: padded by 4 zero pixels on each side
      norm="batch", norm_axes="channel", bounded=True, dequantize=True, dtype="float32",
      epsilon=1e-5, momentum=0.9, features=8, blocks=1, couplings=3, steps=300,
      learning_rate=1e-3))
  c.settings = config_dict.ConfigDict({k: config_dict.ConfigDict(v, type_safe=False)
                                       for k, v in SETTINGS.items()})
  return c
