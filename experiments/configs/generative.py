r"""BatchNorm in generative models: a RealNVP flow's running statistics at small
batches against exact recomputation and ActNorm, its latents against chi_d,
inpainting on logit(x), a label-conditioned VAE, and the flow's bits/dim under
shift against the segmentation gain of AdaBN.

    python experiments/generative.py --config=experiments/configs/generative.py --workdir=runs/generative
    python experiments/generative.py --config=experiments/configs/generative.py:full --workdir=runs/generative_full

Expected on 2 CPU cores (the default: scikit-learn's 8x8 digits, flows of
width 16 with one residual block per coupling, 600 steps at batch sizes 8,
32, 128 and 500, 2 seeds; VAEs of 1500 steps; the shift study on 32x32
Perlin images, its flow on 16x16): about 10 minutes (597 s measured; a rerun
that restores every model, 45 s). The BatchNorm flows do not explode at any
batch size: validation bits/dim with running statistics 2.185 at batch 8,
2.172 after exact recomputation, ActNorm 2.186 (2.046 / 2.041 / 2.064 at
500); the lambda-100 VAE redraws every image under a wrong label as the
given class (rate 1.000) but as a template (input spread 0.025 against
0.159); the flow's bits/dim change ranks AdaBN's gain with Spearman 0.42.
The tables are in docs/guides/generative.md; the run writes
``generative.md`` beside its figures.

``full``: 3000 steps per flow, width 32 with two blocks, 3 seeds, VAEs of
6000 steps, the shift study at 64x64 (its flow at 32x32) with every shift
(an accelerator's work, or a long CPU run).
"""

import os
import runpy

from ml_collections import config_dict

# The fields every experiment shares (_base.py), loaded by path as config files are.
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  c = BASE["get_config"](arg, "generative")
  full = arg == "full"
  # Digits held out (of 1797) for every validation number: the first n_val of
  # np.random.default_rng(seed).permutation(1797), the rest train.
  c.n_val = 297

  # The flow study (bnjax.flows.RealNVP on the digits, 17 grey levels).
  c.flow = config_dict.ConfigDict()
  c.flow.batch_sizes = "8,32,128,500"
  c.flow.norms = "batch,actnorm"
  c.flow.seeds = 3 if full else 2
  c.flow.features = 32 if full else 16
  c.flow.blocks = 2 if full else 1
  c.flow.couplings = 3
  c.flow.momentum = 0.9       # Flax's convention: PyTorch's momentum 0.1
  c.flow.steps = 3000 if full else 600
  c.flow.learning_rate = 1e-3
  c.flow.latent_batch = 32    # the batch size whose flows the latent, sample and inpainting
                              # figures show
  c.flow.temperature = 0.7    # samples at this temperature beside temperature 1

  c.inpaint = config_dict.ConfigDict()
  c.inpaint.images = 64       # validation digits, the bottom half unknown
  c.inpaint.steps = 300
  c.inpaint.learning_rate = 0.05

  # The VAE study (bnjax.vae on the digits).
  c.vae = config_dict.ConfigDict()
  c.vae.latent = 10
  c.vae.features = 16
  c.vae.lambda_label = 100.0
  c.vae.wrong_label_rate = 0.1
  c.vae.steps = 6000 if full else 1500
  c.vae.classifier_steps = 2000 if full else 500
  c.vae.batch_size = 64
  c.vae.learning_rate = 1e-3

  # The shift study: U-Net and flow on Perlin images of the benchmark's source.
  c.shift = config_dict.ConfigDict()
  c.shift.source = BASE["SOURCE"]
  c.shift.shifts = BASE["ALL_SHIFTS"] if full else "brightness,contrast,gamma,noise,blur,gradient,edges"
  c.shift.severities = "1,2,3,4,5" if full else "1,3,5"
  c.shift.n_eval = 128 if full else 64
  c.shift.n_adapt = 128 if full else 64
  c.shift.downsample = 2      # the flow sees images downsampled by this factor
  c.shift.flow_steps = 3000 if full else 600
  c.shift.flow_batch_size = 64
  c.bootstrap = 1000          # resamples of the 95 % intervals
  return c
