"""Sample clips: python -m vldm.sample …

  text-to-video from the newest trained stage of a workdir:
    python -m vldm.sample --workdir DIR --prompt "a red circle moving left" [--prompt …]
        [--num_samples N] [--seed S] --out OUT
  image-to-video (Stable Video Diffusion) from a diffusers pipeline folder, or from the newest
  trained stage of a workdir when it is an image-to-video stage:
    python -m vldm.sample --pretrained SVD_DIR --image img.png [--image …] --out OUT
    python -m vldm.sample --workdir DIR --image img.png --out OUT
  long videos (Video LDM): key frames beyond the trained clip length from the workdir's prediction
  stage, ×4 or ×16 frames from its interpolation stage:
    python -m vldm.sample --workdir DIR --prompt "…" --num_frames 32 [--interpolate 4] --out OUT
  text-to-video from a diffusers-layout folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/;
  a UNet2DConditionModel unet generates each frame as an image of its own):
    python -m vldm.sample --pretrained DIR --prompt "…" --out OUT

N clips per prompt (or image); clip k (numbered over all prompts) draws its noise from seed S + k
alone, so `--seed S+k --num_samples 1` reproduces it (to float rounding; a stochastic sampler's
per-step noise comes from the batch's first seed). Writes OUT/<k>.gif, OUT/<k>.mp4 and
OUT/samples.json, a list of {file (the GIF), mp4, prompt, seed} (image runs: prompt null, + image).
Sampler flags left unset keep the model's own settings (a trained stage's steps and guidance, the
pipeline's defaults otherwise; SVD's fps, motion_bucket_id and noise_aug_strength too, and the
files' frame rate is then the pipeline's default fps).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
FILE_FPS = 7  # the files' frame rate without --fps: the pipelines' default fps conditioning
# Passed only when given, so that the pipeline's defaults apply otherwise.
TEXT_OPTIONS = ("num_steps", "guidance_scale", "fps", "motion_bucket_id")
IMAGE_OPTIONS = (
    "num_steps",
    "min_guidance_scale",
    "max_guidance_scale",
    "fps",
    "motion_bucket_id",
    "noise_aug_strength",
)
flags.DEFINE_string("workdir", None, "A training workdir: samples its newest trained stage.")
flags.DEFINE_string(
    "pretrained",
    None,
    "A diffusers pipeline folder (SVD for --image; a text-to-video layout for --prompt).",
)
flags.DEFINE_multi_string("prompt", [], "A text prompt (repeat for several).")
flags.DEFINE_multi_string(
    "image",
    [],
    "A conditioning image for image-to-video (repeat for "
    "several); with --pretrained (an SVD folder) or --workdir (an "
    "image-to-video stage).",
)
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("num_samples", 1, "Clips per prompt or image.")
flags.DEFINE_integer("seed", 0, "Seed of the first clip; clip k uses seed + k.")
flags.DEFINE_integer(
    "num_frames",
    None,
    "Frames per clip (default: the model's); beyond the "
    "trained clip length (--workdir) the prediction stage extends the clip. With "
    "--interpolate: the key frames.",
)
flags.DEFINE_integer(
    "interpolate",
    1,
    "1, 4 or 16: the workdir's interpolation stage makes (N − 1)·k + 1 frames of N key frames.",
)
flags.DEFINE_float(
    "context_scale",
    None,
    "Context guidance of a prediction stage (1: off; default: the stage's).",
)
flags.DEFINE_integer("height", None, "Frame height (default: the model's, or the image's).")
flags.DEFINE_integer("width", None, "Frame width (default: the model's, or the image's).")
flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the model's).")
flags.DEFINE_string("sampler", None, "Sampler name (default: the model's scheduler).")
flags.DEFINE_float(
    "guidance_scale",
    None,
    "Text-to-video classifier-free guidance (≤ 1: off; default: the model's).",
)
flags.DEFINE_string("negative_prompt", "", "Text-to-video unconditional prompt.")
flags.DEFINE_float(
    "min_guidance_scale",
    None,
    "Image-to-video guidance at the first frame (default: the model's).",
)
flags.DEFINE_float(
    "max_guidance_scale",
    None,
    "Image-to-video guidance at the last frame (default: the model's).",
)
flags.DEFINE_integer(
    "fps",
    None,
    f"Frames per second of the files (default {FILE_FPS}); also the "
    "fps conditioning of models that take it, as SVD (default: the pipeline's).",
)
flags.DEFINE_integer("motion_bucket_id", None, "SVD motion conditioning (default: the pipeline's).")
flags.DEFINE_float(
    "noise_aug_strength",
    None,
    "SVD conditioning-image noise augmentation (default: the pipeline's).",
)
flags.DEFINE_integer("decode_chunk_size", None, "Frames decoded at a time (default: all).")


def _keys(seeds):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def _check_flags() -> None:
  if not FLAGS.out:
    raise ValueError("--out is required.")
  if bool(FLAGS.workdir) == bool(FLAGS.pretrained):
    raise ValueError(
        "Pass exactly one of --workdir (a trained run) and --pretrained (a diffusers folder)."
    )
  if FLAGS.image and FLAGS.prompt:
    raise ValueError("Pass --prompt (text-to-video) or --image (image-to-video), not both.")
  if not FLAGS.image and not FLAGS.prompt:
    raise ValueError("Pass at least one --prompt (text-to-video) or --image (image-to-video).")
  if FLAGS.num_samples < 1:
    raise ValueError(f"--num_samples must be ≥ 1; got {FLAGS.num_samples}.")
  if FLAGS.interpolate != 1 and (FLAGS.image or not FLAGS.workdir):
    raise ValueError("--interpolate needs --workdir (with an interpolation stage) and --prompt.")


def load_pipeline():
  """The pipeline the flags ask for."""
  from vldm import pipelines  # pylint: disable=g-import-not-at-top  # heavy: after parsing

  if FLAGS.workdir:
    from vldm.recipes import stages  # pylint: disable=g-import-not-at-top

    pipe = stages.pipeline_from_workdir(FLAGS.workdir)  # the stage's own sampler settings
    source = f"The newest trained stage in {FLAGS.workdir}"
    if not FLAGS.image and (FLAGS.interpolate != 1 or _beyond_clip(pipe)):
      pipe = stages.long_video_from_workdir(FLAGS.workdir)
      try:
        pipe.check(FLAGS.num_frames or pipe.chunk_frames, FLAGS.interpolate)
      except ValueError as e:
        raise pipelines.PipelineError(f"{FLAGS.workdir}: {e}") from e
      return pipe.with_sampler(FLAGS.sampler) if FLAGS.sampler else pipe
  elif FLAGS.image:
    from vldm.pipelines import folder  # pylint: disable=g-import-not-at-top

    pipe = folder.load_image_to_video(FLAGS.pretrained)  # + the defaults vldm wrote, if any
    source = FLAGS.pretrained
  else:
    from vldm.pipelines import folder  # pylint: disable=g-import-not-at-top

    pipe = folder.load_pipeline(FLAGS.pretrained)  # a cascade when it holds an upsampler
    source = FLAGS.pretrained
  image_to_video = isinstance(pipe, pipelines.ImageToVideoPipeline)
  if bool(FLAGS.image) != image_to_video:
    kind, wanted, given = (
        ("an image-to-video (SVD)", "--image", "--prompt")
        if image_to_video
        else ("a text-to-video", "--prompt", "--image")
    )
    raise pipelines.PipelineError(f"{source} is {kind} pipeline: pass {wanted}, not {given}.")
  return pipe.with_sampler(FLAGS.sampler) if FLAGS.sampler else pipe


def _beyond_clip(pipe) -> bool:
  """Whether --num_frames asks for more frames than the text-to-video model's clip."""
  from vldm import pipelines  # pylint: disable=g-import-not-at-top

  if isinstance(pipe, pipelines.LongVideoPipeline):
    return True
  base = pipe.base if isinstance(pipe, pipelines.CascadePipeline) else pipe
  frames = getattr(base.unet, "num_frames", None) if base.unet.temporal else None
  return bool(FLAGS.num_frames and frames and FLAGS.num_frames > frames)


