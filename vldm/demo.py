"""The shapes recipe end to end: python -m vldm.demo --workdir DIR

Trains every stage of configs/shapes.py in DIR/<stage>/ (autoencoder, autoencoder_video, image,
video, hires; a finished stage is skipped and an interrupted one resumes from its checkpoint),
samples `--num_samples` clips for each of the 72 prompts (6 colors × 3 shapes × 4 directions)
from the final stage, judges them with the shapes oracle (`vldm.eval`) and writes
  DIR/report.md        accuracy per attribute and all attributes, seen vs held-out compositions,
                       temporal consistency, time per stage
  DIR/samples/         <k>.gif and <k>.mp4 per clip, samples.json ({file, mp4, prompt, seed,
                       correct, seen}), grid.gif (one clip per prompt, a row per color and shape),
                       grid.png (the grid's first frame above its last)
  DIR/timings.json     seconds per stage (kept across resumed runs)
`--runlocal` shrinks everything to seconds (tests); `--eval_stages video,hires` also evaluates the
32-px video stage. `--long` then trains Video LDM's long-video stages (prediction, interpolation)
and adds a long-video section to the report (`vldm.eval.long_shapes`): `--long_frames` frames per
clip from the 8-frame model, judged as a whole, per 8-frame window and for drift
(DIR/long/strip.png shows some), and the interpolation stage on held-out rendered clips
(DIR/long/interpolation.png); DIR/long/summary.json holds the numbers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder of the run: one subfolder per stage, samples, report.")
flags.DEFINE_bool("runlocal", False, "Tiny models and few steps: the whole recipe in seconds.")
flags.DEFINE_integer("num_samples", 2, "Clips per prompt.")
flags.DEFINE_integer("seed", 0, "Seed of the first clip; clip k uses seed + k.")
flags.DEFINE_integer("batch_size", 48, "Clips sampled per call (one compilation per size).")
flags.DEFINE_list(
    "eval_stages",
    ["hires"],
    "Stages whose samples are judged; the last one's clips are written to DIR/samples.",
)
flags.DEFINE_string("data_dir", None, "TFDS data folder (default: DIR/data).")
flags.DEFINE_bool(
    "long",
    False,
    "Also train the prediction and interpolation stages and report on long videos.",
)
flags.DEFINE_integer("long_frames", 32, "Frames per long clip (--long).")


def _config_file() -> str:
  """configs/shapes.py: installed beside vldm (`pip install .`), else beside this checkout's vldm/
  (run from a source tree that is not installed)."""
  try:
    spec = importlib.util.find_spec("configs.shapes")
  except ImportError:  # no `configs` package on the path
    spec = None
  if spec is not None and spec.origin and os.path.isfile(spec.origin):
    return spec.origin
  return os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "shapes.py"
  )


CONFIG_FILE = _config_file()


def _config(stage: str, workdir: str, runlocal: bool, data_dir=None):
  from vldm.train import config_lib  # pylint: disable=g-import-not-at-top

  arg = f"stage={stage},root={workdir},runlocal={runlocal}"
  if data_dir:
    arg += f",data_dir={data_dir}"
  return config_lib.load_config(f"{CONFIG_FILE}:{arg}")


def _stages(long: bool) -> tuple:
  """The stages the demo trains, in order."""
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top

  return shapes_config.BASE_STAGES + (shapes_config.LONG_STAGES if long else ())


def _batch_sizes(runlocal: bool) -> list[int]:
  """Every stage's training batch size."""
  from vldm.train import config_lib  # pylint: disable=g-import-not-at-top

  config_lib.ensure_importable(CONFIG_FILE)
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top

  return [_config(stage, "", runlocal).batch_size for stage in shapes_config.STAGES]


def _finished_step(workdir: str):
  from vldm.pipelines import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  stage = workdir_lib._newest_checkpoint(workdir)  # pylint: disable=protected-access
  return None if stage is None else stage.step


