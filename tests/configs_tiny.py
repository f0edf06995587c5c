"""The toy task (tests/toy_task.py) at test size: a small conv denoiser on coloured squares.

From the repository root (`configs` and tests/ importable):
  PYTHONPATH=tests python -m vldm.train --config tests/configs_tiny.py --workdir runs/tiny
  PYTHONPATH=tests python -m vldm.train --config tests/configs_tiny.py:freeze,runlocal=False \
      --workdir runs/tiny_frozen
"""
import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, freeze=False, runlocal=True)
  config = common.base_config()
  config.task = "toy_task:ToyTask"  # tests/ is on sys.path (pytest; PYTHONPATH above)
  config.total_steps = 20 if arg.runlocal else 2000
  config.batch_size = 8 if arg.runlocal else 64
  config.log_every = 5 if arg.runlocal else 50
  config.checkpoint_every = 10 if arg.runlocal else 500
  config.sample_every = 0 if arg.runlocal else 500
  config.optim.lr = 1e-3
  config.optim.warmup_steps = 2 if arg.runlocal else 100
  config.ema_decay = 0.99

  config.toy = ml_collections.ConfigDict()
  config.toy.resolution = 8 if arg.runlocal else 32
  config.toy.num_classes = 4
  config.toy.features = 8 if arg.runlocal else 32
  config.toy.depth = 2
  config.toy.groups = 4
  config.toy.freeze = config_dict.placeholder(str)  # regex of frozen parameter paths
  if arg.freeze:
    config.toy.freeze = "^(conv_in|blocks_0)/"  # like the video stage's frozen spatial layers
  config.toy.nan_batch = config_dict.placeholder(int)  # a NaN batch (the non-finite-loss check)
  return config
