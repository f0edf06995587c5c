"""The shapes recipe's long-video report: `python -m vldm.demo --long`.

Two measurements on a shapes run that has the `prediction` and `interpolation` stages:
  long clips      every one of the 72 prompts, `num_samples` clips of `num_frames` key frames
                  from the long-video pipeline (the prediction stage's own first chunk, then its
                  rollout two frames of context at a time), at the key-frame resolution (32 px,
                  no upsampler): the oracle on the whole clip, the direction of every 8-frame
                  window, the drift of color and area, and the consistency of the whole clip
                  against its first chunk's (`vldm.eval.long_video`).
  interpolation   held-out rendered clips (the validation split: never trained on) at the
                  interpolation stage's T → 4T frame rate, 3 of every 4 frames dropped: the key
                  frames encoded, the stage fills the gaps, and the decoded frames between the
                  keys are compared with the truth (PSNR), against the linear blend of the
                  neighbouring key frames; the oracle checks color and shape.
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vldm.data import shapes
from vldm.eval import long_video
from vldm.pipelines import common as pipeline_common
from vldm.recipes import common
from vldm.recipes import stages

STRIP_PROMPTS = 6  # prompts drawn over their whole clip in the report's strip


def _batched_keys(seeds, batch_size):
  """A constant batch size compiles once: seeds padded with the first one."""
  pad = batch_size - len(seeds)
  return jax.vmap(jax.random.key)(jnp.asarray(list(seeds) + list(seeds[:1]) * pad, jnp.uint32))


def sample_long(
    root: str, num_samples: int, seed: int, batch_size: int, num_frames: int = 32, **kwargs
):
  """(prompts, seeds, clips [N, num_frames, H, W, 3], seconds): long clips of every prompt;
  kwargs (context_scale, num_steps, …) go to the long-video pipeline."""
  start = time.perf_counter()
  pipe = stages.long_video_from_workdir(root, upsample=False)
  prompts, seeds, clips = common.sample_all_prompts(
      pipe, num_samples, seed, batch_size, num_frames=num_frames, **kwargs
  )
  return prompts, seeds, clips, time.perf_counter() - start


def judge_long_clips(prompts, clips, window: int) -> tuple[list, dict]:
  """(records, summary) of long clips; the summary adds the first chunk's consistency."""
  records = long_video.judge_long(clips, prompts, window=window)
  summary = long_video.summarize_long(records)
  first = long_video.judge_long(clips[:, :window], prompts, window=window)
  summary["first_chunk_consistency"] = float(np.mean([r["consistency"] for r in first]))
  summary["consistency"] = float(np.mean([r["consistency"] for r in records]))
  return records, summary


def rendered_clips(num_clips: int, frames: int, size: int, tempo: float, seed: int = 0):
  """(clips [N, frames, size, size, 3] uint8, captions): validation examples at `tempo`."""
  examples = [
      shapes.make_example(
          "video", "validation", i, frames=frames, size=size, seed=seed, tempos=(tempo,)
      )
      for i in range(num_clips)
  ]
  return np.stack([e["video"] for e in examples]), [e["caption"] for e in examples]


def evaluate_interpolation(
    root: str, num_clips: int, seed: int, batch_size: int, tempo: float = 4.0, **kwargs
):
  """(records, summary, (truth, generated) clips, seconds) of the interpolation stage on held-out
  rendered clips (see the module docstring); kwargs (num_steps, guidance_scale) go to its
  sampler. Beside the pixel blend, two references through the same VAE: the key frames' latents
  blended linearly and decoded (`psnr_latent_blend`), and every true frame encoded and decoded
  (`psnr_codec`: what the VAE allows at best)."""
  start = time.perf_counter()
  pipe = stages.long_video_from_workdir(root, upsample=False)
  interp = pipe.interpolation
  if interp is None:
    raise pipeline_common.PipelineError(f"{root} has no interpolation stage.")
  stride = interp.frame_stride
  frames = interp.unet.num_frames
  size = interp.default_size()[0]
  truth, captions = rendered_clips(num_clips, frames, size, tempo, seed)
  encode = jax.jit(lambda p, x: pipeline_common.encode_frames(interp.vae, p, x))
  weights = (np.arange(frames) % stride) / stride
  generated, latent_blend, codec = [], [], []
  for i in range(0, num_clips, batch_size):
    chunk = truth[i : i + batch_size]
    n = len(chunk)
    pad = np.concatenate([chunk, chunk[:1].repeat(batch_size - n, axis=0)])
    latents = np.asarray(encode(interp.params["vae"], pad.astype(np.float32) / 255))
    keys = latents[:, ::stride]
    prompts = captions[i : i + batch_size] + captions[:1] * (batch_size - n)
    filled = pipe.interpolate(
        prompts, keys, _batched_keys(list(range(seed + i, seed + i + n)), batch_size), **kwargs
    )
    generated.append(interp.decode(filled)[:n])
    left = np.repeat(keys[:, :-1], stride, axis=1)[:, : frames - 1]
    right = np.repeat(keys[:, 1:], stride, axis=1)[:, : frames - 1]
    w = weights[None, : frames - 1, None, None, None]
    blend = np.concatenate([(1 - w) * left + w * right, keys[:, -1:]], axis=1)
    latent_blend.append(interp.decode(blend)[:n])
    codec.append(interp.decode(latents)[:n])
  generated = np.concatenate(generated)
  records = long_video.judge_interpolation(generated, truth, captions, factor=stride)
  between = np.arange(frames) % stride != 0
  for record, true_clip, blend, coded in zip(
      records, truth, np.concatenate(latent_blend), np.concatenate(codec)
  ):
    true_between = true_clip[between]
    record["psnr_latent_blend"] = long_video.psnr(blend[between], true_between)
    record["psnr_codec"] = long_video.psnr(coded[between], true_between)
  summary = long_video.summarize_interpolation(records)
  for key in ("psnr_latent_blend", "psnr_codec"):
    summary[key] = float(np.mean([r[key] for r in records]))
  return records, summary, (truth, generated), time.perf_counter() - start


