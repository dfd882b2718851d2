"""bnjax: Batch-Norm adaptation under controlled domain shift, in JAX/Flax.

    import bnjax
    images, masks = bnjax.data.make_dataset(key, bnjax.Domain(90, 50, 170, 50), 500)
    variables, history = bnjax.fit(model, images, masks, bnjax.TrainConfig())
    adapted = bnjax.recompute_batch_stats(model, variables, target_images)
    bnjax.metrics.iou(bnjax.predict(model, adapted, target_images), target_masks)

The modules, by idea (imports point down this list): ``data`` (domains,
Perlin masks, rendering), ``shifts`` (controlled shifts of a set, severity
0..5), ``models`` (the U-Net), ``stacking`` (stacks of models, devices),
``adapt`` (BatchNorm adaptation of any Flax model), ``methods`` (TENT,
histogram matching), ``metrics``, ``inference`` (predictions, stacked
scores), ``streams`` (online adaptation on streams of batches),
``train`` (one loop for K >= 1 models), ``features`` and
``distances`` (latent spaces and OT), ``stats``, ``checkpoint``,
``selection`` (label-free scores of an adaptation, rules of when to adapt),
``config`` (an experiment's config checked whole before it runs), ``workdir`` (the run-directory contract of the experiments), ``plots``, ``compiler``, ``progress``,
``distributed`` (several processes: start-up, global arrays, gathering) and
``launch`` (``python -m bnjax.launch``: several processes on one machine).
"""

from bnjax import (adapt, checkpoint, compiler, config, data, distances, distributed, features,
                   inference, launch, methods, metrics, models, plots, progress, selection,
                   shifts, stacking, stats, streams, train, workdir)
from bnjax.adapt import recompute_batch_stats, recompute_batch_stats_nnx
from bnjax.data import Domain
from bnjax.inference import evaluate_grid, predict
from bnjax.models import UNet
from bnjax.train import TrainConfig, fit, train_many

__all__ = [
    # modules
    "adapt", "checkpoint", "compiler", "config", "data", "distances", "distributed", "features",
    "inference", "launch", "methods", "metrics", "models", "plots", "progress", "selection",
    "shifts", "stacking", "stats", "streams", "train", "workdir",
    # the names most programs need
    "Domain", "UNet", "TrainConfig", "fit", "train_many", "predict", "evaluate_grid",
    "recompute_batch_stats", "recompute_batch_stats_nnx",
]
__version__ = "0.1.0"
