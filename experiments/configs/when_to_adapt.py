r"""When to adapt, without labels: label-free scores against the gain of each
method, held out by shift family and by source domain.

    python experiments/when_to_adapt.py --config=experiments/configs/when_to_adapt.py --workdir=runs/when_to_adapt
    python experiments/when_to_adapt.py --config=experiments/configs/when_to_adapt.py:full --workdir=runs/when_to_adapt_full

Expected on 2 CPU cores (the default: the CPU versions of the study's
brightness, geometric and clip_corrected grids, and the shift benchmark's 12
shifts at severities 1, 3, 5 of the source (90,50,170,50); 32x32 images,
width 8, 3 retrainings; 151 pairs x 3 seeds x 3 methods): about 10 minutes
(564 s measured on 2026-12-08, 1208 s before TENT's steps left
``lax.scan``; a rerun redoes only the analysis, ~30 s).
The agreement between the unadapted and the adapted masks ranks the gain
best (Spearman about -0.8 for every method, in every retraining); for AdaBN
the fitted rule matches always-adapt (mean IoU 0.676; never 0.399, best
choice per pair 0.682) and fails on the label shifts; for histogram matching
it is right in 85 % of the pairs held out (always-adapt: 64 %). The
streams' appearance gate (fixed, not fitted) decides right in 78 % of the
label-shift pairs (AdaBN; the fitted rules 39 %) and gives the best mean IoU
(0.679), but skips the small gains of geometric shifts.
``when_to_adapt.md`` has every table (docs/guides/when_to_adapt.md the summary), the fitted
rules are in ``rules/<method>.json``.

``full``: the study's grids at 64x64, width 16, severities 1..5, 5 seeds
(an accelerator's work).
"""

import importlib.util
import os
import runpy

from ml_collections import config_dict

# The fields every experiment shares (_base.py), loaded by path as config files are.
BASE = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_base.py"))

GRIDS = ("brightness", "geometric", "clip_corrected")



def _study_groups(scale: str) -> dict:
  """{grid: groups} of experiments/configs/sweep.py at ``scale`` (the grids are
  written out once, there)."""
  spec = importlib.util.spec_from_file_location(
      "_sweep_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep.py"))
  sweep = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(sweep)
  return {g: sweep.get_config(f"{g},{scale}").groups for g in GRIDS}


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
  c = BASE["get_config"](arg, "when_to_adapt")
  full = arg == "full"
  c.seeds = 5 if full else 3   # retrainings (and data draws) of every source model
  # Study grids (experiments/configs/sweep.py, at this preset's scale) and the
  # shift benchmark's pairs (bnjax.shifts of the benchmark's source domain).
  c.grids = ",".join(GRIDS)    # which of grid_groups to use ("" for none)
  c.grid_groups = _study_groups(arg)
  c.benchmark_source = BASE["SOURCE"]
  c.shifts = BASE["ALL_SHIFTS"]
  c.severities = "1,2,3,4,5" if full else "1,3,5"
  c.methods = "adabn,tent,histogram_match"

  c.data.n_train = 1000 if full else 320
  c.data.n_eval = 200 if full else 64   # labelled: the truth; the source's also fits ATC
  c.data.n_adapt = 200 if full else 64  # unlabelled: adaptation and the scores

  c.train.epochs = 20 if full else 8

  c.tent = BASE["tent"]()  # bnjax.methods.tent

  c.tap = "bottleneck"   # feature distances (Frechet, sliced W2) at this tap
  c.max_rows = 2000      # feature rows per set for the distances
  c.bootstrap = 1000     # resamples of the 95 % intervals
  c.chunk = 4            # models trained per stack (one checkpoint each)
  c.strategy = "auto"    # how stacks are mapped: auto | vmap | unroll
  # Pairs per compiled call of the methods (bnjax.distributed.map_pairs' chunk):
  # 1 on CPU, where a stack of pairs runs no faster per pair and its compile
  # grows with it (docs/measured.md); many on an accelerator (vmap).
  c.pair_chunk = 32 if full else 1
  return c
