"""One Video LDM `video`-stage training step at Stable Diffusion 1.5 size: time, memory, FLOPs, MFU.

  python -m vldm.benchmark.video_stage --out video_stage.json              # GPU: 4 configurations
  python -m vldm.benchmark.video_stage --configs 4:full:cudnn,8:full:cudnn --out more.json
  python -m vldm.benchmark.video_stage --size tiny --out tiny.json         # CPU, seconds
  python -m vldm.benchmark --suite gpu_video_ldm --out X.json              # via the suite runner

The model: Stable Diffusion 1.5's UNet (UNet2DConditionModel config: channels (320, 640, 1280,
1280), 2 layers per block, 8 heads, cross-attention width 768, 32 groups; `SD15_UNET`, the fields
`vldm.convert.unet` maps that config to) inflated with Video LDM's temporal layers
(`inflate.video_config_from_image`, merge strategy 'learned_with_images'), on 16 frames of 32×32×4
latents (256×256 pixels), bf16 compute, float32 parameters. The step is the trainer's own
(`vldm.train.state.StateBuilder.make_train_step`): the diffusion loss
(`vldm.diffusion.losses.diffusion_loss`, v-prediction, SD's scaled-linear β schedule, uniform t)
of random latents under a precomputed text context [B, 77, 768] (the text encoder is frozen), the
gradient of the temporal parameters only (the spatial ones are frozen: `inflate.label_params`),
global-norm clipping, AdamW and EMA on the temporal parameters, the state donated. Weights are
random (timing does not depend on them) and built on the host, so no init is compiled.

Per configuration (batch, remat policy, attention implementation; `--configs`, each a separately
compiled program, ~1 min of XLA compile each at full size) a row reports: the median step time
over `--steps` timed steps after `--warmup` (each step blocks until its outputs are ready), the
mean of as many steps queued back to back ('queued': dispatch overlaps compute, as in training),
trace and compile time, the compiled program's memory (`compiled.memory_analysis()`:
arguments, outputs, temporaries, aliased), the device allocator's peak
(`memory_stats()['peak_bytes_in_use']`: the process's peak so far, so a row reports it only where
it rose), the step's model FLOPs
(`flops.unet_training_flops(..., trainable='temporal')`: forward + dx through every layer after
the first temporal one + dW of the temporal layers; no recomputation, so remat does not change
it), TFLOP/s and MFU against the chip's dense bf16 peak (`measure.BF16_PEAK_TFLOPS`, 989 for an
H200). XLA's own count (`cost_analysis`, recomputation and elementwise work included, cuDNN
attention not) is kept as `xla_flops`. `--time_budget_s` stops starting new configurations when
the last one would not fit in the budget, so a run ends in bounded time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import traceback
import types
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vldm.benchmark import flops as flops_lib
from vldm.benchmark import measure
from vldm.diffusion import losses
from vldm.diffusion.schedules import DiscreteSchedule
from vldm.models import inflate
from vldm.models import layers
from vldm.models import presets
from vldm.models import unet as unet_lib
from vldm.train import sharding as sharding_lib
from vldm.train import state as state_lib
from vldm.train import tasks as tasks_lib

SD15_UNET = presets.SD15_UNET  # SD 1.5's unet/config.json as vldm fields
# A toy UNet for CPU tests: one level of SD's blocks (cross-attention down and up blocks, the
# mid block), so that XLA:CPU compiles its training step in seconds.
TINY_UNET = dict(
    block_out_channels=(32,),
    layers_per_block=1,
    num_attention_heads=2,
    cross_attention_dim=16,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    sample_size=8,
)
SD_SCHEDULE = presets.SD_SCHEDULE


@dataclasses.dataclass(frozen=True)
class Size:
  """The model and clip: UNet fields, frames, latent height = width, context length, dtype, and
  XLA compiler options (the toy size compiles without LLVM optimisation: a smoke test)."""

  name: str
  unet: tuple  # sorted (field, value) pairs of the image UNet
  frames: int
  latent: int
  context_length: int
  dtype: str
  compiler_options: tuple = ()

  def image_unet(self) -> unet_lib.UNet:
    return unet_lib.UNet(**dict(self.unet))


def _size(name, unet, **kwargs) -> Size:
  return Size(name, tuple(sorted(unet.items())), **kwargs)


SIZES = {
    "sd15": _size("sd15", SD15_UNET, frames=16, latent=32, context_length=77, dtype="bfloat16"),
    "tiny": _size(
        "tiny",
        TINY_UNET,
        frames=2,
        latent=8,
        context_length=8,
        dtype="float32",
        compiler_options=(
            ("xla_backend_optimization_level", 0),
            ("xla_llvm_disable_expensive_passes", True),
        ),
    ),
}
# Default configurations (batch:remat_policy:attention), most informative first, as a time budget
# may cut the list short. Full size: batch 1 without remat (its saved activations: 24 GiB by
# jax's residual count), batch 2 (~2 × that: the largest power of 2 that fits an H200 without
# remat), batch 8 recomputing every block ('full' = nothing_saveable; ~0.5 GiB of residuals per
# clip), then XLA's attention against cuDNN's at batch 1. The XLA row comes last: if cuDNN
# attention is unavailable, its rows fail at lowering, in seconds, and the XLA row still runs.
DEFAULT_CONFIGS = {
    "sd15": "1:none:cudnn,2:none:cudnn,8:full:cudnn,1:none:xla",
    "tiny": "1:none:xla",
}
# The step's optimizer and EMA: configs/common.py's defaults (warm-up, cosine decay, global-norm
# clipping, EMA), with AdamW's weight decay on (0.01; common.py: 0).
OPTIM = dict(
    lr=1e-4,
    warmup_steps=500,
    decay="cosine",
    end_lr_factor=0.0,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=1e-2,
    grad_clip=1.0,
)
EMA_DECAY = 0.9999


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """One compiled program: per-device batch, remat policy (`unet_blocks.REMAT_POLICIES`) and
  attention implementation ('xla', 'cudnn' or None: JAX's choice)."""

  batch: int
  remat_policy: str = "none"
  attention: Optional[str] = "xla"

  @property
  def name(self) -> str:
    return f"b{self.batch}_{self.remat_policy}_{self.attention or 'default'}"

  @classmethod
  def parse(cls, spec: str) -> "StepConfig":
    """'batch:remat_policy:attention', e.g. '8:full:cudnn' (attention 'default': JAX's choice)."""
    parts = spec.strip().split(":")
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1:
      raise ValueError(
          f"A configuration is 'batch:remat_policy:attention' (e.g. '2:none:cudnn'), "
          f"got {spec!r}."
      )
    attention = None if parts[2] in ("default", "none", "") else parts[2]
    if attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"Unknown attention implementation {attention!r} in {spec!r}; accepted: "
          f"xla, cudnn, default."
      )
    config = cls(int(parts[0]), parts[1], attention)
    config.video_unet(SIZES["tiny"])  # checks the remat policy
    return config

  def video_unet(self, size: Size) -> unet_lib.UNet:
    """The inflated video UNet of this size with this configuration's options."""
    return inflate.video_config_from_image(
        size.image_unet(),
        merge_strategy="learned_with_images",
        num_frames=size.frames,
        dtype=jnp.dtype(size.dtype),
        param_dtype=jnp.float32,
        remat_policy=self.remat_policy,
        attention_implementation=self.attention,
    )