def _pct(x: Optional[float]) -> str:
  return "—" if x is None else f"{100 * x:.1f}%"


def report_section(
    long_summary: dict,
    interp_summary: dict,
    num_frames: int,
    num_samples: int,
    seconds: dict,
    strip_png: str,
    interp_png: str,
) -> list[str]:
  """The report's long-video lines (markdown); the PNG paths as the report links them."""
  lines = [
      f"## Long videos (`--long`): {num_frames} frames from an 8-frame model",
      "",
      f"{num_samples} clips for each of the 72 prompts: the prediction stage's first chunk "
      "(nothing given), then chunks of 8 frames each given the last 2 generated (6 new "
      "frames a chunk), in latent space; 32 px. Sampling and judging took "
      f"{seconds['long']:.0f} s.",
      "",
      "| compositions | clips | color | shape | direction | all attributes | every window's "
      "direction | windows right | no drift | consistency |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for group in ("seen", "held_out"):
    s = long_summary.get(group)
    if not s:
      continue
    lines.append(
        f"| {group.replace('_', '-')} | {s['n']} | {_pct(s['color'])} | "
        f"{_pct(s['shape'])} | {_pct(s['direction'])} | {_pct(s['all'])} | "
        f"{_pct(s['every_window_direction'])} | {_pct(s['window_direction'])} | "
        f"{_pct(s['drift_ok'])} | {s['consistency']:.3f} |"
    )
  lines += [
      "",
      f"Consistency of the whole clips {long_summary['consistency']:.3f} against "
      f"{long_summary['first_chunk_consistency']:.3f} for their first 8 frames (the "
      "model's own 8-frame clips). Windows: 8 frames, direction by the window's centroid "
      f"displacement (still below {long_video.WINDOW_STATIC_THRESHOLD} of the side); no "
      f"drift: the last window's foreground color and area within "
      f"{100 * long_video.DRIFT_TOLERANCE:.0f} % of the first window's.",
      "",
      f"![long clips]({strip_png}) (one row per prompt, white bars every " "8 frames)",
      "",
      "## Interpolation (T → 4T)",
      "",
      f"{interp_summary['n']} held-out rendered clips, 3 of every 4 frames dropped, filled by "
      f"the interpolation stage ({seconds['interpolation']:.0f} s):",
      "",
      "| PSNR generated | PSNR linear blend | gain | color | shape | color and shape |",
      "|---:|---:|---:|---:|---:|---:|",
      f"| {interp_summary['psnr_generated']:.2f} dB | {interp_summary['psnr_blend']:.2f} dB | "
      f"{interp_summary['gain']:+.2f} dB | {_pct(interp_summary['color'])} | "
      f"{_pct(interp_summary['shape'])} | {_pct(interp_summary['color_and_shape'])} |",
      "",
      f"![interpolation]({interp_png}) (truth above generated)",
      "",
  ]
  return lines


def strip_prompts(prompts, num_samples: int) -> list[int]:
  """Indices of the first clip of STRIP_PROMPTS prompts spread over the 72."""
  count = len(prompts) // num_samples
  picks = np.linspace(0, count - 1, STRIP_PROMPTS).round().astype(int)
  return [int(p) * num_samples for p in picks]
