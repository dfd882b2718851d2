r"""The shift benchmark: U-Net variants x shifts x severities x methods x seeds.

    python experiments/benchmark.py --config=experiments/configs/benchmark.py --workdir=runs/benchmark
    python experiments/benchmark.py --config=experiments/configs/benchmark.py:full --workdir=runs/benchmark_full
    python experiments/benchmark.py --config=experiments/configs/benchmark.py --config.variants=reference,strided,ce --workdir=runs/bench_variants

Expected on 2 CPU cores (the default: 32x32 images, width 8, 3 seeds, the
``reference`` and ``instance`` variants, every shift at severities 1, 3, 5,
and 72 CycleGAN translators: 6 shifts x severities 3, 5 x 3 seeds x 2
generators, 300 steps each): about 50 minutes (2992 s measured with a CI run
sharing the cores; 348 s without the translators). Add
``--config.methods=none,adabn,adabn_prior,tent,histogram_match`` for the
6-minute run without them. On the source (90,50,170,50) the reference U-Net scores
about 0.86 IoU; the brightness shift at severity 5 (+60: the domain
(150,50,230,50)) drops it to the mask fraction (about 0.2) without
adaptation, and AdaBN, TENT and histogram matching bring it back to the
source level (the translators at this budget to about 0.47); the
InstanceNorm U-Net needs no adaptation there. The table
and the findings are in docs/guides/benchmark.md.

``full``: 64x64 images, width 16, every variant, every severity, 5 seeds,
more data (an accelerator's work). Variants, shifts, severities and methods
are comma-separated lists; the names are ``experiments/benchmark.py``'s
``VARIANTS``, ``bnjax.shifts.SHIFTS`` and ``METHODS``.
"""

import os
import runpy

from ml_collections import config_dict

# The fields every experiment shares (_base.py), loaded by path as config files are.
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))

CPU_VARIANTS = "reference,instance"
ALL_VARIANTS = ("reference,strided,resize_conv,no_skip,ce,dice,instance,group,layer,no_norm,"
                "standardize")
ALL_SHIFTS = BASE["ALL_SHIFTS"]


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  c = BASE["get_config"](arg, "benchmark")
  full = arg == "full"
  c.seeds = 5 if full else 3            # retrainings (and data draws) per variant
  c.source = BASE["SOURCE"]
  c.variants = ALL_VARIANTS if full else CPU_VARIANTS
  c.shifts = ALL_SHIFTS
  c.severities = "1,2,3,4,5" if full else "1,3,5"  # severity 0 (the source) is always scored
  c.methods = ("none,adabn,adabn_prior,tent,histogram_match,cyclegan_transpose,"
               "cyclegan_resize_conv" + (",oracle" if full else ""))

  c.data.n_eval = 200 if full else 64
  c.data.n_adapt = 200 if full else 64

  c.adapt = config_dict.ConfigDict()
  c.adapt.batch_size = config_dict.placeholder(int)  # None: the whole adaptation set
  c.adapt.prior = 16.0   # adabn_prior: source statistics weighted as N = 16 images

  c.tent = BASE["tent"]()  # bnjax.methods.tent

  # Pixel-level translation (methods cyclegan_transpose, cyclegan_resize_conv):
  # translators trained per (shift, severity, seed) at these shifts and
  # severities only; c.cyclegan.train holds bnjax.cyclegan.CycleGANConfig fields.
  c.cyclegan = config_dict.ConfigDict()
  c.cyclegan.shifts = ALL_SHIFTS if full else "brightness,contrast,gamma,gradient,edges,blur"
  c.cyclegan.severities = "1,2,3,4,5" if full else "3,5"
  c.cyclegan.train = config_dict.ConfigDict({
      "steps": 3000 if full else 300, "batch_size": 1 if full else 2,
      "learning_rate": 2e-4, "lambda_cycle": 10.0, "pool_size": 50,
      "features": 32 if full else 8, "n_blocks": 6 if full else 2,
      "disc_features": 32 if full else 8, "disc_layers": 3 if full else 2,
      "noise_sigma": 0.0, "steps_per_call": 50, "verbose": False})
  c.cyclegan.train.lambda_identity = config_dict.placeholder(float)  # None: 0.5 lambda_cycle

  c.strategy = "auto"    # how stacks are mapped: auto | vmap | unroll
  # Pairs per compiled call of the methods (bnjax.distributed.map_pairs' chunk):
  # 1 on CPU, where a stack of pairs runs no faster per pair and its compile
  # grows with it (docs/measured.md); many on an accelerator (vmap).
  c.pair_chunk = 32 if full else 1
  return c