def parse_configs(specs: str) -> list[StepConfig]:
  return [StepConfig.parse(s) for s in specs.split(",") if s.strip()]


# ------------------------------------------------------------------------------------ the step


class VideoStageTask(tasks_lib.Task):
  """The video stage without data: the batch holds clean latents and the text context.

  Parameters are the video UNet's; the spatial ones are frozen (`trainable_labels`), as in
  `vldm.recipes.ldm` with `train='temporal'`. `init_params` returns zeros of the known shapes:
  the builder only traces it (`jax.eval_shape`); real weights come from `host_params`.
  """

  def __init__(
      self, config, unet: unet_lib.UNet, abstract_params, prediction_type: str = "v_prediction"
  ):
    super().__init__(config)
    self.unet, self.abstract_params = unet, abstract_params
    self.prediction_type = prediction_type
    self.schedule = DiscreteSchedule(**SD_SCHEDULE)

  def init_params(self, rng):
    del rng
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.abstract_params)

  def trainable_labels(self, params):
    return jax.tree.map(
        lambda label: tasks_lib.TRAIN if label == inflate.TEMPORAL else tasks_lib.FREEZE,
        inflate.label_params(params),
    )

  def loss_fn(self, params, frozen, batch, rng):
    del frozen
    network = lambda x, t: self.unet.apply({"params": params}, x, t, batch["context"])
    loss, aux = losses.diffusion_loss(
        network,
        batch["latents"],
        rng,
        parameterization=self.prediction_type,
        schedule=self.schedule,
    )
    return jnp.mean(loss), dict(mse=jnp.mean(aux["mse"]))


