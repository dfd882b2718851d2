r"""Does a distance between latent distributions predict the gain of BN adaptation?

    python experiments/sweep.py --config=experiments/configs/sweep.py:brightness --workdir=runs/brightness
    python experiments/predict_gain.py --config=experiments/configs/predict_gain.py --config.sweep_dir=runs/brightness --workdir=runs/brightness/gain

Expected on the CPU brightness grid (75 pairs, 9 taps): ~6 min on 2 cores.
The adapted IoU is ranked best by the target's class overlap (Spearman about
-0.94); among distances the Sinkhorn divergence and the BatchNorm-statistics
diagonal W2 come next (|Spearman| 0.6-0.7); no distance predicts the gain
well (best |Spearman| about 0.56). ``ranking.md`` holds the table.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  c.sweep_dir = ""           # the workdir of experiments/sweep.py (required)
  c.taps = ()                # taps to use (empty: all)
  c.max_rows = 2000          # feature rows (positions) kept per set, sampled at random
  c.sinkhorn_points = 500    # points per set for the Sinkhorn divergence
  c.bootstrap = 1000         # bootstrap resamples for the 95 % intervals
  c.hist_tap = "bottleneck"  # tap of the channel-histogram figures
  c.seed = 0                 # seeds subsampling, projections, bootstrap, held-out split
  return c
