"""Benchmark suites and the loop that runs them.

  cpu_small  the tiny SVD-like video UNet (4 levels of 32–128 channels, SVD's block layout) at
             batch 2 × 8 frames × 16×16 latents, float32: a training step, a 25-step guided
             Euler sampling run, one guided forward, and the temporal conv / attention alone.
  gpu_svd    the SVD UNet at full size (1.5 B parameters), bf16 compute: training steps at 14 frames
             × 40×64 and × 72×128 latents, 25-step guided sampling at 576×1024, attention (spatial
             and temporal, 'xla' and 'cudnn') and the temporal-convolution variants.
  gpu_video_ldm  one Video LDM video-stage training step of SD 1.5's UNet inflated with temporal
             layers (spatial layers frozen), 16 frames × 32×32 latents, bf16: batch 1 with cuDNN
             and XLA attention, batch 2, and batch 8 with every block recomputed
             (`vldm.benchmark.video_stage`; no reference: its columns stay empty).
  gpu_svd_i2v  one SVD image-to-video training step at 14 frames × 576×1024: the whole UNet
             trained, the VAE encoder and CLIP ViT-H image encoder frozen in the same step, bf16
             (`vldm.benchmark.svd_stage`'s default rows; no reference: its columns stay empty).
  smoke      a 2-level micro UNet, for tests: seconds, not a measurement.

`run(cases, repeats, warmup)` builds each case, times vldm and the reference alternately
(medians after warm-up; compile time apart), measures peak memory (what a call adds on top of
weights, optimizer state and inputs; see `measure`) and returns one row per case:
{name, jax_s, reference_s, ratio = jax_s / reference_s, flops, jax_tflops_per_s, jax_mfu, …}.
The fastest calls (jax_min_s, reference_min_s) are kept too: on a machine shared with other work
they show what each framework does undisturbed (XLA splits ops over all cores, so a core taken by
another process stalls it more than single-threaded torch).
`dry_run(cases)` returns the same rows with configs and FLOPs only, building nothing.
"""
from __future__ import annotations

import gc
import re
import time
import traceback
from typing import Callable, Optional, Sequence

from vldm.benchmark import cases as cases_lib
from vldm.benchmark import measure

# A small video UNet with SVD's structure (4 levels, 2 layers each, cross-attention in the first
# three, 32-wide heads), and SVD itself (diffusers' UNetSpatioTemporalConditionModel defaults).
TINY_SVD_UNET = dict(
    block_out_channels=(32, 64, 128, 128), num_attention_heads=(1, 2, 4, 4),
    cross_attention_dim=64, addition_time_embed_dim=32, projection_class_embeddings_input_dim=96,
    in_channels=8, out_channels=4, layers_per_block=2, num_frames=8)
SVD_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), num_attention_heads=(5, 10, 20, 20),
    cross_attention_dim=1024, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768, in_channels=8, out_channels=4, layers_per_block=2,
    num_frames=25)
MICRO_UNET = dict(
    block_out_channels=(32,), num_attention_heads=(2,), cross_attention_dim=16,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, in_channels=8,
    out_channels=4, layers_per_block=1, num_frames=2,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    up_block_types=("CrossAttnUpBlockSpatioTemporal",))


def cpu_small() -> list:
  setup = lambda batch=2, **kw: cases_lib.UNetSetup.make(TINY_SVD_UNET, batch, 8, 16, 16, **kw)
  return [
      cases_lib.unet_train_case("train_step", setup()),
      cases_lib.unet_sample_case("sample_euler25_cfg", setup(), num_steps=25),
      cases_lib.unet_forward_case("forward_cfg_batch", setup(batch=4)),
      *(cases_lib.temporal_conv_case(f"temporal_conv_{impl}", 2, 8, 16, 16, 32, impl)
        for impl in cases_lib.TEMPORAL_CONV_VARIANTS),
      # The first level's attention in the sampling step (batch 4): per frame over 16×16 pixels,
      # and per pixel over 8 frames.
      cases_lib.attention_case("spatial_attention", 32, 256, 1, 32, "xla", where="spatial"),
      cases_lib.attention_case("temporal_attention", 1024, 8, 1, 32, "xla", where="temporal"),
  ]


