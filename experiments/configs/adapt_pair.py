r"""Train on a source domain, adapt BatchNorm to target domains, score IoU.

    python experiments/adapt_pair.py --config=experiments/configs/adapt_pair.py --workdir=runs/adapt_pair
    python experiments/adapt_pair.py --config=experiments/configs/adapt_pair.py:paper --workdir=runs/paper

Expected (the CPU default, ``make run``): ~1 min on 2 cores (~40 s with a warm
compilation cache). Source (90,50,170,50) IoU 0.866; the brightness shift to
(150,50,230,50) scores 0.205 without adaptation (everything predicted
foreground: about the mask fraction), 0.859 with ``exact`` BN adaptation,
oracle 0.873; to (30,50,110,50): 0.032, 0.872, 0.880 (2026-12-07).

``paper``: the study's 64x64 U-Net (width 64, 31.0 M parameters) with its
RMSprop settings and 5000 images per domain (hours on a CPU; minutes on an
accelerator). The original adaptation protocol (PyTorch EMA, batch 1, on the
evaluation images): ``--config.adapt.mode=ema --config.adapt.batch_size=1
--config.adapt.transductive=True``.
"""

import os
import runpy

from ml_collections import config_dict

# The fields every experiment shares (_base.py), loaded by path as config files are.
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  c = BASE["get_config"](arg, "adapt_pair", presets=("cpu", "paper"))
  paper = arg == "paper"
  # Domains are (mu1, sigma1, mu2, sigma2) on the 0-255 scale: background, foreground.
  c.source = BASE["SOURCE"]
  c.targets = ((150.0, 50.0, 230.0, 50.0), (30.0, 50.0, 110.0, 50.0))

  c.data.kind = "white_noise"   # renderer: white_noise | gradient | edges
  c.data.quantize = False       # truncate pixels to integers (the original uint8 storage)
  c.data.size = 64 if paper else 32
  c.data.n_train = 5000 if paper else 1000
  c.data.n_eval = 200
  c.data.n_adapt = 200

  c.model.features = 64 if paper else 8

  # bnjax.train.TrainConfig fields (the seed comes from c.seed).
  c.train.epochs = 5 if paper else 10
  c.train.batch_size = 1 if paper else 32
  c.train.learning_rate = 1e-5 if paper else 3e-3
  c.train.optimizer = "rmsprop" if paper else "adam"
  c.train.momentum = 0.999 if paper else 0.9
  c.train.weight_decay = 1e-8 if paper else 0.0
  c.train.loss = "ce+dice"
  c.train.grad_clip = 1.0
  c.train.val_fraction = 0.1
  c.train.patience = 2 if paper else 4
  c.train.eval_batch_size = 64

  c.adapt = config_dict.ConfigDict()
  c.adapt.mode = "exact"                               # exact | train_pass | ema
  c.adapt.batch_size = config_dict.placeholder(int)    # None: the mode's default
  c.adapt.transductive = False                         # adapt on the evaluation images

  c.oracle = True        # also train a model on each target domain
  c.empty_iou = 1.0      # IoU of an empty prediction on an empty mask (the original: 0)
  return c