class _Config(types.SimpleNamespace):
  """What `StateBuilder` uses of an ml_collections ConfigDict (not installed everywhere this
  benchmark runs): attributes and `get`."""

  def get(self, key, default=None):
    return getattr(self, key, default)


def train_config(ema_decay: float = EMA_DECAY) -> _Config:
  """The keys `StateBuilder` reads, as configs/common.py sets them (one device, no FSDP)."""
  return _Config(
      optim=_Config(**OPTIM),
      total_steps=1000,
      ema_decay=ema_decay,
      sharding=_Config(params=((".*", "fsdp"),), activations=(("batch", ("data", "fsdp")),)),
  )


def abstract_params(size: Size):
  """The video UNet's parameter shapes (the same for every configuration of a size)."""
  unet = StepConfig(1).video_unet(size)
  inputs = unet.example_inputs(batch=1, frames=2)
  return jax.eval_shape(lambda: unet.init(jax.random.key(0), *inputs))["params"]


def host_params(abstract, seed: int = 0, put: Optional[Callable] = None):
  """Random weights of these shapes, drawn on the host in seconds at full size: kernels
  ~ N(0, 1/fan_in) (windows of one pool of normals, scaled once per fan-in: no copy per leaf),
  norm scales 1, α blenders 0.5, the rest 0. `put(value, path)` moves each leaf (e.g. to its
  device) as it is made (None: numpy leaves)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  largest = max(math.prod(leaf.shape) for leaf in flat.values())
  pool = rng.standard_normal(max(1 << 16, 1 << (largest - 1).bit_length()), dtype=np.float32)
  scaled = {}
  out = {}
  for path, leaf in flat.items():
    shape, name = tuple(leaf.shape), path[-1]
    size = math.prod(shape)
    if name == "kernel":
      fan_in = max(size // shape[-1], 1)
      if fan_in not in scaled:
        scaled[fan_in] = pool * np.float32(1.0 / math.sqrt(fan_in))
      start = int(rng.integers(pool.size - size + 1))
      value = scaled[fan_in][start : start + size].reshape(shape)
    elif name == "scale":
      value = np.ones(shape, np.float32)
    elif name == "mix_factor":
      value = np.full(shape, 0.5, np.float32)
    else:
      value = np.zeros(shape, np.float32)
    value = value.astype(leaf.dtype, copy=False)
    out[path] = value if put is None else put(value, path)
  return traverse_util.unflatten_dict(out)


def count_params(abstract) -> dict:
  spatial, temporal = inflate.split_params(abstract)
  count = lambda tree: int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
  return dict(params=count(spatial) + count(temporal), temporal_params=count(temporal))


def step_flops(size: Size, config: StepConfig) -> dict:
  """Analytic FLOPs of one step: forward, the step (frozen spatial layers) and 3 × forward."""
  unet = config.video_unet(size)
  kw = dict(batch=config.batch, frames=size.frames, context_length=size.context_length)
  forward = flops_lib.unet_flops(unet, size.latent, size.latent, **kw)
  step = flops_lib.unet_training_flops(unet, size.latent, size.latent, trainable="temporal", **kw)
  return dict(
      forward_flops=forward.total,
      flops=step.total,
      all_trainable_flops=flops_lib.training_flops(forward).total,
  )


# ---------------------------------------------------------------------------------- measuring


def _device_memory() -> Optional[dict]:
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # not every backend has them
    return None
  return dict(stats) if stats else None


def _program_memory(compiled) -> dict:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is None:
    return {}
  out = {
      f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
      for k in ("argument", "output", "temp", "alias", "generated_code")
  }
  out["program_total_bytes"] = (
      out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  )
  # What the step needs on top of its (donated, aliased) state and inputs.
  out["program_work_bytes"] = out["temp_bytes"] + out["output_bytes"] - out["alias_bytes"]
  return out


def _xla_flops(compiled) -> Optional[float]:
  try:
    return flops_lib.compiled_flops(None, compiled=compiled)
  except Exception:  # pylint: disable=broad-except
    return None


def peak_tflops_of_device() -> Optional[float]:
  """The dense bf16 peak of jax's first device (by its name), None on CPU or an unknown chip."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return None
  return measure.peak_bf16_tflops(device.device_kind)


