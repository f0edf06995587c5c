"""Judges an image-to-video stage trained on shapes clips (configs/svd_shapes.py) with the oracle.

  python -m vldm.eval.i2v_shapes --workdir ROOT/i2v --num_clips 72 --out ROOT/report

Held-out clips: validation examples 0 … n−1 of the shapes renderer (`shapes.make_example('video',
'validation', i)`), which cycle through every color × shape (18) and then every direction (4): 72
clips hold each combination once. Each clip's first frame conditions one sampled clip (the stage's
own sampler settings, saved beside its checkpoint), and the oracle (`vldm.eval.oracle`) compares:
  kept    the generated clip's color and shape (oracle.judge over all its frames) equal the
          conditioning frame's as the oracle reads that frame (oracle.judge of the frame alone)
  moves   the foreground centroid moves at least --min_motion_px pixels between the generated
          clip's first and last frames (the rendered clips move 6.7–13.4 px over 8 frames at 32 px)
Also recorded per clip, not scored: the direction the oracle sees (the first frame alone does not
say which way the object goes, so a direction can only match by chance, 1 in 4) and the oracle's
temporal consistency.

Writes OUT/summary.json ({kept_color_and_shape_pct, moves_pct, both_pct, n, rows, …}),
OUT/contact_sheet.png (per row: the conditioning frame, a gap, then the 8 generated frames) and
OUT/contact_sheet.gif.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The image-to-video stage's workdir (ROOT/i2v).")
flags.DEFINE_integer("num_clips", 72, "Held-out validation clips to condition on.")
flags.DEFINE_string("out", None, "Output folder (default WORKDIR/i2v_shapes).")
flags.DEFINE_integer("batch_size", 24, "Clips sampled per pipeline call.")
flags.DEFINE_integer("seed", 0, "Sampling seed (clip k uses seed + k).")
flags.DEFINE_integer("num_steps", None, "Sampler steps (default: the stage's).")
flags.DEFINE_float("min_motion_px", 1.5, "Centroid displacement (pixels) that counts as moving.")
flags.DEFINE_integer("sheet_rows", 12, "Clips on the contact sheet.")


def held_out_clips(num_clips: int, size: int, frames: int):
  """(clips [N, F, S, S, 3] uint8, their renderer parameters) of validation examples 0 … N−1."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vldm.data import shapes  # pylint: disable=g-import-not-at-top
  examples = [shapes.make_example("video", "validation", i, frames=frames, size=size)
              for i in range(num_clips)]
  return np.stack([e["video"] for e in examples]), examples


def judge_clip(condition, generated, min_motion_px: float) -> dict:
  """One row: what the oracle reads in the conditioning frame [S, S, 3] uint8 and in the generated
  clip [F, S, S, 3] in [0, 1], and whether the clip keeps color and shape and moves."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vldm.eval import oracle  # pylint: disable=g-import-not-at-top
  size = condition.shape[0]
  cond = oracle.judge(condition)
  gen = oracle.judge(generated)
  shift = None if gen.displacement is None else float(np.hypot(*gen.displacement) * size)
  kept_color = gen.color is not None and gen.color == cond.color
  kept_shape = gen.shape is not None and gen.shape == cond.shape
  moves = shift is not None and shift >= min_motion_px
  return dict(
      condition=dict(color=cond.color, shape=cond.shape),
      generated=dict(color=gen.color, shape=gen.shape, direction=gen.direction,
                     frame_shapes=list(gen.frame_shapes),
                     displacement_px=None if gen.displacement is None else
                     [float(d * size) for d in gen.displacement],
                     consistency=gen.consistency),
      shift_px=shift, kept_color=kept_color, kept_shape=kept_shape,
      kept_color_and_shape=kept_color and kept_shape, moves=moves,
      both=kept_color and kept_shape and moves)


def contact_sheet(conditions, clips, rows: int):
  """uint8 image: per row the conditioning frame, a white gap, then the generated frames."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vldm import video_io  # pylint: disable=g-import-not-at-top
  clips = np.stack([video_io.to_uint8(c) for c in clips[:rows]])
  conditions = np.asarray(conditions[:rows])
  n, f, s = clips.shape[:3]
  gray, white = 64, 255
  sheet = np.full((n * (s + 1) - 1, (f + 1) * (s + 1) + 3, 3), gray, np.uint8)
  for i in range(n):
    y = i * (s + 1)
    sheet[y:y + s, 0:s] = conditions[i]
    sheet[y:y + s, s:s + 4] = white
    for t in range(f):
      x = s + 4 + t * (s + 1)
      sheet[y:y + s, x:x + s] = clips[i, t]
  return sheet