def train_stages(root: str, runlocal: bool, data_dir=None, long: bool = False) -> dict:
  """Trains (or resumes, or skips) every stage in order (the long-video ones too with `long`);
  returns {stage: seconds}."""
  from vldm.train import trainer  # pylint: disable=g-import-not-at-top

  timings_path = os.path.join(root, "timings.json")
  timings = {}
  if os.path.exists(timings_path):
    with open(timings_path) as f:
      timings = json.load(f)
  for stage in _stages(long):
    config = _config(stage, root, runlocal, data_dir)
    workdir = os.path.join(root, stage)
    if _finished_step(workdir) == config.total_steps and stage in timings:
      logging.info("Stage %s is finished (%d steps); skipping.", stage, config.total_steps)
      continue
    logging.info(
        "Stage %s: %d steps of batch %d in %s.",
        stage,
        config.total_steps,
        config.batch_size,
        workdir,
    )
    start = time.perf_counter()
    trainer.train_and_evaluate(config, workdir)
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
    with open(timings_path, "w") as f:
      json.dump(timings, f, indent=2)
    if _finished_step(workdir) != config.total_steps:  # preempted: the trainer saved and stopped
      raise Interrupted(
          f"Stage {stage} stopped before its {config.total_steps} steps; rerun the "
          "same command to resume it."
      )
  return timings


class Interrupted(RuntimeError):
  """A stage stopped early (a preemption notice); its checkpoint is saved."""


def sample_and_judge(root: str, stage: str, num_samples: int, seed: int, batch_size: int):
  """Samples every prompt num_samples times from `stage` through its pipeline, as
  `python -m vldm.sample --workdir ROOT/STAGE` does (the stage's saved config and sampler
  settings); returns (prompts, seeds, clips, records, seconds, the stage's config)."""
  from vldm.eval import oracle  # pylint: disable=g-import-not-at-top
  from vldm.pipelines import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vldm.recipes import common, stages  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  stage_dir = os.path.join(root, stage)
  config = stages.saved_config(workdir_lib.newest_stage(stage_dir).path)
  pipe = stages.pipeline_from_workdir(stage_dir)
  prompts, seeds, clips = common.sample_all_prompts(pipe, num_samples, seed, batch_size)
  records = oracle.judge_all(clips, prompts)
  return prompts, seeds, clips, records, time.perf_counter() - start, config