class Bench:
  """Builds the state once per size and threads it through every configuration's program (the
  state's shapes and shardings do not depend on batch, remat or attention)."""

  def __init__(
      self,
      size: Size,
      *,
      seed: int = 0,
      ema_decay: float = EMA_DECAY,
      prediction_type: str = "v_prediction",
  ):
    self.size, self.seed = size, seed
    self.prediction_type = prediction_type
    self.config = train_config(ema_decay)
    self.mesh = sharding_lib.make_mesh((("data", 1), ("fsdp", 1)), jax.devices()[:1])
    start = time.perf_counter()
    self.abstract = abstract_params(size)
    self.param_counts = count_params(self.abstract)
    self.state = None
    self.setup_s = {"abstract_params_s": time.perf_counter() - start}

  def builder(self, config: StepConfig) -> state_lib.StateBuilder:
    task = VideoStageTask(
        self.config, config.video_unet(self.size), self.abstract, self.prediction_type
    )
    return state_lib.StateBuilder(task, self.config, self.mesh)

  def _fresh_state(self, builder: state_lib.StateBuilder):
    start = time.perf_counter()
    shardings = traverse_util.flatten_dict(builder.param_shardings)
    params = host_params(
        self.abstract, self.seed, put=lambda value, path: jax.device_put(value, shardings[path])
    )
    self.setup_s["host_params_s"] = time.perf_counter() - start
    start = time.perf_counter()
    self.state = jax.block_until_ready(builder.init_state(params, self.seed))
    self.setup_s["init_state_s"] = time.perf_counter() - start

  def batch(self, batch_size: int) -> dict:
    """Random clean latents [B, F, h, w, 4] and text context [B, L, D], float32, on the device."""
    size, unet = self.size, self.size.image_unet()
    rng = np.random.default_rng(self.seed + batch_size)
    latents = rng.standard_normal(
        (batch_size, size.frames, size.latent, size.latent, unet.out_channels), dtype=np.float32
    )
    context = rng.standard_normal(
        (batch_size, size.context_length, unet.context_dim), dtype=np.float32
    )
    sharding = sharding_lib.batch_sharding(self.mesh)
    return jax.device_put(dict(latents=latents, context=context), sharding)

  def compile(self, config: StepConfig):
    """(compiled step, its batch, {trace_s, compile_s}); builds the state when there is none
    (or a failed step consumed it)."""
    builder = self.builder(config)
    if self.state is None or any(x.is_deleted() for x in jax.tree.leaves(self.state)):
      self._fresh_state(builder)
    batch = self.batch(config.batch)
    batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
    step = builder.make_train_step({}, batch_shardings)
    start = time.perf_counter()
    lowered = step.lower(self.state, {}, batch)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(dict(self.size.compiler_options) or None)
    return compiled, batch, dict(trace_s=trace_s, compile_s=time.perf_counter() - start)

  def step_fn(self, compiled, batch, block: bool = True) -> Callable[[], dict]:
    """A zero-argument step: runs one update on the held state and returns the metrics; `block`:
    after waiting for its outputs (one program's outputs are ready together: waiting for the
    metrics and the step counter spares a wait on each of the state's thousands of leaves)."""

    def run():
      self.state, metrics = compiled(self.state, {}, batch)
      if block:
        jax.block_until_ready((metrics, self.state.step))
      return metrics

    return run


