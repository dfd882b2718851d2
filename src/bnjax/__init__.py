"""bnjax: Batch-Norm adaptation under controlled domain shift, in JAX/Flax.

    import bnjax
    images, masks = bnjax.data.make_dataset(key, bnjax.Domain(90, 50, 170, 50), 500)
    variables, history = bnjax.fit(model, images, masks, bnjax.TrainConfig())
    adapted = bnjax.recompute_batch_stats(model, variables, target_images)
    bnjax.metrics.iou(bnjax.predict(model, adapted, target_images), target_masks)

The modules, in the order their imports point (``bnjax._map``; a module
imports only modules above it): ``launch``, ``distributed``, ``compiler``,
``progress``, ``data``, ``shifts``, ``models``, ``stacking``, ``metrics``,
``stats``, ``distances``, ``plots``, ``checkpoint``, ``train``, ``adapt``,
``methods``, ``inference``, ``cyclegan``, ``flows``, ``vae``, ``streams``, ``features``, ``selection``,
``config``, ``workdir``, ``cli``. The documentation's API page describes each.
"""

from bnjax import (adapt, checkpoint, cli, compiler, config, cyclegan, data, distances, distributed, features,
                   flows, inference, launch, methods, metrics, models, plots, progress, selection,
                   shifts, stacking, stats, streams, train, vae, workdir)
from bnjax._version import __version__
from bnjax.adapt import recompute_batch_stats, recompute_batch_stats_nnx
from bnjax.data import Domain
from bnjax.inference import evaluate_grid, predict
from bnjax.models import UNet
from bnjax.train import TrainConfig, fit, train_many

__all__ = [
    # modules
    "adapt", "checkpoint", "cli", "compiler", "config", "cyclegan", "data", "distances", "distributed", "features",
    "flows", "inference", "launch", "methods", "metrics", "models", "plots", "progress", "selection",
    "shifts", "stacking", "stats", "streams", "train", "vae", "workdir",
    # the names most programs need
    "Domain", "UNet", "TrainConfig", "fit", "train_many", "predict", "evaluate_grid",
    "recompute_batch_stats", "recompute_batch_stats_nnx",
]
