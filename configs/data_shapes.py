"""Shapes data for `python -m vldm.data` (a look at the training data).

  python -m vldm.data --config configs/data_shapes.py --batches 4 --out /tmp/shapes
  python -m vldm.data --config configs/data_shapes.py:kind=image,resolution=64 --out /tmp/img
  python -m vldm.data --config configs/data_shapes.py:runlocal --config.data.data_dir=/tmp/tfds ...

Args: kind (video|image), resolution, frames, runlocal (tiny dataset and batches, for tests).
"""
import ml_collections

from configs import common
from vldm.data import config as data_config_lib


def get_config(arg=None):
  arg = common.parse_arg(arg, kind="video", resolution=32, frames=8, runlocal=False)
  config = ml_collections.ConfigDict()
  config.data = data_config_lib.data_config(
      "shapes", kind=arg.kind, resolution=arg.resolution, frames=arg.frames, batch_size=32)
  if arg.runlocal:
    config.data.batch_size = 8
    config.data.num_train_examples = 32
    config.data.num_validation_examples = 18
    config.data.num_workers = 2
  return config
