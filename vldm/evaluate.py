"""Evaluate generated clips: python -m vldm.evaluate …

  python -m vldm.evaluate --real REAL_DIR --generated GEN_DIR --metrics fvd,fid,clipsim \\
      --i3d_weights i3d_pretrained_400.pt --inception_weights pt_inception-2015-12-05.pth \\
      --clip clip-vit-base-patch32/ --out results/eval.json
  python -m vldm.evaluate --real REAL_DIR --workdir RUN_DIR --metrics fvd,clipsim … --out OUT.json

--generated is a folder of MP4 / GIF clips (vldm.sample's output, whose samples.json gives the
prompts, or a folder with a captions file); --workdir samples the newest trained stage of a run
for the real clips' captions first (written next to OUT.json, in OUT_generated/, with the
samples.json vldm.sample writes). Writes OUT.json (every metric with the protocol that produced
it: clips, frames, frame stride, the networks' input sizes) and a short report, OUT.md, with a
sheet of real and generated frames, OUT_clips.png. The real set's feature statistics are cached
(--stats_cache) and reused while the real clips, the protocol and the weights stay the same.
See vldm.eval.evaluator for the protocol.
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
flags.DEFINE_string("real", None, "A folder of real clips (MP4 / GIF / …, with captions).")
flags.DEFINE_string("generated", None, "A folder of generated clips (e.g. vldm.sample's --out).")
flags.DEFINE_string("workdir", None, "A training run: sample its newest stage first.")
flags.DEFINE_string("metrics", "fvd,fid,clipsim", "Comma-separated: fvd, fid, clipsim, oracle.")
flags.DEFINE_string("i3d_weights", "", "I3D state dict for FVD (i3d_pretrained_400.pt).")
flags.DEFINE_string("inception_weights", "", "FID Inception state dict (pt_inception-*.pth).")
flags.DEFINE_string("clip", "", "A transformers CLIPModel folder, for clipsim.")
flags.DEFINE_string("out", None, "The JSON file to write (the report goes next to it).")
flags.DEFINE_integer("num_clips", 2048, "At most this many clips of each set.")
flags.DEFINE_integer("num_frames", 16, "Frames per clip.")
flags.DEFINE_integer("frame_stride", 1, "Take every n-th frame of a clip.")
flags.DEFINE_integer("fid_frames", 0, "Frames per clip for FID, evenly spaced (0: all).")
flags.DEFINE_integer("batch_size", 8, "Clips per network call (and per sampling call).")
flags.DEFINE_string(
    "stats_cache", None, "Where the real set's statistics are cached (default: OUT's folder/stats)."
)
flags.DEFINE_integer("seed", 0, "--workdir: clip k's noise comes from seed + k.")
flags.DEFINE_integer("num_steps", None, "--workdir: sampler steps (default: the stage's).")
flags.DEFINE_float("guidance_scale", None, "--workdir: guidance (default: the stage's).")


def _check_flags() -> None:
  if not FLAGS.out or not FLAGS.real:
    raise ValueError("--real and --out are required.")
  if bool(FLAGS.generated) == bool(FLAGS.workdir):
    raise ValueError("Pass exactly one of --generated (a folder of clips) and --workdir (a run).")


def _out_base() -> str:
  base = FLAGS.out[: -len(".json")] if FLAGS.out.endswith(".json") else FLAGS.out
  os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
  return base


def sample_workdir(workdir, captions, protocol, out_dir) -> str:
  """Samples one clip per caption from the run's newest stage into out_dir (MP4 + GIF and
  samples.json, as vldm.sample writes them); returns out_dir."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vldm import pipelines  # pylint: disable=g-import-not-at-top
  from vldm.recipes import stages  # pylint: disable=g-import-not-at-top

  pipe = stages.pipeline_from_workdir(workdir)
  frames = (protocol.num_frames - 1) * protocol.frame_stride + 1
  kwargs = {k: FLAGS[k].value for k in ("num_steps", "guidance_scale") if FLAGS[k].value}
  os.makedirs(out_dir, exist_ok=True)
  records, batch = [], FLAGS.batch_size
  for start in range(0, len(captions), batch):
    prompts = captions[start : start + batch]
    seeds = [FLAGS.seed + start + j for j in range(len(prompts))]
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    clips = pipe(prompts, rng=keys, num_frames=frames, **kwargs)
    names = [str(start + j) for j in range(len(prompts))]
    fps = getattr(pipe, "default_fps", 8)
    for prompt, seed, files in zip(
        prompts, seeds, pipelines.write_clips(clips, out_dir, names, fps=fps)
    ):
      records.append(
          dict(
              file=os.path.basename(files["gif"]),
              mp4=os.path.basename(files["mp4"]),
              prompt=prompt,
              seed=seed,
          )
      )
    logging.info("vldm.evaluate: sampled %d / %d clips.", len(records), len(captions))
  with open(os.path.join(out_dir, "samples.json"), "w", encoding="utf-8") as f:
    json.dump(records, f, indent=2)
  return out_dir