def measure_config(
    bench: Bench,
    config: StepConfig,
    *,
    steps: int = 10,
    warmup: int = 2,
    peak_tflops: Optional[float] = None,
) -> dict:
  """One configuration's row (see the module docstring). Raises on failure, the row so far in the
  exception's `row` attribute."""
  row = {}
  try:
    _measure_config(bench, config, row, steps, warmup, peak_tflops)
  except Exception as e:  # pylint: disable=broad-except
    e.row = row
    raise
  return row


def _measure_config(
    bench: Bench,
    config: StepConfig,
    row: dict,
    steps: int,
    warmup: int,
    peak_tflops: Optional[float],
) -> None:
  size = bench.size
  row.update(
      name=config.name,
      size=size.name,
      batch=config.batch,
      frames=size.frames,
      latent=[size.latent, size.latent],
      context_length=size.context_length,
      dtype=size.dtype,
      param_dtype="float32",
      remat_policy=config.remat_policy,
      attention=config.attention or "default",
      **bench.param_counts,
  )
  row.update(step_flops(size, config))
  compiled, batch, times = bench.compile(config)
  row.update(times, **_program_memory(compiled), xla_flops=_xla_flops(compiled))
  before = _device_memory()
  if before and "bytes_limit" in before and row.get("program_work_bytes") is not None:
    free = before["bytes_limit"] - before["bytes_in_use"]
    if row["program_work_bytes"] > free:  # it would fail and take the donated state with it
      raise MemoryError(
          f"needs {row['program_work_bytes'] / 2**30:.1f} GiB beyond its state and "
          f"inputs; {free / 2**30:.1f} GiB free"
      )
  timing, _ = time_steps(
      bench,
      compiled,
      batch,
      row["flops"],
      config.batch,
      steps=steps,
      warmup=warmup,
      peak_tflops=peak_tflops,
  )
  row.update(
      timing,
      xla_tflops_per_s=(row["xla_flops"] / timing["step_s"] / 1e12 if row["xla_flops"] else None),
  )
  after = _device_memory()
  if after:
    row.update(
        device_bytes_in_use_before=before.get("bytes_in_use"),
        device_bytes_limit=after.get("bytes_limit"),
        device_peak_bytes_so_far=after.get("peak_bytes_in_use"),
    )
    # The allocator's peak is the process's: it is this step's only where it rose here.
    rose = after.get("peak_bytes_in_use", 0) > before.get("peak_bytes_in_use", 0)
    row["device_peak_bytes"] = after.get("peak_bytes_in_use") if rose else None


