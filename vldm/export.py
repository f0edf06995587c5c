"""Export a trained stage as a diffusers-layout folder: python -m vldm.export --workdir DIR --out F

The newest trained stage of DIR (a run, or a folder of stage runs) with its own sampler settings.
An image stage's folder is a StableDiffusionPipeline folder that diffusers' `from_pretrained`
loads; a Video LDM video stage's UNet has no diffusers class, so its unet/ is vldm's own
('VldmUNet') and its temporal layers are also written alone (temporal_layers.safetensors, like a
motion module) to move onto another image model; a latent upsampler stage writes the cascade (its
base stage at the top, upsampler/ beside it). `python -m vldm.sample --pretrained F --prompt …`
samples every kind (see `vldm.pipelines.folder`).

`--lora OUT` (instead of, or with, --out): the newest LoRA stage's adapters alone, as diffusers'
OUT/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(OUT)`; docs/lora.md).
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir: exports its newest trained stage.")
flags.DEFINE_string("out", None, "The folder to write.")
flags.DEFINE_string(
    "lora", None, "A folder to write the newest LoRA stage's adapters to, as a diffusers LoRA file."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not (FLAGS.out or FLAGS.lora):
    sys.exit("vldm.export: error: --workdir and --out (or --lora) are required.")
  from vldm.pipelines import PipelineError  # pylint: disable=g-import-not-at-top  # heavy
  from vldm.recipes import stages  # pylint: disable=g-import-not-at-top

  try:
    if FLAGS.lora:
      logging.info("Wrote %s.", stages.export_lora(FLAGS.workdir, FLAGS.lora))
    if FLAGS.out:
      stages.export(FLAGS.workdir, FLAGS.out)
      logging.info("Wrote %s.", FLAGS.out)
  except (PipelineError, ValueError, FileNotFoundError) as e:
    sys.exit(f"vldm.export: error: {e}")


if __name__ == "__main__":
  app.run(main)