def write_samples(out: str, prompts, seeds, clips, records, num_samples: int) -> None:
  """<k>.gif / <k>.mp4 per clip, samples.json, grid.gif (first clip of every prompt) and grid.png
  (its first frame above its last)."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vldm import video_io  # pylint: disable=g-import-not-at-top

  os.makedirs(out, exist_ok=True)
  entries = []
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # ffmpeg runs beside the GIF encoder
    for k, (prompt, seed, clip, record) in enumerate(zip(prompts, seeds, clips, records)):
      pool.submit(video_io.write_mp4, clip, os.path.join(out, f"{k}.mp4"))
      video_io.write_gif(clip, os.path.join(out, f"{k}.gif"))
      entries.append(
          dict(
              file=f"{k}.gif",
              mp4=f"{k}.mp4",
              prompt=prompt,
              seed=seed,
              held_out=record["held_out"],
              seen=record["seen"],
              correct=record["correct"],
              consistency=record["consistency"],
          )
      )
  with open(os.path.join(out, "samples.json"), "w") as f:
    json.dump(entries, f, indent=2)
  # One clip per prompt; prompts run color, shape, direction, so each row is one color.
  first = np.stack([video_io.to_uint8(c) for c in clips[::num_samples]])
  grid = video_io.tile(first, columns=12)
  video_io.write_gif(grid, os.path.join(out, "grid.gif"), fps=4)
  # The first frame above the last: the motion at a glance where a GIF does not play.
  gap = np.full((8,) + grid.shape[2:], 255, np.uint8)
  video_io.write_png(
      np.concatenate([grid[0], gap, grid[-1]]), os.path.join(out, "grid.png"), palette=True
  )


def report(
    root: str,
    timings: dict,
    evaluations: dict,
    num_samples: int,
    runlocal: bool,
    long_lines=(),
    long_seconds=None,
) -> str:
  """DIR/report.md's text."""
  from vldm.eval import metrics  # pylint: disable=g-import-not-at-top

  lines = [
      "# Shapes recipe report",
      "",
      f"Workdir `{root}`{' (runlocal: tiny models, a few steps)' if runlocal else ''}. "
      f"{num_samples} clips for each of the 72 prompts (6 colors × 3 shapes × 4 directions); "
      "held-out compositions (never in the video training data): "
      "yellow triangle, cyan circle, magenta square.",
      "",
  ]
  for stage, (summary, seconds, config) in evaluations.items():
    s = config.ldm.sampler
    lines += [
        f"## Oracle on the `{stage}` stage ({config.data.resolution} px, "
        f"{config.data.frames} frames)",
        "",
        f"Sampler {s.name} ({dict(s.options)}), {s.num_steps} steps, guidance scale "
        f"{s.guidance_scale}; sampling and judging took {seconds:.0f} s.",
        "",
    ]
    up = config.ldm.upsampler
    if up.factor:
      lines += [
          f"A latent upsampler (×{up.factor}): the `video` stage samples with the settings "
          f"above, this stage then samples in {up.num_steps} steps, guidance scale "
          f"{up.guidance_scale}, conditioned on the video stage's latents (noise level "
          f"{up.noise_level} of {config.ldm.schedule.num_train_timesteps}).",
          "",
      ]
    lines += [
        metrics.markdown_table(summary),
        "",
        "All-attribute accuracy: a clip counts when color, shape and direction all match "
        "its prompt. Consistency: mean motion-compensated soft IoU of consecutive frames' "
        "foreground (see `vldm/eval/oracle.py`; rendered clips score ≥ 0.95).",
        "",
    ]
    worst = sorted(summary["prompts"].items(), key=lambda kv: kv[1][0] / kv[1][1])[:8]
    lines += [
        "Prompts with the fewest correct clips: "
        + ", ".join(f"{p!r} {hits}/{total}" for p, (hits, total) in worst),
        "",
    ]
  lines += list(long_lines)
  import jax  # pylint: disable=g-import-not-at-top

  devices = f"{jax.device_count()} {jax.default_backend()} device(s)"
  lines += [
      "## Time per stage",
      "",
      f"On {devices}" + (", data-parallel." if jax.device_count() > 1 else "."),
      "",
      "| stage | steps × batch | seconds |",
      "|---|---:|---:|",
  ]
  total = 0.0
  for stage in _stages(bool(long_lines)):
    config = _config(stage, root, runlocal)
    seconds = timings.get(stage, float("nan"))
    total += seconds
    lines.append(f"| {stage} | {config.total_steps} × {config.batch_size} | {seconds:.0f} |")
  for stage, (_, seconds, _) in evaluations.items():
    total += seconds
    lines.append(f"| sampling + oracle ({stage}) | {72 * num_samples} clips | {seconds:.0f} |")
  for what, seconds in (long_seconds or {}).items():
    total += seconds
    lines.append(f"| {what} | | {seconds:.0f} |")
  lines += [f"| **total** | | **{total:.0f}** |", ""]
  return "\n".join(lines)


def run(
    workdir: str,
    runlocal: bool = False,
    num_samples: int = 2,
    seed: int = 0,
    batch_size: int = 48,
    eval_stages=("hires",),
    data_dir=None,
    long: bool = False,
    long_frames: int = 32,
) -> dict:
  """The whole demo (see the module docstring); returns {stage: oracle summary} (+ 'long' and
  'interpolation' summaries with `long`)."""
  import jax  # pylint: disable=g-import-not-at-top
  # Cheap random-number kernels for sampling: XLA:CPU compiles threefry slowly. Training keys
  # follow each stage's config.prng_impl instead, so a stage resumes the same without the demo.
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  try:
    return _run(
        workdir, runlocal, num_samples, seed, batch_size, eval_stages, data_dir, long, long_frames
    )
  finally:
    jax.config.update("jax_default_prng_impl", previous)