def gpu_svd() -> list:
  bf16 = dict(dtype="bfloat16", device="cuda")
  svd = lambda h, w, **options: cases_lib.UNetSetup.make(SVD_UNET, 1, 14, h, w, options=options,
                                                         **bf16)
  impl = dict(attention_implementation="xla", temporal_conv_implementation="shifted_matmul")
  out = [
      cases_lib.unet_train_case("train_14x40x64", svd(40, 64, **impl)),
      cases_lib.unet_train_case("train_14x40x64_cudnn",
                                svd(40, 64, **dict(impl, attention_implementation="cudnn"))),
      cases_lib.unet_train_case("train_14x40x64_conv3d",
                                svd(40, 64, **dict(impl, temporal_conv_implementation="conv3d"))),
      cases_lib.unet_train_case("train_14x72x128_cudnn",
                                svd(72, 128, **dict(impl, attention_implementation="cudnn"))),
      cases_lib.unet_train_case("train_14x72x128_cudnn_remat",
                                svd(72, 128, **dict(impl, attention_implementation="cudnn",
                                                    remat_policy="save_conv_and_attention"))),
      cases_lib.unet_sample_case("sample_14x576x1024_25steps", svd(72, 128, **impl), 25),
      cases_lib.unet_sample_case("sample_14x576x1024_25steps_cudnn",
                                 svd(72, 128, **dict(impl, attention_implementation="cudnn")), 25),
  ]
  # Attention at the first level for one 14-frame 72×128 clip: spatial (14 images × 9216 pixels,
  # 5 heads of 64) and temporal (9216 pixels × 14 frames).
  for train in (False, True):
    suffix = "_train" if train else ""
    for implementation in ("xla", "cudnn"):
      out.append(cases_lib.attention_case(
          f"spatial_attention_{implementation}{suffix}", 14, 9216, 5, 64, implementation,
          train=train, where="spatial", **bf16))
      out.append(cases_lib.attention_case(
          f"temporal_attention_{implementation}{suffix}", 9216, 14, 5, 64, implementation,
          train=train, where="temporal", **bf16))
  out += [cases_lib.temporal_conv_case(f"temporal_conv_{variant}", 1, 14, 72, 128, 320, variant,
                                       **bf16)
          for variant in cases_lib.TEMPORAL_CONV_VARIANTS]
  return out


def gpu_video_ldm() -> list:
  from vldm.benchmark import video_stage  # pylint: disable=g-import-not-at-top
  size = video_stage.SIZES["sd15"]
  return [video_stage.case(f"video_stage_{config.name}", size, config)
          for config in video_stage.parse_configs(video_stage.DEFAULT_CONFIGS["sd15"])]


def gpu_svd_i2v() -> list:
  from vldm.benchmark import svd_stage  # pylint: disable=g-import-not-at-top
  size = svd_stage.SIZES["svd"]
  return [svd_stage.case(f"svd_stage_{config.name}", size, config)
          for config in svd_stage.parse_configs(svd_stage.DEFAULT_CONFIGS["svd"])]


def smoke() -> list:
  setup = cases_lib.UNetSetup.make(MICRO_UNET, 2, 2, 8, 8)  # batch 2: splits over 2 devices
  return [cases_lib.unet_train_case("train_step", setup),
          cases_lib.unet_sample_case("sample_euler2_cfg", setup, num_steps=2)]


SUITES: dict[str, Callable[[], list]] = {"cpu_small": cpu_small, "gpu_svd": gpu_svd,
                                          "gpu_svd_i2v": gpu_svd_i2v,
                                          "gpu_video_ldm": gpu_video_ldm, "smoke": smoke}


def get_suite(name: str, select: Optional[str] = None) -> list:
  """The suite's cases, optionally only those whose name matches the regex `select`."""
  if name not in SUITES:
    raise ValueError(f"Unknown suite {name!r}; accepted: {', '.join(SUITES)}.")
  cases = SUITES[name]()
  if select:
    cases = [c for c in cases if re.search(select, c.name)]
    if not cases:
      raise ValueError(f"No case of suite {name!r} matches {select!r}.")
  return cases


# ---------------------------------------------------------------------------------- running


def _base_row(case) -> dict:
  return dict(name=case.name, what=case.what, flops=case.flops, config=case.config)


def dry_run(cases: Sequence) -> list[dict]:
  """Rows with each case's config and analytic FLOPs; nothing is built or run."""
  return [dict(_base_row(case), jax_s=None, reference_s=None, ratio=None) for case in cases]


def _per_second(flops: float, seconds: Optional[float]) -> Optional[float]:
  return None if not seconds else flops / seconds / 1e12


def _device_of(case) -> str:
  config = case.config
  return config.get("device", "cpu")


def _with_threads(fn: Callable, threads: int) -> Callable:
  def call():
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    return fn()
  return call


def _release_memory():
  """Frees what a finished case held (both frameworks share one accelerator)."""
  gc.collect()
  try:
    import torch  # pylint: disable=g-import-not-at-top
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  except ImportError:
    pass


def _mfu(case, tflops_per_s: Optional[float], peak_tflops: Optional[float]) -> Optional[float]:
  """Model FLOPs utilisation of a bf16 GPU case: achieved FLOP/s ÷ the chip's dense bf16 peak."""
  config = case.config
  if (not tflops_per_s or not peak_tflops or config.get("device") != "cuda"
      or config.get("dtype") != "bfloat16"):
    return None
  return tflops_per_s / peak_tflops


