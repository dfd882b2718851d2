"""A config is checked whole before anything is written or trained: every
experiment refuses a bad value with one ConfigError naming its key, leaves no
workdir behind, and the command line prints that one line (exit status 2)."""

import os
import subprocess
import sys

import pytest

from bnjax import config as cfg
from bnjax import models, train, workdir
from experiments import adapt_pair, benchmark, predict_gain, sweep, when_to_adapt
from experiments.configs import adapt_pair as adapt_pair_config
from experiments.configs import benchmark as benchmark_config
from experiments.configs import predict_gain as predict_gain_config
from experiments.configs import sweep as sweep_config
from experiments.configs import when_to_adapt as when_to_adapt_config


def test_messages_start_with_the_key():
  with pytest.raises(cfg.ConfigError, match=r"^config\.train\.epochs must be an integer >= 1, "
                                            r"got 0$"):
    cfg.train_config({"epochs": 0})
  with pytest.raises(cfg.ConfigError, match=r"^config\.train\.epoch is not a field of "
                                            r"TrainConfig \(its fields: .*epochs"):
    cfg.train_config({"epoch": 3})
  with pytest.raises(cfg.ConfigError, match=r"^config\.train: 40 images leave 36 for training "
                                            r".* fewer than batch_size=64$"):
    cfg.train_config({"batch_size": 64}, n_images=40)
  with pytest.raises(cfg.ConfigError, match=r"^config\.adapt\.mode must be one of "
                                            r"\('exact', 'train_pass', 'ema'\), got 'foo'$"):
    cfg.adapt_options({"mode": "foo", "batch_size": None})
  with pytest.raises(cfg.ConfigError, match=r"^config\.adapt\.batch_size must be an integer"):
    cfg.adapt_options({"mode": "exact", "batch_size": 0})
  with pytest.raises(cfg.ConfigError, match=r"^config\.adapt\.prior must be a number >= 0"):
    cfg.adapt_options({"prior": -1.0})
  assert cfg.adapt_options({"mode": "ema", "batch_size": 1, "transductive": True}) == {
      "mode": "ema", "batch_size": 1}
  with pytest.raises(cfg.ConfigError, match=r"^config\.model\.norm must be one of"):
    cfg.unet({"features": 4, "depth": 2, "norm": "batchnorm"})
  with pytest.raises(cfg.ConfigError, match=r"^config\.model\.features must be an integer >= 1"):
    cfg.unet({"features": 0, "depth": 2})
  with pytest.raises(cfg.ConfigError, match=r"^config\.model: input sides 20x20 must be "
                                            r"divisible by 2\*\*depth = 8"):
    cfg.unet({"features": 4, "depth": 3}, image_size=20)
  with pytest.raises(cfg.ConfigError, match=r"^config\.data\.size \(15\) must be a "
                                            r"multiple of res \(2\)"):
    cfg.image_size(15)
  with pytest.raises(cfg.ConfigError, match=r"^config\.source: Domain\.mu2 must be in "
                                            r"\[0, 255\], got 300"):
    cfg.domain((90, 50, 300, 50), "source")
  with pytest.raises(cfg.ConfigError, match=r"^config\.targets must name at least one domain"):
    cfg.domains((), "targets")
  with pytest.raises(cfg.ConfigError, match=r"^config\.strategy must be one of"):
    cfg.strategy("bogus")
  with pytest.raises(cfg.ConfigError, match=r"^config\.tent\.steps must be an integer >= 1"):
    cfg.tent_options({"steps": 0, "learning_rate": 1e-3, "batch_size": 4})
  with pytest.raises(cfg.ConfigError, match=r"^config\.tent\.learning_rate must be a number"):
    cfg.tent_options({"steps": 1, "learning_rate": float("nan"), "batch_size": 4})
  with pytest.raises(cfg.ConfigError, match=r"^config\.cyclegan\.train\.pool_size must be an "
                                            r"integer >= 0"):
    cfg.cyclegan_config({"pool_size": -1})
  with pytest.raises(cfg.ConfigError, match=r"^config\.cyclegan\.train\.lambda_cyc is not a "
                                            r"field of CycleGANConfig"):
    cfg.cyclegan_config({"lambda_cyc": 1.0})
  with pytest.raises(cfg.ConfigError, match=r"^config\.cyclegan\.train: images must have a "
                                            r"height and width that are multiples of 4"):
    cfg.cyclegan_config({}, image_size=18)
  assert cfg.cyclegan_config({"steps": 3}, up="resize_conv").up == "resize_conv"
  with pytest.raises(cfg.ConfigError, match=r"^config\.seed must be an integer >= 0"):
    cfg.positive_int(-1, "seed", minimum=0)
  with pytest.raises(cfg.ConfigError, match=r"^config\.empty_iou must be in \[0, 1\]"):
    cfg.unit_interval(2.0, "empty_iou")