def _run(
    workdir, runlocal, num_samples, seed, batch_size, eval_stages, data_dir, long, long_frames
):
  from vldm.eval import metrics  # pylint: disable=g-import-not-at-top
  from vldm.train import config_lib  # pylint: disable=g-import-not-at-top

  config_lib.ensure_importable(CONFIG_FILE)  # configs/ sits beside the vldm package
  started = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  timings = train_stages(workdir, runlocal, data_dir, long)
  evaluations = {}
  for stage in eval_stages:
    prompts, seeds, clips, records, seconds, config = sample_and_judge(
        workdir, stage, num_samples, seed, batch_size
    )
    summary = metrics.summarize(records)
    logging.info("Oracle on %s:\n%s", stage, metrics.markdown_table(summary))
    if stage == eval_stages[-1]:
      start = time.perf_counter()
      write_samples(os.path.join(workdir, "samples"), prompts, seeds, clips, records, num_samples)
      seconds += time.perf_counter() - start
    evaluations[stage] = (summary, seconds, config)
  summaries = {stage: e[0] for stage, e in evaluations.items()}
  long_lines, long_seconds = (), None
  if long:
    long_lines, long_seconds, long_summaries = long_report(
        workdir, num_samples, seed, batch_size, long_frames
    )
    summaries.update(long_summaries)
  text = report(workdir, timings, evaluations, num_samples, runlocal, long_lines, long_seconds)
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  logging.info(
      "Wrote %s in %.0f s.", os.path.join(workdir, "report.md"), time.perf_counter() - started
  )
  return summaries


def long_report(root: str, num_samples: int, seed: int, batch_size: int, num_frames: int):
  """Samples and judges long clips and the interpolation stage (`vldm.eval.long_shapes`); writes
  DIR/long/ (strip.png, interpolation.png, summary.json); returns (report lines, seconds per
  part, {'long': summary, 'interpolation': summary})."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vldm.eval import long_shapes, long_video  # pylint: disable=g-import-not-at-top

  out = os.path.join(root, "long")
  os.makedirs(out, exist_ok=True)
  prompts, _, clips, long_seconds = long_shapes.sample_long(
      root, num_samples, seed, batch_size, num_frames
  )
  start = time.perf_counter()
  _, long_summary = long_shapes.judge_long_clips(prompts, clips, long_video.WINDOW)
  picks = long_shapes.strip_prompts(prompts, num_samples)
  long_video.strip(
      [clips[i] for i in picks], [prompts[i] for i in picks], os.path.join(out, "strip.png")
  )
  long_seconds += time.perf_counter() - start
  _, interp_summary, (truth, generated), interp_seconds = long_shapes.evaluate_interpolation(
      root, 72, seed, batch_size
  )
  pairs = [c for i in range(6) for c in (truth[i], generated[i])]
  long_video.strip(pairs, ["truth", "generated"] * 6, os.path.join(out, "interpolation.png"))
  seconds = {"long": long_seconds, "interpolation": interp_seconds}
  logging.info("Long clips: %s; interpolation: %s", long_summary["overall"], interp_summary)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(
        dict(
            long={k: v for k, v in long_summary.items() if k != "prompts"},
            interpolation=interp_summary,
            seconds=seconds,
            num_frames=num_frames,
            num_samples=num_samples,
        ),
        f,
        indent=2,
        default=float,
    )
  np.save(os.path.join(out, "clips.npy"), clips[picks])
  lines = long_shapes.report_section(
      long_summary,
      interp_summary,
      num_frames,
      num_samples,
      seconds,
      "long/strip.png",
      "long/interpolation.png",
  )
  return (
      lines,
      {
          "long clips: sampling + oracle": long_seconds,
          "interpolation: sampling + PSNR": interp_seconds,
      },
      dict(long=long_summary, interpolation=interp_summary),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    sys.exit("vldm.demo: error: --workdir is required.")
  from vldm import devices  # pylint: disable=g-import-not-at-top
  from vldm.train import metrics as train_metrics  # pylint: disable=g-import-not-at-top

  logging.get_absl_logger().addFilter(train_metrics.QuietOrbax())
  # Before jax's first computation: on a 2-core machine, two single-threaded CPU devices train and
  # sample the recipe faster than one (see cpu_cores_as_devices).
  if devices.cpu_cores_as_devices(_batch_sizes(FLAGS.runlocal) + [FLAGS.batch_size]):
    logging.info(
        "XLA:CPU runs one single-threaded device per core: XLA_FLAGS=%s", os.environ["XLA_FLAGS"]
    )
  try:
    run(
        FLAGS.workdir,
        FLAGS.runlocal,
        FLAGS.num_samples,
        FLAGS.seed,
        FLAGS.batch_size,
        FLAGS.eval_stages,
        FLAGS.data_dir,
        FLAGS.long,
        FLAGS.long_frames,
    )
  except Interrupted as e:
    sys.exit(f"vldm.demo: {e}")


if __name__ == "__main__":
  app.run(main)