def run(cases: Sequence, repeats: int = 5, warmup: int = 1,
        torch_threads: Sequence[int] = (), peak_tflops: Optional[float] = None,
        log: Callable[[str], None] = print) -> list[dict]:
  """Builds and times every case (see the module docstring); a failing case gives an 'error' row.

  `torch_threads`: thread counts to time the reference with (each alternately with the others
  and vldm); the fastest median is `reference_s`, the best the reference does here. Empty: torch's
  default only. `peak_tflops`: the accelerator's dense bf16 peak, for the MFU of bf16 GPU cases
  (None: `measure.peak_bf16_tflops()`).
  """
  if peak_tflops is None and any(c.config.get("device") == "cuda" for c in cases):
    peak_tflops = measure.peak_bf16_tflops()
  rows = []
  runner = references = None
  for case in cases:
    runner = references = None  # the previous case's models and buffers go before the next's
    _release_memory()
    row = _base_row(case)
    log(f"[{case.name}] building: {case.what}")
    try:
      start = time.perf_counter()
      runner = case.build()
      row["build_s"] = time.perf_counter() - start
      references = [runner.reference_fn] if runner.reference_fn is None or not torch_threads \
          else [_with_threads(runner.reference_fn, n) for n in torch_threads]
      row["load_before"] = measure.load_average()
      jax_times, *reference_times = measure.alternate([runner.jax_fn, *references], repeats,
                                                      warmup)
      row["load_after"] = measure.load_average()
    except Exception as e:  # pylint: disable=broad-except
      row.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3),
                 jax_s=None, reference_s=None, ratio=None)
      log(f"[{case.name}] failed: {row['error']}")
      rows.append(row)
      continue
    medians = [measure.median(t) for t in reference_times]
    best = min(range(len(medians)), key=lambda i: (medians[i] is None, medians[i] or 0.0))
    jax_s, reference_s = measure.median(jax_times), medians[best]
    row.update(
        jax_s=jax_s, reference_s=reference_s,
        ratio=None if not reference_s else jax_s / reference_s,
        jax_tflops_per_s=_per_second(case.flops, jax_s),
        reference_tflops_per_s=_per_second(case.flops, reference_s),
        jax_mfu=_mfu(case, _per_second(case.flops, jax_s), peak_tflops),
        reference_mfu=_mfu(case, _per_second(case.flops, reference_s), peak_tflops),
        jax_min_s=min(jax_times),
        reference_min_s=min(reference_times[best]) if reference_times[best] else None,
        compile_s=runner.compile_s, jax_times=jax_times, reference_times=reference_times[best],
        jax_total_bytes=runner.jax_total_bytes, relative_error=runner.relative_error,
        **runner.notes)
    if torch_threads and runner.reference_fn is not None:
      row["reference_threads"] = list(torch_threads)[best]
      row["reference_s_by_threads"] = dict(zip(map(str, torch_threads), medians))
    row["jax_peak_bytes"] = runner.jax_work_bytes
    if runner.reference_fn is not None:
      row["reference_peak_bytes"] = measure.torch_peak_bytes(references[best], _device_of(case))
    ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
    log(f"[{case.name}] jax {jax_s:.4f} s, reference "
        f"{reference_s if reference_s is None else round(reference_s, 4)} s, ratio {ratio}, "
        f"compile {runner.compile_s:.1f} s, load {row['load_after']}"
        + (f", reference by threads {row['reference_s_by_threads']}" if torch_threads else ""))
    rows.append(row)
  return rows


def table(rows: Sequence[dict]) -> str:
  """A Markdown table of the rows (README-ready)."""
  mfu = any(r.get("jax_mfu") is not None for r in rows)
  lines = ["| case | vldm (s) | diffusers (s) | ratio | GFLOPs | vldm TFLOP/s "
           + ("| vldm MFU | diffusers MFU " if mfu else "")
           + "| compile (s) | vldm peak MB | diffusers peak MB | rel. error |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
           + (" ---: | ---: |" if mfu else "")]
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  mb = lambda v: None if v is None else v / 2**20
  for r in rows:
    if r.get("error"):
      lines.append(f"| {r['name']} | error: {r['error'][:60]} | | | {r['flops'] / 1e9:.1f} "
                   "| | | | | |" + (" | |" if mfu else ""))
      continue
    mfu_cells = (f"| {fmt(r.get('jax_mfu'), '.1%')} | {fmt(r.get('reference_mfu'), '.1%')} "
                 if mfu else "")
    lines.append(
        f"| {r['name']} | {fmt(r.get('jax_s'), '.4f')} | {fmt(r.get('reference_s'), '.4f')} "
        f"| {fmt(r.get('ratio'), '.2f')} | {r['flops'] / 1e9:.1f} "
        f"| {fmt(r.get('jax_tflops_per_s'), '.3f')} {mfu_cells}| {fmt(r.get('compile_s'), '.1f')} "
        f"| {fmt(mb(r.get('jax_peak_bytes')), '.0f')} "
        f"| {fmt(mb(r.get('reference_peak_bytes')), '.0f')} "
        f"| {fmt(r.get('relative_error'), '.1e')} |")
  return "\n".join(lines)