def call_kwargs(pipe=None) -> dict:
  """The pipeline call's settings: sizes (None: the model's) and the sampler flags given."""
  from vldm import pipelines  # pylint: disable=g-import-not-at-top

  if isinstance(pipe, pipelines.LongVideoPipeline):
    kwargs = {
        name: FLAGS[name].value
        for name in ("num_steps", "guidance_scale", "context_scale")
        if FLAGS[name].value is not None
    }
    return dict(
        num_frames=FLAGS.num_frames,
        interpolate=FLAGS.interpolate,
        height=FLAGS.height,
        width=FLAGS.width,
        decode_chunk_size=FLAGS.decode_chunk_size,
        negative_prompt=FLAGS.negative_prompt,
        **kwargs,
    )
  options = IMAGE_OPTIONS if FLAGS.image else TEXT_OPTIONS
  kwargs = {name: FLAGS[name].value for name in options if FLAGS[name].value is not None}
  if not FLAGS.image:
    kwargs["negative_prompt"] = FLAGS.negative_prompt
  return dict(
      num_frames=FLAGS.num_frames,
      height=FLAGS.height,
      width=FLAGS.width,
      decode_chunk_size=FLAGS.decode_chunk_size,
      **kwargs,
  )


def generate(pipe, out: str) -> list[dict]:
  """Runs every prompt / image num_samples times, writes the clips; returns samples.json's list."""
  from vldm import pipelines  # pylint: disable=g-import-not-at-top

  n, records = FLAGS.num_samples, []
  conditions = FLAGS.image or FLAGS.prompt
  for i, condition in enumerate(conditions):
    seeds = [FLAGS.seed + i * n + j for j in range(n)]
    start = time.time()
    frames = pipe([condition] * n, rng=_keys(seeds), **call_kwargs(pipe))
    names = [str(i * n + j) for j in range(n)]
    fps = getattr(pipe, "default_fps", FILE_FPS) if FLAGS.fps is None else FLAGS.fps
    written = pipelines.write_clips(frames, out, names, fps=fps)
    logging.info("%d clip(s) for %r in %.1f s.", n, condition, time.time() - start)
    for seed, files in zip(seeds, written):
      record = dict(
          file=os.path.basename(files["gif"]),
          mp4=os.path.basename(files["mp4"]),
          prompt=None if FLAGS.image else condition,
          seed=seed,
      )
      if FLAGS.image:
        record["image"] = condition
      records.append(record)
  return records


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from vldm.pipelines import PipelineError  # pylint: disable=g-import-not-at-top

  try:
    _check_flags()
    pipe = load_pipeline()
    records = generate(pipe, FLAGS.out)
  except (PipelineError, ValueError, FileNotFoundError) as e:
    sys.exit(f"vldm.sample: error: {e}")
  with open(os.path.join(FLAGS.out, "samples.json"), "w") as f:
    json.dump(records, f, indent=2)
  logging.info("Wrote %d clip(s) and samples.json to %s.", len(records), FLAGS.out)


if __name__ == "__main__":
  app.run(main)
