"""What the experiments' configs share, overridden by each (as Flax's example
configs build on their ``default.py``): the preset check, the seed, the data
size, the U-Net and the training settings of the ``cpu`` and ``full`` presets,
and TENT's. A config file loads it with
``runpy.run_path(os.path.join(os.path.dirname(__file__), "_base.py"))``
(config files are loaded by path, not as a package).
"""

from ml_collections import config_dict

ALL_SHIFTS = ("brightness,contrast,gamma,noise,blur,gradient,edges,zoom,rotation,elastic,res,"
              "threshold")
SOURCE = (90.0, 50.0, 170.0, 50.0)  # (mu1, sigma1, mu2, sigma2), 0-255 scale


def get_config(arg: str, experiment: str, presets=("cpu", "full")) -> config_dict.ConfigDict:
  """The shared fields at preset ``arg`` (``full``: 64x64, width 16, 2000
  training images, 20 epochs; otherwise 32x32, width 8, 400, 10)."""
  if arg not in presets:
    raise ValueError(f"{experiment} config: the argument must be "
                     f"{' or '.join(repr(p) for p in presets)}, got {arg!r}")
  full = arg == "full"
  c = config_dict.ConfigDict()
  c.preset = arg
  c.seed = 0  # seeds data, initialisation and batch order

  c.data = config_dict.ConfigDict()
  c.data.size = 64 if full else 32
  c.data.n_train = 2000 if full else 400

  c.model = config_dict.ConfigDict()
  c.model.features = 16 if full else 8
  c.model.depth = 4

  c.train = config_dict.ConfigDict()  # bnjax.train.TrainConfig fields (the seed: c.seed)
  c.train.epochs = 20 if full else 10
  c.train.batch_size = 32
  c.train.learning_rate = 3e-3
  c.train.optimizer = "adam"
  c.train.patience = 4
  return c


def tent() -> config_dict.ConfigDict:
  """bnjax.methods.tent's settings in the benchmark and when-to-adapt."""
  return config_dict.ConfigDict({"steps": 10, "learning_rate": 1e-3, "batch_size": 32})
