r"""When to adapt, without labels: label-free scores against the gain of each
method, held out by shift family and by source domain.

    python experiments/when_to_adapt.py --config=experiments/configs/when_to_adapt.py --workdir=runs/when_to_adapt
    python experiments/when_to_adapt.py --config=experiments/configs/when_to_adapt.py:full --workdir=runs/when_to_adapt_full

Expected on 2 CPU cores (the default: the CPU versions of the study's
brightness, geometric and clip_corrected grids, and the shift benchmark's 12
shifts at severities 1, 3, 5 of the source (90,50,170,50); 32x32 images,
width 8, 3 retrainings; 151 pairs x 3 seeds x 3 methods): about 20 minutes
(1148 s measured; a rerun redoes only the analysis, ~30 s).
The agreement between the unadapted and the adapted masks ranks the gain
best (Spearman about -0.8 for every method, in every retraining); for AdaBN
the fitted rule matches always-adapt (mean IoU 0.676; never 0.399, best
choice per pair 0.682) and fails on the label shifts; for histogram matching
it is right in 85 % of the pairs held out (always-adapt: 64 %).
``when_to_adapt.md`` has every table (README.md the summary), the fitted
rules are in ``rules/<method>.json``.

``full``: the study's grids at 64x64, width 16, severities 1..5, 5 seeds
(an accelerator's work).
"""

import importlib.util
import os

from ml_collections import config_dict

GRIDS = ("brightness", "geometric", "clip_corrected")

ALL_SHIFTS = ("brightness,contrast,gamma,noise,blur,gradient,edges,zoom,rotation,elastic,res,"
              "threshold")


def _study_groups(scale: str) -> dict:
  """{grid: groups} of experiments/configs/sweep.py at ``scale`` (the grids are
  written out once, there)."""
  spec = importlib.util.spec_from_file_location(
      "_sweep_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  return {g: sweep.get_config(f"{g},{scale}").groups for g in GRIDS}


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  if arg not in ("cpu", "full"):
    raise ValueError(f"when_to_adapt config: the argument must be 'cpu' or 'full', got {arg!r}")
  full = arg == "full"
  c = config_dict.ConfigDict()
  c.preset = arg
  c.seed = 0
  c.seeds = 5 if full else 3   # retrainings (and data draws) of every source model
  # Study grids (experiments/configs/sweep.py, at this preset's scale) and the
  # shift benchmark's pairs (bnjax.shifts of the benchmark's source domain).
  c.grids = ",".join(GRIDS)    # which of grid_groups to use ("" for none)
  c.grid_groups = _study_groups(arg)
  c.benchmark_source = (90.0, 50.0, 170.0, 50.0)
  c.shifts = ALL_SHIFTS
  c.severities = "1,2,3,4,5" if full else "1,3,5"
  c.methods = "adabn,tent,histogram_match"

  c.data = config_dict.ConfigDict()
  c.data.size = 64 if full else 32
  c.data.n_train = 1000 if full else 320
  c.data.n_eval = 200 if full else 64   # labelled: the truth; the source's also fits ATC
  c.data.n_adapt = 200 if full else 64  # unlabelled: adaptation and the scores

  c.model = config_dict.ConfigDict()
  c.model.features = 16 if full else 8
  c.model.depth = 4

  c.train = config_dict.ConfigDict()  # bnjax.train.TrainConfig fields
  c.train.epochs = 20 if full else 8
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.optimizer = "adam"
  c.train.patience = 4

  c.tent = config_dict.ConfigDict()  # bnjax.methods.tent
  c.tent.steps = 10
  c.tent.learning_rate = 1e-3
  c.tent.batch_size = 32

  c.tap = "bottleneck"   # feature distances (Frechet, sliced W2) at this tap
  c.max_rows = 2000      # feature rows per set for the distances
  c.bootstrap = 1000     # resamples of the 95 % intervals
  c.chunk = 4            # models trained per stack (one checkpoint each)
  c.strategy = "auto"    # how stacks are mapped: auto | vmap | unroll
  return c