def time_steps(
    bench,
    compiled,
    batch,
    flops: float,
    batch_size: int,
    *,
    steps: int,
    warmup: int,
    peak_tflops: Optional[float],
) -> tuple[dict, dict]:
  """Times a compiled step (`bench.step_fn`): the median of `steps` blocking steps after `warmup`,
  then as many queued back to back, as a training loop runs them (dispatch overlaps compute).
  Returns (the row's timing, throughput, MFU and loss fields, the last timed step's metrics)."""
  step = bench.step_fn(compiled, batch)
  first = step()
  for _ in range(max(warmup - 1, 0)):
    step()
  step_times, last = [], first
  for _ in range(steps):
    start = time.perf_counter()
    last = step()
    step_times.append(time.perf_counter() - start)
  step_s = statistics.median(step_times)
  queued = bench.step_fn(compiled, batch, block=False)
  start = time.perf_counter()
  for _ in range(steps):
    metrics = queued()
  jax.block_until_ready((metrics, bench.state.step))
  pipelined_s = (time.perf_counter() - start) / steps
  mfu = lambda seconds: flops / seconds / 1e12 / peak_tflops if peak_tflops else None
  return (
      dict(
          step_s=step_s,
          step_min_s=min(step_times),
          step_times=step_times,
          steps=steps,
          warmup=warmup,
          clips_per_s=batch_size / step_s,
          tflops_per_s=flops / step_s / 1e12,
          mfu=mfu(step_s),
          peak_tflops=peak_tflops,
          pipelined_step_s=pipelined_s,
          pipelined_mfu=mfu(pipelined_s),
          first_loss=float(first["loss"]),
          last_loss=float(last["loss"]),
          grad_norm=float(last["grad_norm"]),
          final_loss=float(metrics["loss"]),
      ),
      last,
  )


