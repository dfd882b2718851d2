"""bnjax: Batch-Norm adaptation under controlled domain shift, in JAX/Flax.

    import bnjax
    images, masks = bnjax.data.make_dataset(key, bnjax.data.Domain(90, 50, 170, 50), 500)
    variables, history = bnjax.train.fit(model, images, masks, bnjax.train.TrainConfig())
    adapted = bnjax.adapt.recompute_batch_stats(model, variables, target_images)
    bnjax.metrics.iou(bnjax.predict(model, adapted, target_images), target_masks)
"""

from bnjax import (adapt, checkpoint, compiler, data, distances, features, metrics, models, stacking,
                   stats, sweep, train)
from bnjax.train import predict

__all__ = ["adapt", "checkpoint", "compiler", "data", "distances", "features", "metrics", "models",
           "stacking", "stats", "sweep", "train", "predict"]
__version__ = "0.1.0"