def evaluate(workdir: str, out: str, num_clips: int, batch_size: int, seed: int,
             num_steps=None, min_motion_px: float = 1.5, sheet_rows: int = 12) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vldm import video_io  # pylint: disable=g-import-not-at-top
  from vldm.pipelines import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vldm.recipes import stages  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  stage = workdir_lib.newest_stage(workdir)
  task, params, frozen = stages.restore(stages.saved_config(stage.path), stage.run_dir)
  size, frames = task.size, task.frames
  real, examples = held_out_clips(num_clips, size, frames)
  conditions = real[:, 0]
  restored = time.perf_counter()
  kwargs = {} if num_steps is None else dict(num_steps=num_steps)
  clips = []
  for i in range(0, num_clips, batch_size):
    chunk = conditions[i:i + batch_size]
    pad = batch_size - len(chunk)  # one batch size: one compilation
    seeds = [seed + i + k for k in range(len(chunk))] + [seed + i] * pad
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    images = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)]) if pad else chunk
    generated = task.generate(params, frozen, images, keys, **kwargs)
    clips.append(np.asarray(generated)[:len(chunk)])
    logging.info("Sampled %d / %d clips (%.0f s).", i + len(chunk), num_clips,
                 time.perf_counter() - restored)
  clips = np.concatenate(clips)
  sampled = time.perf_counter()

  rows = []
  for k, (example, clip) in enumerate(zip(examples, clips)):
    row = dict(index=k, seed=seed + k, caption=example["caption"],
               truth=dict(color=example["color"], shape=example["shape"],
                          direction=example["direction"]),
               held_out=bool(example["held_out"]))
    row.update(judge_clip(conditions[k], clip, min_motion_px))
    row["direction_matches_truth"] = row["generated"]["direction"] == example["direction"]
    rows.append(row)
  real_rows = [judge_clip(conditions[k], real[k], min_motion_px) for k in range(num_clips)]
  pct = lambda key, rs=rows: 100.0 * sum(r[key] for r in rs) / len(rs)
  summary = dict(
      workdir=os.path.abspath(workdir), checkpoint_step=stage.step, n=num_clips,
      kept_color_and_shape_pct=pct("kept_color_and_shape"), moves_pct=pct("moves"),
      both_pct=pct("both"), kept_color_pct=pct("kept_color"), kept_shape_pct=pct("kept_shape"),
      direction_matches_truth_pct=pct("direction_matches_truth"),
      mean_shift_px=float(np.mean([r["shift_px"] or 0.0 for r in rows])),
      mean_consistency=float(np.mean([r["generated"]["consistency"] for r in rows])),
      condition_read_correctly_pct=100.0 * sum(
          r["condition"]["color"] == r["truth"]["color"] and
          r["condition"]["shape"] == r["truth"]["shape"] for r in rows) / len(rows),
      real_clips=dict(kept_color_and_shape_pct=pct("kept_color_and_shape", real_rows),
                      moves_pct=pct("moves", real_rows), both_pct=pct("both", real_rows)),
      min_motion_px=min_motion_px, size=size, frames=frames,
      sampler=dict(task.config.ldm.sampler.to_dict(), **kwargs),
      restore_seconds=restored - started, sampling_seconds=sampled - restored,
      rows=rows)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  sheet = contact_sheet(conditions, clips, sheet_rows)
  video_io.write_png(np.kron(sheet, np.ones((2, 2, 1), np.uint8)),
                     os.path.join(out, "contact_sheet.png"), palette=True)
  grid = video_io.tile(np.stack([video_io.to_uint8(c) for c in clips[:36]]), columns=12)
  video_io.write_gif(grid, os.path.join(out, "contact_sheet.gif"), fps=4)
  np.save(os.path.join(out, "clips.npy"), np.stack([video_io.to_uint8(c) for c in clips]))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  from vldm import devices  # pylint: disable=g-import-not-at-top
  devices.cpu_cores_as_devices([FLAGS.batch_size])  # before jax's first computation
  out = FLAGS.out or os.path.join(FLAGS.workdir, "i2v_shapes")
  summary = evaluate(FLAGS.workdir, out, FLAGS.num_clips, FLAGS.batch_size, FLAGS.seed,
                     FLAGS.num_steps, FLAGS.min_motion_px, FLAGS.sheet_rows)
  keys = ("n", "kept_color_and_shape_pct", "moves_pct", "both_pct", "kept_color_pct",
          "kept_shape_pct", "direction_matches_truth_pct", "mean_shift_px", "sampling_seconds")
  print(json.dumps({k: summary[k] for k in keys}, indent=1))
  print(f"Wrote {out}/summary.json and {out}/contact_sheet.png")


if __name__ == "__main__":
  app.run(main)
