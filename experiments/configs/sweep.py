r"""A grid of source/target domains: every source model trained in stacks,
every pair scored without and with BN adaptation.

    python experiments/sweep.py --config=experiments/configs/sweep.py:brightness --workdir=runs/brightness
    python experiments/sweep.py --config=experiments/configs/sweep.py:geometric --workdir=runs/geometric
    python experiments/sweep.py --config=experiments/configs/sweep.py:clip_corrected --workdir=runs/clip
    python experiments/sweep.py --config=experiments/configs/sweep.py:custom --config.custom.mu1=10:170:40 --config.custom.delta=80 --workdir=runs/custom
    python experiments/sweep.py --config=experiments/configs/sweep.py:brightness,full --config.model.features=16 --workdir=runs/b64

Expected on 2 CPU cores (64x64, width 8, 500 images, 12 epochs):
``brightness`` ~10 min: without adaptation a target brighter than its source
scores about the mask fraction (0.20-0.22) and a darker one about 0; mean IoU
without / with exact adaptation k20 0.217 / 0.656, k40 0.253 / 0.834, k80
0.367 / 0.925, every k = 80 cell within 0.1 of its source's own IoU.
``geometric`` ~3 min: 0.747 / 0.818. ``clip_corrected`` ~1.5 min: 0.522 /
0.906. ``,full`` gives the study's grids (an accelerator's work).

The argument is ``<grid>[,full]``; the grids are written out below (the
study's, or their CPU versions). ``custom`` builds one many-to-many group
from ``custom.*``: value lists ``"a,b,c"`` or ranges ``"start:stop:step"``
(inclusive), every (mu1, mu1 + delta, sigma1, sigma2) with mu1 + delta <= 255.
"""

from ml_collections import config_dict

GRIDS = ("brightness", "geometric", "clip_corrected", "custom")


def _domain(mu1, sigma1, mu2, sigma2):
  return (float(mu1), float(sigma1), float(mu2), float(sigma2))


def _group(label, sources, targets, layout="matrix"):
  return dict(label=label, sources=[list(d) for d in sources],
              targets=[list(d) for d in targets], layout=layout)


def _brightness(cpu: bool):
  mu1s = [10, 50, 90, 130, 170] if cpu else list(range(10, 171, 20))
  groups = []
  for k in (20, 40, 80):
    doms = [_domain(m, 50, m + k, 50) for m in mu1s if m + k <= 255]
    groups.append(_group(f"k{k}", doms, doms))
  return groups


def _geometric(cpu: bool):
  doms = [_domain(122, 50, 134, 50), _domain(115, 50, 141, 50), _domain(100, 50, 156, 50),
          _domain(68, 50, 188, 50), _domain(1, 50, 255, 50)]
  doms = doms[1:] if cpu else doms
  return [_group("geometric", doms, doms)]


def _clip_corrected(cpu: bool):
  if cpu:
    mu1s, deltas, s1s, s2s = [64, 112, 160], [24, 55, 128], [6, 30], [6, 30]
  else:
    mu1s, deltas = [64, 80, 96, 112, 128, 144, 160], [24, 32, 42, 55, 73, 97, 128]
    s1s = s2s = [6, 12, 18, 24, 30]
  targets = [_domain(m, s1, m + d, s2) for s1 in s1s for s2 in s2s for m in mu1s
             for d in deltas if m + d <= 192]
  return [_group("clip_corrected", [_domain(96, 18, 138, 18)], targets, "sigma_panels")]


def get_config(arg: str = "brightness") -> config_dict.ConfigDict:
  name, _, scale = arg.partition(",")
  scale = scale or "cpu"
  if name not in GRIDS or scale not in ("cpu", "full"):
    raise ValueError(f"sweep config: the argument is '<grid>[,full]' with a grid in {GRIDS}, "
                     f"got {arg!r}")
  cpu = scale == "cpu"
  c = config_dict.ConfigDict()
  c.grid = name
  c.scale = scale
  c.seed = 0
  # Each group: every source against every target; domains (mu1, sigma1, mu2, sigma2).
  c.groups = {"brightness": _brightness, "geometric": _geometric,
              "clip_corrected": _clip_corrected}.get(name, lambda cpu: [])(cpu)
  c.custom = config_dict.ConfigDict()
  c.custom.mu1 = "10:170:40"
  c.custom.delta = "80"
  c.custom.sigma1 = "50"
  c.custom.sigma2 = ""  # empty: equal to sigma1

  c.data = config_dict.ConfigDict()
  c.data.size = 64          # at 32 the most clipped brightness pair misses by 0.11
  c.data.n_train = 500
  c.data.n_eval = 100
  c.data.n_adapt = 100

  c.model = config_dict.ConfigDict()
  c.model.features = 8
  c.model.depth = 4

  c.train = config_dict.ConfigDict()
  c.train.epochs = 12
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.optimizer = "adam"
  c.train.patience = 3

  c.adapt = config_dict.ConfigDict()
  c.adapt.mode = "exact"
  c.adapt.batch_size = config_dict.placeholder(int)
  c.adapt.transductive = False

  c.oracle = False       # also train one model per target domain
  c.chunk = 4            # models trained per stack (one checkpoint each)
  c.pair_chunk = 8       # source/target pairs adapted per call
  c.strategy = "auto"    # how a stack is mapped: auto | vmap | unroll
  return c
