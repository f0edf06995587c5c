"""python -m vldm.train --config configs/FILE.py[:args] --workdir DIR [--config.KEY=VALUE ...]

python -m vldm.train --config configs/FILE.py[:args,preset=NAME] --compile_only --topology v5p-8
    [--num_slices N] [--search] [--sample] [--compile_report FILE.json]
compiles the sharded training step ahead of time for a Cloud TPU topology on any machine (libtpu
installed: pip install -e ".[tpu]") and reports memory and FLOPs per chip (vldm.train.compile_only).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from vldm.train import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Training config file (FILE.py[:args]).", lock_config=True
)
flags.DEFINE_string(
    "workdir",
    None,
    "Where checkpoints, metrics and samples go; a run resumes from its own workdir.",
)
flags.DEFINE_bool(
    "compile_only",
    False,
    "Compile the training step for --topology and report "
    "memory and FLOPs per chip instead of training (no TPU, weights or data needed).",
)
flags.DEFINE_string(
    "topology",
    None,
    "With --compile_only: a Cloud TPU type (v5p-8, v5e-16, "
    "v4-32, v6e-8) or a chip grid (v5e:2x2, v5p:2x2x1).",
)
flags.DEFINE_integer("num_slices", 1, "With --compile_only: slices of --topology (multislice).")
flags.DEFINE_bool(
    "search",
    False,
    "With --compile_only: also search mesh, remat policy and "
    "per-chip batch for the fastest-looking configuration that fits (done anyway "
    "when the config does not fit).",
)
flags.DEFINE_list(
    "search_fsdp",
    None,
    "With --search: the FSDP sizes to try (default: 1, 4 and all chips of a slice).",
)
flags.DEFINE_list(
    "search_remat",
    None,
    "With --search: the remat policies to try (default: none, "
    "save_conv_and_attention, dots_saveable, full).",
)
flags.DEFINE_bool(
    "sample",
    False,
    "With --compile_only, for image-to-video stages: also compile "
    "sampling (the config's sampler steps, with guidance) and the VAE decode.",
)
flags.DEFINE_string("compile_report", None, "With --compile_only: write the reports as JSON.")
flags.mark_flags_as_required(["config"])


def compile_only() -> int:
  if not FLAGS.topology:
    raise app.UsageError("--compile_only needs --topology, e.g. v5p-8, v5e-16 or v5e:2x2.")
  # Compile-only clients need no TPU; libtpu's lock on one process per machine is for TPUs.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax  # pylint: disable=g-import-not-at-top

  jax.config.update("jax_platforms", "cpu")  # shapes and tracing on the host; no TPU is opened
  from vldm.train import compile_only as compile_only_lib  # pylint: disable=g-import-not-at-top
  from vldm.train import tasks  # pylint: disable=g-import-not-at-top
  from vldm.train import topology  # pylint: disable=g-import-not-at-top

  try:
    return compile_only_lib.run(
        FLAGS.config,
        FLAGS.topology,
        slices=FLAGS.num_slices,
        search_all=FLAGS.search,
        sample=FLAGS.sample,
        fsdp_sizes=[int(n) for n in FLAGS.search_fsdp or ()],
        remat_policies=FLAGS.search_remat,
        out=FLAGS.compile_report,
    )
  except (topology.TopologyError, ValueError, tasks.CannotCompileAhead) as e:
    sys.exit(f"vldm.train: error: {e}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.compile_only:
    sys.exit(compile_only())
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (or --compile_only --topology ... to compile).")
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
