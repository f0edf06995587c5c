"""python -m vldm.train --config configs/FILE.py[:args] --workdir DIR [--config.KEY=VALUE ...]"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vldm.train import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (FILE.py[:args]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and samples go; a run resumes "
                    "from its own workdir.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from vldm.train import metrics  # pylint: disable=g-import-not-at-top
  logging.get_absl_logger().addFilter(metrics.QuietOrbax())
  from vldm.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize()
  from vldm.train import tasks  # pylint: disable=g-import-not-at-top
  from vldm.train import trainer  # pylint: disable=g-import-not-at-top  # heavy: after parsing
  logging.info("Config:\n%s", FLAGS.config)
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except tasks.TaskInputError as e:
    sys.exit(f"vldm.train: error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