def test_taps_are_the_models_own():
  model = models.UNet(features=2, depth=2)
  assert cfg.taps((), model, 16) == ["enc0", "enc1", "bottleneck", "dec1", "dec0"]
  assert cfg.taps("bottleneck", model, 16) == ["bottleneck"]
  with pytest.raises(cfg.ConfigError, match=r"^config\.taps must name taps of the model, "
                                            r"\('enc0', .*got 'bottle'$"):
    cfg.taps(("bottle",), model, 16)


def _bad(config, field, value):
  """``config`` with ``field`` (a dotted path) set to ``value``, unlocked."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  with node.unlocked():
    node[leaf] = value
  return config


# (experiment module, config, field, bad value, the key the error names)
CASES = [
    (adapt_pair, adapt_pair_config.get_config, "adapt.mode", "foo", "adapt.mode"),
    (adapt_pair, adapt_pair_config.get_config, "train.epochs", 0, "train.epochs"),
    (adapt_pair, adapt_pair_config.get_config, "train.optimizer", "lbfgs", "train.optimizer"),
    (adapt_pair, adapt_pair_config.get_config, "data.kind", "perlin", "data.kind"),
    (adapt_pair, adapt_pair_config.get_config, "targets", (), "targets"),
    (adapt_pair, adapt_pair_config.get_config, "model.depth", 6, "model"),
    (sweep, lambda: sweep_config.get_config("geometric"), "strategy", "bogus", "strategy"),
    (sweep, lambda: sweep_config.get_config("geometric"), "adapt.mode", "foo", "adapt.mode"),
    (sweep, lambda: sweep_config.get_config("geometric"), "chunk", 0, "chunk"),
    (sweep, lambda: sweep_config.get_config("custom"), "custom.mu1", "1:2:0", "custom.mu1"),
    (benchmark, benchmark_config.get_config, "tent.steps", 0, "tent.steps"),
    (benchmark, benchmark_config.get_config, "adapt.prior", -2.0, "adapt.prior"),
    (benchmark, benchmark_config.get_config, "variants", "reference,vgg", "variants"),
    (when_to_adapt, when_to_adapt_config.get_config, "tap", "bottle", "tap"),
    (when_to_adapt, when_to_adapt_config.get_config, "strategy", "bogus", "strategy"),
    (when_to_adapt, when_to_adapt_config.get_config, "train.patience", 0, "train.patience"),
]


@pytest.mark.parametrize("module,get_config,field,value,key", CASES,
                         ids=[f"{c[0].__name__.split('.')[-1]}-{c[2]}" for c in CASES])
def test_a_bad_value_fails_before_anything_is_written_or_trained(
    tmp_path, monkeypatch, module, get_config, field, value, key):
  for name in ("fit", "train_many"):
    monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail("trained before checking"))
  out = tmp_path / "run"
  with pytest.raises(cfg.ConfigError, match=rf"^config\.{key.replace('.', chr(92) + '.')}\b"):
    module.run(_bad(get_config(), field, value), str(out))
  assert not out.exists()


def test_predict_gain_checks_its_taps_before_reading_the_sweep(tmp_path):
  config = predict_gain_config.get_config()
  with pytest.raises(cfg.ConfigError, match="config.sweep_dir must name"):
    predict_gain.run(config, str(tmp_path / "gain"))
  config.sweep_dir = str(tmp_path / "nowhere")
  with pytest.raises(cfg.ConfigError, match=r"^config\.sweep_dir: .* not a bnjax workdir"):
    predict_gain.run(config, str(tmp_path / "gain"))
  # A sweep's workdir holding its config only: the taps are checked against
  # its model before any checkpoint is read.
  sweep_cfg = sweep_config.get_config("geometric")
  sweep_cfg.model.depth = 2
  workdir.Workdir.open(tmp_path / "sweep", "sweep", sweep_cfg, log=lambda *_: None)
  config.sweep_dir, config.taps = str(tmp_path / "sweep"), ("bottle",)
  with pytest.raises(cfg.ConfigError, match=r"^config\.taps must name taps of the model, "
                                            r"\('enc0', 'enc1', 'bottleneck', .*got 'bottle'"):
    predict_gain.run(config, str(tmp_path / "gain"))
  config.taps, config.hist_tap = ("enc0",), "bottleneck"
  with pytest.raises(cfg.ConfigError, match=r"^config\.hist_tap must be one of the taps used"):
    predict_gain.run(config, str(tmp_path / "gain"))
  assert not (tmp_path / "gain").exists()


def _script(root, name, workdir, *flags):
  return subprocess.run(
      [sys.executable, os.path.join(root, "experiments", f"{name}.py"), f"--workdir={workdir}",
       *flags], capture_output=True, text=True, cwd=root, timeout=600,
      env={**os.environ, "PYTHONPATH": root})


def test_command_line_errors_are_one_line(root, tmp_path):
  """A bad value, an unknown key and a bad config argument: one line on
  stderr, exit status 2, no workdir."""
  out = tmp_path / "run"
  for flags, line in (
      (["--config.adapt.mode=foo"],
       "error: config.adapt.mode must be one of ('exact', 'train_pass', 'ema'), got 'foo'"),
      (["--config.train.epoch=3"],
       "error: --config.train.epoch: the config has no field 'epoch' (Did you mean \"epochs\" "
       "instead of \"epoch\"?)"),
      ([f"--config={os.path.join(root, 'experiments', 'configs', 'adapt_pair.py')}:gpu"],
       "ValueError: adapt_pair config: the argument must be 'cpu' or 'paper', got 'gpu'"),
      (["--config.source=(90,50,300,50)"],
       "error: config.source: Domain.mu2 must be in [0, 255], got 300.0")):
    proc = _script(root, "adapt_pair", out, *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and line in lines[0], proc.stderr[-2000:]
    assert not out.exists()


def test_help_lists_the_config_fields(root, tmp_path):
  """--help: the experiment's description, its config file's commands and
  every field with its value (of the config the command line names)."""
  proc = _script(root, "streams", tmp_path / "run", "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = proc.stdout
  assert text.startswith("Adaptation on streams: which online method works"), text[:200]
  assert "python experiments/streams.py --config=experiments/configs/streams.py:full" in text
  for line in ("  config.seeds = 3", "  config.method_options.gated.threshold = 0.5",
               "  config.batch_sizes = '1,4,16'"):
    assert line in text.splitlines(), line
  paper = os.path.join(root, "experiments", "configs", "adapt_pair.py") + ":paper"
  proc = _script(root, "adapt_pair", tmp_path / "run", f"--config={paper}", "-h")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"Config {paper}:" in proc.stdout
  assert "  config.preset = 'paper'" in proc.stdout.splitlines()
  assert not (tmp_path / "run").exists()