def run(
    size: Size,
    configs: Sequence[StepConfig],
    *,
    steps: int = 10,
    warmup: int = 2,
    seed: int = 0,
    ema_decay: float = EMA_DECAY,
    prediction_type: str = "v_prediction",
    peak_tflops: Optional[float] = None,
    time_budget_s: Optional[float] = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
  """Measures each configuration in turn (a failure gives an 'error' row and the next goes on).

  `time_budget_s`: no configuration starts once the time spent plus the slowest one so far would
  exceed it (skipped rows say so). `peak_tflops`: for MFU (None: looked up from the GPU's name).
  """
  start = time.perf_counter()
  if peak_tflops is None:
    peak_tflops = peak_tflops_of_device()
  bench = Bench(size, seed=seed, ema_decay=ema_decay, prediction_type=prediction_type)
  log(
      f"{size.name}: {bench.param_counts['params'] / 1e6:.1f} M parameters, "
      f"{bench.param_counts['temporal_params'] / 1e6:.1f} M temporal (trained); "
      f"{size.frames} frames × {size.latent}×{size.latent} latents, {size.dtype}"
  )
  rows, slowest = [], 0.0
  for config in configs:
    elapsed = time.perf_counter() - start
    if rows and time_budget_s and elapsed + slowest > time_budget_s:
      log(
          f"[{config.name}] skipped: {elapsed:.0f} s spent, the slowest configuration took "
          f"{slowest:.0f} s, budget {time_budget_s:.0f} s"
      )
      rows.append(
          dict(
              name=config.name,
              batch=config.batch,
              remat_policy=config.remat_policy,
              attention=config.attention or "default",
              error=f"skipped: time budget ({time_budget_s:.0f} s)",
          )
      )
      continue
    log(f"[{config.name}] compiling ...")
    config_start = time.perf_counter()
    try:
      row = measure_config(bench, config, steps=steps, warmup=warmup, peak_tflops=peak_tflops)
    except Exception as e:  # pylint: disable=broad-except
      row = dict(
          getattr(e, "row", None) or {},
          name=config.name,
          batch=config.batch,
          remat_policy=config.remat_policy,
          attention=config.attention or "default",
          error=f"{type(e).__name__}: {e}"[:2000],
          traceback=traceback.format_exc(limit=4),
      )
      log(f"[{config.name}] failed: {row['error'][:300]}")
    else:
      mfu = f", MFU {row['mfu']:.1%}" if row.get("mfu") else ""
      log(
          f"[{config.name}] step {row['step_s'] * 1e3:.1f} ms, {row['tflops_per_s']:.1f} TFLOP/s"
          f"{mfu}, trace {row['trace_s']:.1f} s, compile {row['compile_s']:.1f} s, loss "
          f"{row['last_loss']:.4f}"
      )
    row["wall_s"] = time.perf_counter() - config_start
    slowest = max(slowest, row["wall_s"])
    rows.append(row)
  if rows:
    rows[0]["setup_s"] = bench.setup_s
  return rows


def table(rows: Sequence[dict]) -> str:
  """A Markdown table of the rows."""
  gib = lambda v: "-" if v is None else f"{v / 2**30:.1f}"
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = [
      "| config | batch | remat | attention | step (ms) | queued (ms) | clips/s | TFLOP/step "
      "| TFLOP/s | MFU | compile (s) | args GiB | temp GiB | device peak GiB | loss |",
      "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: | ---: | ---: |",
  ]
  for r in rows:
    if r.get("error"):
      lines.append(
          f"| {r['name']} | {r['batch']} | {r['remat_policy']} | {r['attention']} | "
          f"error: {' '.join(r['error'].replace('|', '/').split())[:100]} "
          "| | | | | | | | | | |"
      )
      continue
    lines.append(
        f"| {r['name']} | {r['batch']} | {r['remat_policy']} | {r['attention']} "
        f"| {r['step_s'] * 1e3:.1f} | {r['pipelined_step_s'] * 1e3:.1f} | {r['clips_per_s']:.2f} "
        f"| {r['flops'] / 1e12:.3g} "
        f"| {r['tflops_per_s']:.1f} | {fmt(r.get('mfu'), '.1%')} | {r['compile_s']:.1f} "
        f"| {gib(r.get('argument_bytes'))} | {gib(r.get('temp_bytes'))} "
        f"| {gib(r.get('device_peak_bytes'))} | {r['last_loss']:.4f} |"
    )
  return "\n".join(lines)


def flops_note(size: Size) -> str:
  """The FLOP convention, with this size's numbers at batch 1."""
  f = step_flops(size, StepConfig(1))
  return (
      f"FLOPs per step (batch 1): forward {f['forward_flops'] / 1e12:.4g} T; step "
      f"{f['flops'] / 1e12:.4g} T = forward + dx of every layer after the first temporal one "
      f"+ dW of the temporal layers ({f['flops'] / f['forward_flops']:.2f} × forward; all "
      f"layers trained would be 3 × = {f['all_trainable_flops'] / 1e12:.4g} T). Model FLOPs: "
      f"remat's recomputation is not counted. MFU = TFLOP/s ÷ the dense bf16 peak."
  )


# ------------------------------------------------------------------------------ suite cases


def case(name: str, size: Size, config: StepConfig):
  """A `cases.Case` of one configuration for the suite runner (no reference: its columns stay
  empty). Each case builds its own state."""
  from vldm.benchmark import cases as cases_lib  # pylint: disable=g-import-not-at-top

  counts = step_flops(size, config)
  device = "cuda" if size.dtype == "bfloat16" else "cpu"
  what = (
      f"Video LDM video-stage training step ({size.name} UNet inflated, spatial layers "
      f"frozen): batch {config.batch} × {size.frames} frames × {size.latent}×{size.latent} "
      f"latents, {size.dtype} compute, float32 parameters, remat {config.remat_policy}, "
      f"attention {config.attention or 'default'}; forward, v-prediction loss, temporal "
      f"gradients, clipping, AdamW, EMA"
  )
  described = dict(
      kind="video_stage_train",
      device=device,
      dtype=size.dtype,
      size=size.name,
      batch=config.batch,
      frames=size.frames,
      latent=[size.latent, size.latent],
      remat_policy=config.remat_policy,
      attention=config.attention or "default",
      **counts,
  )

  def build():
    bench = Bench(size)
    compiled, batch, times = bench.compile(config)
    memory = _program_memory(compiled)
    step = bench.step_fn(compiled, batch)
    notes = dict(
        trace_s=times["trace_s"], **memory, **bench.param_counts, xla_flops=_xla_flops(compiled)
    )
    return cases_lib.Runner(
        lambda: step()["loss"],
        None,
        times["compile_s"],
        memory.get("program_work_bytes"),
        memory.get("program_total_bytes"),
        None,
        notes,
        compiled,
    )

  return cases_lib.Case(name, what, counts["flops"], described, build)


# --------------------------------------------------------------------------------------- main


def define_flags():
  """The command line's flags (defined only when run as a program: `vldm.benchmark`'s own
  entry point defines some of the same names)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum(
      "size",
      "sd15",
      list(SIZES),
      "sd15: SD 1.5's UNet inflated, 16 frames × "
      "32×32 latents, bf16; tiny: a toy UNet, 2 frames × 8×8, float32.",
  )
  flags.DEFINE_string(
      "configs",
      None,
      "Comma-separated batch:remat_policy:attention (remat: none, full, "
      "dots_saveable, dots_with_no_batch_dims_saveable, save_conv_and_attention; attention: xla, "
      "cudnn, default). Default: " + "; ".join(f"{k}: {v}" for k, v in DEFAULT_CONFIGS.items()),
  )
  flags.DEFINE_string("out", None, "Where to write the JSON results.")
  flags.DEFINE_integer("steps", 10, "Timed steps per configuration (median).")
  flags.DEFINE_integer("warmup", 2, "Untimed steps first (the first one included).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
  flags.DEFINE_float("ema_decay", EMA_DECAY, "EMA of the trained parameters; 0: none.")
  flags.DEFINE_enum(
      "prediction_type", "v_prediction", ["v_prediction", "epsilon"], "The loss's target."
  )
  flags.DEFINE_float(
      "peak_tflops",
      None,
      "Dense bf16 peak for MFU (default: by the GPU's name, 989 for an H200).",
  )
  flags.DEFINE_float(
      "time_budget_s",
      200.0,
      "Start no configuration that would end after this many seconds (judged by the slowest so far); 0: no limit.",
  )
  flags.DEFINE_string(
      "cache_dir",
      None,
      "A persistent XLA compilation cache directory (a rerun skips the compiles).",
  )


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not f.out:
    raise app.UsageError("--out FILE.json is required.")
  size = SIZES[f.size]
  try:
    configs = parse_configs(f.configs or DEFAULT_CONFIGS[size.name])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if f.steps < 1 or f.warmup < 1:
    raise app.UsageError("--steps and --warmup must be ≥ 1.")
  if f.cache_dir:
    jax.config.update("jax_compilation_cache_dir", f.cache_dir)
  rows = run(
      size,
      configs,
      steps=f.steps,
      warmup=f.warmup,
      seed=f.seed,
      ema_decay=f.ema_decay,
      prediction_type=f.prediction_type,
      peak_tflops=f.peak_tflops,
      time_budget_s=f.time_budget_s or None,
  )
  result = dict(
      benchmark="video_stage",
      size=size.name,
      unet=dict(size.unet),
      frames=size.frames,
      latent=size.latent,
      context_length=size.context_length,
      dtype=size.dtype,
      configs=[c.name for c in configs],
      steps=f.steps,
      warmup=f.warmup,
      optimizer=OPTIM,
      ema_decay=f.ema_decay,
      prediction_type=f.prediction_type,
      flops_note=flops_note(size),
      rows=rows,
      table=table(rows),
      machine=measure.machine_info(),
      load_average=measure.load_average(),
  )
  os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
  with open(f.out, "w") as out:
    json.dump(result, out, indent=1, default=str)
  print(result["table"])
  print(result["flops_note"])
  print(f"wrote {f.out}")


if __name__ == "__main__":
  # Before jax starts its backends: let one program use most of the GPU (the default takes 75 %).
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  from absl import app  # pylint: disable=g-import-not-at-top

  define_flags()
  app.run(main)
