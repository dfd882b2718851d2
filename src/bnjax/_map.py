"""The module map of bnjax: every public module, in the order its imports
point (a module imports only modules above it, and private ones). Enforced by
``tests/test_api.py``; rendered by the documentation's API page."""

MODULES: tuple[tuple[str, str], ...] = (
    ("launch", "``python -m bnjax.launch``: several processes on one machine"),
    ("distributed", "several processes: start-up, global arrays, gathering"),
    ("compiler", "jit with the project's compiler options, the persistent compile cache"),
    ("progress", "progress of long runs (tqdm)"),
    ("data", "domains, Perlin masks, rendering, datasets by split"),
    ("shifts", "controlled shifts of an image set, severity 0..5"),
    ("models", "the U-Net"),
    ("stacking", "stacks of models and their placement on devices"),
    ("metrics", "IoU, Dice and other scores of boolean masks"),
    ("stats", "correlations, bootstrap intervals, isotonic fits"),
    ("distances", "distances between distributions (Fréchet, sliced Wasserstein, Sinkhorn, MMD)"),
    ("plots", "figures, each with its numbers beside it"),
    ("checkpoint", "verified orbax checkpoints"),
    ("train", "one training loop for K >= 1 models"),
    ("adapt", "BatchNorm adaptation of any Flax model (AdaBN)"),
    ("methods", "TENT and histogram matching"),
    ("inference", "predictions and stacked scores"),
    ("cyclegan", "pixel-level adaptation: CycleGAN translators, many at once, and their measures"),
    ("flows", "RealNVP flows with a BatchNorm bijector, ActNorm, bits per dimension, inpainting"),
    ("vae", "a label-conditioned VAE with BatchNorm and the classifier that judges it"),
    ("streams", "online adaptation on streams of batches"),
    ("features", "latent spaces of any Flax model"),
    ("selection", "label-free scores of an adaptation, rules of when to adapt"),
    ("config", "an experiment's config checked whole before it runs"),
    ("workdir", "the run-directory contract of the experiments"),
    ("cli", "the command line of the experiment scripts (absl, ml_collections)"),
)

ORDER: tuple[str, ...] = tuple(name for name, _ in MODULES)