def write_report(base, result, real, generated) -> None:
  """OUT.md: the metrics and the protocol; OUT_clips.png: first / middle / last frames of up to 8
  real (top rows) and generated clips."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vldm import video_io  # pylint: disable=g-import-not-at-top
  from vldm.data import transforms  # pylint: disable=g-import-not-at-top

  def strip(clips):
    frames = [c[[0, len(c) // 2, len(c) - 1]] for c in clips[:8]]
    return [transforms.resize_and_crop(f, 64) for f in frames]

  rows = strip(real.clips) + strip(generated.clips)
  sheet = os.path.basename(base) + "_clips.png"
  if rows:
    video_io.write_png(video_io.tile(np.stack(rows), columns=8), base + "_clips.png")
  values = [(k, v) for k, v in result.items() if isinstance(v, (int, float))]
  lines = [
      "# vldm.evaluate",
      "",
      f"Real: `{real.folder}` ({len(real)} clips). Generated: `{generated.folder}` "
      f"({len(generated)} clips).",
      "",
      "| metric | value |",
      "|---|---|",
      *[f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in values],
      "",
      "Protocol: " + ", ".join(f"{k} = {v}" for k, v in result["protocol"].items()) + ".",
      "",
      f"Counts: `{json.dumps(result['counts'])}`.",
      "",
      f"![real (top) and generated clips: first, middle, last frames]({sheet})",
      "",
  ]
  with open(base + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from vldm.eval import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from vldm.pipelines import PipelineError  # pylint: disable=g-import-not-at-top

  try:
    _check_flags()
    base = _out_base()
    protocol = evaluator_lib.Protocol(
        FLAGS.num_clips, FLAGS.num_frames, FLAGS.frame_stride, FLAGS.fid_frames
    )
    evaluator = evaluator_lib.Evaluator(
        FLAGS.metrics.split(","),
        protocol,
        i3d_weights=FLAGS.i3d_weights,
        inception_weights=FLAGS.inception_weights,
        clip=FLAGS.clip,
        batch_size=FLAGS.batch_size,
    )
    start = time.time()
    real = evaluator_lib.read_folder(FLAGS.real, protocol)
    generated_dir = FLAGS.generated
    if FLAGS.workdir:
      captions = [c for c in real.captions if c]
      if len(captions) < len(real):
        raise ValueError(
            f"--workdir samples a clip for each real clip's caption; {len(real) - len(captions)} "
            f"of the {len(real)} real clips in {FLAGS.real} have none."
        )
      generated_dir = sample_workdir(FLAGS.workdir, captions, protocol, base + "_generated")
    generated = evaluator_lib.read_folder(generated_dir, protocol)
    cache = FLAGS.stats_cache or os.path.join(os.path.dirname(os.path.abspath(base)), "stats")
    result = evaluator.evaluate(generated, evaluator.real_stats(real, cache))
  except (PipelineError, ValueError, FileNotFoundError) as e:
    sys.exit(f"vldm.evaluate: error: {e}")
  result.update(real=os.path.abspath(FLAGS.real), generated=os.path.abspath(generated_dir))
  result["counts"].update(
      real_clips=len(real),
      real_skipped={k: len(v) for k, v in real.skipped.items()},
      real_resolutions=evaluator_lib.resolutions(real),
  )
  result["seconds"] = round(time.time() - start, 1)
  with open(FLAGS.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  write_report(base, result, real, generated)
  logging.info(
      "vldm.evaluate: %s → %s",
      ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)),
      FLAGS.out,
  )


if __name__ == "__main__":
  app.run(main)
