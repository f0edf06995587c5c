"""One SVD image-to-video training step at 14 frames × 576×1024: time, memory, FLOPs, MFU.

  python -m vldm.benchmark.svd_stage --out svd_stage.json              # GPU: the default rows
  python -m vldm.benchmark.svd_stage --configs 1:full:xla --out one.json
  python -m vldm.benchmark.svd_stage --size tiny --out tiny.json       # CPU, seconds
  python -m vldm.benchmark --suite gpu_svd_i2v --out X.json            # via the suite runner

The model (`SIZES['svd']`): SVD's UNetSpatioTemporalConditionModel (`SVD_UNET`: the vldm `UNet`
fields `vldm.convert.unet` maps that config to; 1.52 B parameters, all trained, as SVD fine-tunes
the whole UNet), SVD's VAE encoder (`AutoencoderKLTemporalDecoder`, SD's KL encoder, 34 M) and
CLIP ViT-H/14 image encoder (`CLIPVisionModelWithProjection`, 632 M), the encoders frozen with
bf16 weights. The step is the trainer's (`vldm.train.state.StateBuilder.make_train_step`: AdamW,
global-norm clipping, EMA, float32 parameters, the state donated) around `SvdStageTask.loss_fn`,
which does in one program what SVD's training does per clip of 14 frames at 576×1024 pixels:
the VAE encodes the 14 frames (posterior sample × 0.18215: the diffusion target) and the first
frame plus conditioning noise σ_aug · n, log σ_aug ~ N(−3, 0.5²) (the posterior's mode, unscaled:
concatenated to every frame's noisy latent, 8 UNet input channels); CLIP embeds the clean first
frame (`clip.preprocess_for_clip`, as the pipeline) as the context [B, 1, 1024]; the added time
ids are [fps − 1, motion bucket, σ_aug]; the loss is `losses.diffusion_loss` with 'v_edm'
(EDM preconditioning, v-target), lognormal σ (P_mean 0.7, P_std 1.6) and EDM weighting. The
encoders run under stop_gradient in bf16 compute; the UNet's row options (remat, attention)
apply to the UNet only (the encoders use JAX's default attention). Weights are random (timing does
not depend on them) and built on the host, so no init is compiled; the batch is random pixels.

Rows, measurements and the time budget are `vldm.benchmark.video_stage`'s (batch:remat:attention
per compiled program; median and queued step time, compile time, `memory_analysis()`, the
allocator's peak, XLA's cost-analysis FLOPs), plus the step's model FLOPs by part (`step_flops`:
the UNet's forward + backward of every weight, `flops.unet_training_flops(trainable='all')`, and
the frozen encoders' forwards, no remat recomputation) and what one device holds: the training
state (float32 parameters, AdamW moments, EMA), the frozen weights, whether the per-device peak
fits an 80 GiB GPU, and an FSDP-over-8 estimate (state and gradients ÷ 8). The JSON is rewritten
after each row, so a run cut short keeps the rows it finished.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import traceback
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vldm.benchmark import flops as flops_lib
from vldm.benchmark import measure
from vldm.benchmark import video_stage
from vldm.diffusion import losses
from vldm.models import autoencoder as autoencoder_lib
from vldm.models import clip as clip_lib
from vldm.models import layers
from vldm.models import presets
from vldm.models import unet as unet_lib
from vldm.models import unet_blocks
from vldm.train import sharding as sharding_lib
from vldm.train import state as state_lib
from vldm.train import tasks as tasks_lib

# SVD's unet/, vae/ (AutoencoderKLTemporalDecoder fields) and image_encoder/ configs.
SVD_UNET = presets.SVD_UNET
SVD_VAE = {k: v for k, v in presets.SVD_VAE.items() if k != "kind"}
SVD_CLIP = presets.SVD_IMAGE
# Toys for CPU tests: one UNet level of SVD's cross-attention blocks, a 2-level encoder, a 2-layer
# CLIP, so that XLA:CPU compiles the whole step in seconds.
TINY_UNET = dict(
    temporal=True,
    in_channels=8,
    out_channels=4,
    block_out_channels=(32,),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlockSpatioTemporal",),
    mid_block_type="UNetMidBlockSpatioTemporal",
    up_block_types=("CrossAttnUpBlockSpatioTemporal",),
    num_attention_heads=2,
    cross_attention_dim=16,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,
    use_linear_projection=True,
    norm_num_groups=8,
    eps_convention="svd",
    num_frames=2,
)
TINY_VAE = dict(
    block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, scaling_factor=0.18215
)
TINY_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    projection_dim=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    patch_size=4,
    image_size=16,
    hidden_act="gelu",
)

# SVD's training noise: EDM lognormal σ for the diffusion loss, log σ_aug ~ N(−3, 0.5²) for the
# conditioning frame (Blattmann et al. 2023; sgm's svd configs).
LOSS = dict(
    parameterization="v_edm", noise_sampling="lognormal", p_mean=0.7, p_std=1.6, weighting="edm"
)
COND_AUG_LOG_MEAN, COND_AUG_LOG_STD = -3.0, 0.5
# An 80 GB GPU (A100 / H100 80GB), for the `fits_80gb` column.
FIT_LIMIT_BYTES = 80 * 2**30
FSDP_DEVICES = 8


@dataclasses.dataclass(frozen=True)
class Size:
  """The models and clip: UNet, VAE and CLIP fields, frames, pixel height and width, compute dtype
  (also the frozen weights' dtype), and XLA compiler options (toy: no LLVM optimisation)."""

  name: str
  unet: tuple  # sorted (field, value) pairs
  vae: tuple
  clip: tuple
  frames: int
  height: int
  width: int
  dtype: str
  compiler_options: tuple = ()

  def vae_module(self) -> autoencoder_lib.AutoencoderKLTemporalDecoder:
    return autoencoder_lib.AutoencoderKLTemporalDecoder(
        **dict(self.vae), dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.dtype)
    )

  def clip_module(self) -> clip_lib.CLIPVisionModelWithProjection:
    return clip_lib.CLIPVisionModelWithProjection(
        **dict(self.clip), dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.dtype)
    )

  @property
  def latent_factor(self) -> int:
    return 2 ** (len(dict(self.vae)["block_out_channels"]) - 1)

  @property
  def latent(self) -> tuple[int, int]:
    return self.height // self.latent_factor, self.width // self.latent_factor


def _size(name, unet, vae, clip, **kwargs) -> Size:
  items = lambda d: tuple(sorted(d.items()))
  return Size(name, items(unet), items(vae), items(clip), **kwargs)


SIZES = {
    "svd": _size(
        "svd", SVD_UNET, SVD_VAE, SVD_CLIP, frames=14, height=576, width=1024, dtype="bfloat16"
    ),
    "tiny": _size(
        "tiny",
        TINY_UNET,
        TINY_VAE,
        TINY_CLIP,
        frames=2,
        height=16,
        width=16,
        dtype="float32",
        compiler_options=(
            ("xla_backend_optimization_level", 0),
            ("xla_llvm_disable_expensive_passes", True),
        ),
    ),
}
# Default rows (batch:remat_policy:attention), most informative first: a time budget cuts the list
# short. XLA's attention materialises each level-0 spatial attention's float32 scores (14 frames ×
# 5 heads × 9216² = 24 GiB at batch 1), so no row goes without remat: 'full' recomputes every
# block (least memory), 'save_conv_and_attention' keeps conv and attention outputs (less
# recomputation). cuDNN's fused attention would not materialise them; its row comes first because
# where it is unsupported (cross-attention to 1 token) it fails at lowering, in seconds.
DEFAULT_CONFIGS = {
    "svd": "1:full:cudnn,1:full:xla,1:save_conv_and_attention:xla,2:full:xla",
    "tiny": "1:none:xla",
}
DEFAULT_STEPS, DEFAULT_WARMUP, DEFAULT_TIME_BUDGET_S = 5, 2, 420.0


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """One compiled program: per-device batch, the UNet's remat policy (`unet_blocks.REMAT_POLICIES`)
  and attention implementation ('xla', 'cudnn' or None: JAX's choice)."""

  batch: int
  remat_policy: str = "full"
  attention: Optional[str] = "xla"

  @property
  def name(self) -> str:
    return f"b{self.batch}_{self.remat_policy}_{self.attention or 'default'}"

  @classmethod
  def parse(cls, spec: str) -> "StepConfig":
    """'batch:remat_policy:attention', e.g. '1:full:xla' (attention 'default': JAX's choice)."""
    parts = spec.strip().split(":")
    if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1:
      raise ValueError(
          f"A configuration is 'batch:remat_policy:attention' (e.g. '1:full:xla'), "
          f"got {spec!r}."
      )
    attention = None if parts[2] in ("default", "none", "") else parts[2]
    if attention not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"Unknown attention implementation {attention!r} in {spec!r}; accepted: "
          f"xla, cudnn, default."
      )
    unet_blocks.check_remat_policy(parts[1])
    return cls(int(parts[0]), parts[1], attention)

  def unet(self, size: Size) -> unet_lib.UNet:
    return unet_lib.UNet(
        **dict(size.unet),
        dtype=jnp.dtype(size.dtype),
        param_dtype=jnp.float32,
        remat_policy=self.remat_policy,
        attention_implementation=self.attention,
    )


def parse_configs(specs: str) -> list[StepConfig]:
  return [StepConfig.parse(s) for s in specs.split(",") if s.strip()]


# ------------------------------------------------------------------------------------ the step


def conditioning(size: Size, frozen, batch, rng) -> dict:
  """What SVD's training derives from a clip with the frozen encoders (see the module docstring):
  latents [B,F,h,w,4] (float32), image_latents [B,F,h,w,4], context [B,1,P], time_ids [B,3]."""
  vae, clip = size.vae_module(), size.clip_module()
  video = batch["video"]
  b, f, h, w, c = video.shape
  aug_rng, noise_rng, posterior_rng = jax.random.split(rng, 3)
  first = video[:, 0]
  sigma_aug = jnp.exp(
      COND_AUG_LOG_MEAN + COND_AUG_LOG_STD * jax.random.normal(aug_rng, (b,), jnp.float32)
  )
  noisy_first = first + sigma_aug[:, None, None, None] * jax.random.normal(
      noise_rng, first.shape, jnp.float32
  )
  # One encoder pass over the B·F frames and the B conditioning frames.
  images = jnp.concatenate([video.reshape((b * f, h, w, c)), noisy_first], axis=0)
  moments = vae.apply({"params": frozen["vae"]}, images, method="encode")
  mean, logvar = (m.astype(jnp.float32) for m in moments)
  posterior = autoencoder_lib.DiagonalGaussian(mean[: b * f], logvar[: b * f])
  latents = posterior.sample(posterior_rng) * vae.scaling_factor
  image_latents = jnp.repeat(mean[b * f :][:, None], f, axis=1)
  pixels = clip_lib.preprocess_for_clip(first, clip.image_size)
  context = clip.apply({"params": frozen["image_encoder"]}, pixels)[:, None].astype(jnp.float32)
  time_ids = jnp.stack([batch["fps_id"], batch["motion_bucket_id"], sigma_aug], axis=-1)
  out = dict(
      latents=latents.reshape((b, f) + latents.shape[1:]),
      image_latents=image_latents,
      context=context,
      time_ids=time_ids,
  )
  return jax.tree.map(jax.lax.stop_gradient, out)


class SvdStageTask(tasks_lib.Task):
  """SVD's image-to-video fine-tuning without data: the batch holds pixel clips in [-1, 1] and
  their fps / motion-bucket ids; every UNet parameter trains; the encoders are `frozen`.
  `init_params` returns zeros of the known shapes: the builder only traces it (`jax.eval_shape`);
  real weights come from `video_stage.host_params`."""

  def __init__(self, config, size: Size, unet: unet_lib.UNet, abstract_params):
    super().__init__(config)
    self.size, self.unet, self.abstract_params = size, unet, abstract_params

  def init_params(self, rng):
    del rng
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.abstract_params)

  def trainable_labels(self, params):
    return jax.tree.map(lambda _: tasks_lib.TRAIN, params)

  def loss_fn(self, params, frozen, batch, rng):
    cond_rng, loss_rng = jax.random.split(rng)
    cond = conditioning(self.size, frozen, batch, cond_rng)

    def network(x, t):
      x = jnp.concatenate([x, cond["image_latents"].astype(x.dtype)], axis=-1)
      return self.unet.apply({"params": params}, x, t, cond["context"], cond["time_ids"])

    loss, aux = losses.diffusion_loss(network, cond["latents"], loss_rng, **LOSS)
    sigma_aug = jnp.mean(cond["time_ids"][:, 2])
    return jnp.mean(loss), dict(mse=jnp.mean(aux["mse"]), sigma_aug=sigma_aug)


def abstract_params(size: Size) -> dict:
  """Parameter shapes: {'unet' (float32), 'vae' (the encoder and quant_conv), 'image_encoder'}."""
  unet = StepConfig(1, "none").unet(size)
  vae, clip = size.vae_module(), size.clip_module()
  pixel = size.latent_factor
  return dict(
      unet=jax.eval_shape(lambda: unet.init(jax.random.key(0), *unet.example_inputs(1, 2)))[
          "params"
      ],
      vae=jax.eval_shape(
          lambda: vae.init(jax.random.key(0), jnp.zeros((1, pixel, pixel, 3)), method="encode")
      )["params"],
      image_encoder=jax.eval_shape(
          lambda: clip.init(jax.random.key(0), jnp.zeros((1, clip.image_size, clip.image_size, 3)))
      )["params"],
  )


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _nbytes(tree) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def count_params(abstract) -> dict:
  return dict(
      unet_params=_count(abstract["unet"]),
      vae_encoder_params=_count(abstract["vae"]),
      image_encoder_params=_count(abstract["image_encoder"]),
      frozen_bytes=_nbytes({k: abstract[k] for k in ("vae", "image_encoder")}),
  )


def step_flops(size: Size, config: StepConfig) -> dict:
  """Model FLOPs of one step by part (module docstring); `flops` is their sum. The CLIP resize
  (two small float32 matmuls) is counted by tracing it."""
  unet, b = config.unet(size), config.batch
  h, w = size.latent
  kw = dict(batch=b, frames=size.frames, context_length=1)
  unet_forward = flops_lib.unet_flops(unet, h, w, **kw).total
  unet_train = flops_lib.unet_training_flops(unet, h, w, trainable="all", **kw).total
  vae = flops_lib.autoencoder_flops(
      size.vae_module(), size.height, size.width, batch=b, frames=size.frames + 1, part="encode"
  ).total
  clip_module = size.clip_module()
  clip = flops_lib.clip_vision_flops(clip_module, batch=b).total
  resize = flops_lib.jaxpr_flops(
      lambda x: clip_lib.preprocess_for_clip(x, clip_module.image_size),
      jax.ShapeDtypeStruct((b, size.height, size.width, 3), jnp.float32),
  ).total
  return dict(
      flops=unet_train + vae + clip + resize,
      unet_training_flops=unet_train,
      unet_forward_flops=unet_forward,
      vae_encoder_flops=vae,
      image_encoder_flops=clip,
      clip_resize_flops=resize,
  )


# ---------------------------------------------------------------------------------- measuring


class Bench:
  """Builds the state and frozen weights once per size and threads the state through every
  configuration's program (its shapes and shardings do not depend on batch, remat or attention)."""

  def __init__(self, size: Size, *, seed: int = 0, ema_decay: float = video_stage.EMA_DECAY):
    self.size, self.seed = size, seed
    self.config = video_stage.train_config(ema_decay)
    self.mesh = sharding_lib.make_mesh((("data", 1), ("fsdp", 1)), jax.devices()[:1])
    start = time.perf_counter()
    self.abstract = abstract_params(size)
    self.param_counts = count_params(self.abstract)
    self.state = None
    self.frozen = None
    self.setup_s = {"abstract_params_s": time.perf_counter() - start}

  def builder(self, config: StepConfig) -> state_lib.StateBuilder:
    task = SvdStageTask(self.config, self.size, config.unet(self.size), self.abstract["unet"])
    return state_lib.StateBuilder(task, self.config, self.mesh)

  def _fresh_state(self, builder: state_lib.StateBuilder):
    start = time.perf_counter()
    shardings = traverse_util.flatten_dict(builder.param_shardings)
    params = video_stage.host_params(
        self.abstract["unet"],
        self.seed,
        put=lambda value, path: jax.device_put(value, shardings[path]),
    )
    self.setup_s["host_params_s"] = time.perf_counter() - start
    start = time.perf_counter()
    self.state = jax.block_until_ready(builder.init_state(params, self.seed))
    self.setup_s["init_state_s"] = time.perf_counter() - start

  def _fresh_frozen(self):
    start = time.perf_counter()
    replicated = sharding_lib.replicated(self.mesh)
    frozen = {k: self.abstract[k] for k in ("vae", "image_encoder")}
    self.frozen = video_stage.host_params(
        frozen, self.seed + 1, put=lambda value, path: jax.device_put(value, replicated)
    )
    self.setup_s["frozen_params_s"] = time.perf_counter() - start

  def state_bytes(self) -> dict:
    """Bytes of the training state's parts (float32 parameters, AdamW moments, EMA)."""
    s = self.state
    return dict(
        state_bytes=_nbytes(s),
        param_bytes=_nbytes(s.params),
        opt_state_bytes=_nbytes(s.opt_state),
        ema_bytes=_nbytes(s.ema_params),
        grad_bytes=_nbytes(s.params),
    )  # every parameter trains: float32 gradients

  def batch(self, batch_size: int) -> dict:
    """Random pixel clips [B, F, H, W, 3] in [-1, 1] and per-clip fps − 1 and motion bucket ids."""
    size = self.size
    rng = np.random.default_rng(self.seed + batch_size)
    video = rng.uniform(-1, 1, (batch_size, size.frames, size.height, size.width, 3)).astype(
        np.float32
    )
    fps_id = rng.integers(4, 30, batch_size).astype(np.float32)
    motion = rng.integers(0, 256, batch_size).astype(np.float32)
    sharding = sharding_lib.batch_sharding(self.mesh)
    return jax.device_put(dict(video=video, fps_id=fps_id, motion_bucket_id=motion), sharding)

  def compile(self, config: StepConfig):
    """(compiled step, its batch, {trace_s, compile_s}); builds the state when there is none
    (or a failed step consumed it)."""
    builder = self.builder(config)
    if self.state is None or any(x.is_deleted() for x in jax.tree.leaves(self.state)):
      self._fresh_state(builder)
    if self.frozen is None:
      self._fresh_frozen()
    batch = self.batch(config.batch)
    step = builder.make_train_step(
        jax.tree.map(lambda x: x.sharding, self.frozen), jax.tree.map(lambda x: x.sharding, batch)
    )
    start = time.perf_counter()
    lowered = step.lower(self.state, self.frozen, batch)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile(dict(self.size.compiler_options) or None)
    return compiled, batch, dict(trace_s=trace_s, compile_s=time.perf_counter() - start)

  def step_fn(self, compiled, batch, block: bool = True) -> Callable[[], dict]:
    """A zero-argument step on the held state (see `video_stage.Bench.step_fn`)."""

    def run():
      self.state, metrics = compiled(self.state, self.frozen, batch)
      if block:
        jax.block_until_ready((metrics, self.state.step))
      return metrics

    return run


def _fit(row: dict) -> None:
  """Per-device bytes (the allocator's peak where this row raised it, else the program's total),
  whether they fit an 80 GiB GPU, and an FSDP-over-8 estimate: the state and the gradients ÷ 8
  (activations, the frozen encoders and a layer's gathered weights not)."""
  peak = row.get("device_peak_bytes")
  total = peak if peak is not None else row.get("program_total_bytes")
  row["per_device_bytes"] = total
  row["per_device_bytes_source"] = (
      "allocator_peak" if peak is not None else "program_total" if total is not None else None
  )
  if total is None:
    row["fits_80gb"] = row["fsdp8_estimate_bytes"] = row["fsdp8_fits_80gb"] = None
    return
  row["fits_80gb"] = total <= FIT_LIMIT_BYTES
  sharded = row["state_bytes"] + row["grad_bytes"]
  row["fsdp8_estimate_bytes"] = int(total - sharded * (1 - 1 / FSDP_DEVICES))
  row["fsdp8_fits_80gb"] = row["fsdp8_estimate_bytes"] <= FIT_LIMIT_BYTES


def measure_config(
    bench: Bench,
    config: StepConfig,
    *,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    peak_tflops: Optional[float] = None,
) -> dict:
  """One configuration's row. Raises on failure, the row so far in the exception's `row`."""
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
      pixels=[size.height, size.width],
      latent=list(size.latent),
      dtype=size.dtype,
      param_dtype="float32",
      remat_policy=config.remat_policy,
      attention=config.attention or "default",
      **bench.param_counts,
  )
  row.update(step_flops(size, config))
  compiled, batch, times = bench.compile(config)
  row.update(bench.state_bytes())
  row.update(
      times,
      **video_stage._program_memory(compiled),  # pylint: disable=protected-access
      xla_flops=video_stage._xla_flops(compiled),
  )  # pylint: disable=protected-access
  before = video_stage._device_memory()  # pylint: disable=protected-access
  if before and "bytes_limit" in before and row.get("program_work_bytes") is not None:
    free = before["bytes_limit"] - before["bytes_in_use"]
    if row["program_work_bytes"] > free:  # it would fail and take the donated state with it
      _fit(row)
      raise MemoryError(
          f"needs {row['program_work_bytes'] / 2**30:.1f} GiB beyond its state and "
          f"inputs; {free / 2**30:.1f} GiB free"
      )
  timing, last = video_stage.time_steps(
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
      xla_tflops_per_s=row["xla_flops"] / timing["step_s"] / 1e12 if row["xla_flops"] else None,
      sigma_aug=float(last["sigma_aug"]),
  )
  after = video_stage._device_memory()  # pylint: disable=protected-access
  row["device_peak_bytes"] = None
  if after:
    row.update(
        device_bytes_in_use_before=before.get("bytes_in_use"),
        device_bytes_limit=after.get("bytes_limit"),
        device_peak_bytes_so_far=after.get("peak_bytes_in_use"),
    )
    rose = after.get("peak_bytes_in_use", 0) > before.get("peak_bytes_in_use", 0)
    row["device_peak_bytes"] = after.get("peak_bytes_in_use") if rose else None
  _fit(row)


def run(
    size: Size,
    configs: Sequence[StepConfig],
    *,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
    ema_decay: float = video_stage.EMA_DECAY,
    peak_tflops: Optional[float] = None,
    time_budget_s: Optional[float] = None,
    log: Callable[[str], None] = print,
    on_row: Optional[Callable[[list], None]] = None,
) -> list[dict]:
  """Measures each configuration in turn (a failure gives an 'error' row and the next goes on);
  `time_budget_s` as in `video_stage.run`; `on_row(rows)` after each row (e.g. to save them)."""
  start = time.perf_counter()
  if peak_tflops is None:
    peak_tflops = video_stage.peak_tflops_of_device()
  bench = Bench(size, seed=seed, ema_decay=ema_decay)
  counts = bench.param_counts
  log(
      f"{size.name}: UNet {counts['unet_params'] / 1e6:.1f} M parameters (all trained), VAE "
      f"encoder {counts['vae_encoder_params'] / 1e6:.1f} M, image encoder "
      f"{counts['image_encoder_params'] / 1e6:.1f} M (frozen); {size.frames} frames × "
      f"{size.height}×{size.width} pixels, {size.dtype}"
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
      if on_row:
        on_row(rows)
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
      gib = row["per_device_bytes"] / 2**30 if row.get("per_device_bytes") else float("nan")
      log(
          f"[{config.name}] step {row['step_s'] * 1e3:.1f} ms, {row['tflops_per_s']:.1f} TFLOP/s"
          f"{mfu}, {gib:.1f} GiB per device, compile {row['compile_s']:.1f} s, loss "
          f"{row['last_loss']:.4f}"
      )
    row["wall_s"] = time.perf_counter() - config_start
    slowest = max(slowest, row["wall_s"])
    rows.append(row)
    if rows[0] is row:
      row["setup_s"] = bench.setup_s
    if on_row:
      on_row(rows)
  return rows


def table(rows: Sequence[dict]) -> str:
  """A Markdown table of the rows."""
  gib = lambda v: "-" if v is None else f"{v / 2**30:.1f}"
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  lines = [
      "| config | batch | remat | attention | step (ms) | queued (ms) | clips/s | TFLOP/step "
      "| TFLOP/s | MFU | compile (s) | args GiB | temp GiB | device peak GiB | fits 80 GB "
      "| FSDP-8 est. GiB | loss |",
      "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
      "| ---: | ---: | --- | ---: | ---: |",
  ]
  for r in rows:
    if r.get("error"):
      lines.append(
          f"| {r['name']} | {r['batch']} | {r['remat_policy']} | {r['attention']} | "
          f"error: {' '.join(r['error'].replace('|', '/').split())[:100]} "
          "| | | | | | | | | | | | |"
      )
      continue
    fits = {True: "yes", False: "no", None: "-"}[r.get("fits_80gb")]
    lines.append(
        f"| {r['name']} | {r['batch']} | {r['remat_policy']} | {r['attention']} "
        f"| {r['step_s'] * 1e3:.1f} | {r['pipelined_step_s'] * 1e3:.1f} | {r['clips_per_s']:.2f} "
        f"| {r['flops'] / 1e12:.4g} | {r['tflops_per_s']:.1f} | {fmt(r.get('mfu'), '.1%')} "
        f"| {r['compile_s']:.1f} | {gib(r.get('argument_bytes'))} | {gib(r.get('temp_bytes'))} "
        f"| {gib(r.get('device_peak_bytes'))} | {fits} | {gib(r.get('fsdp8_estimate_bytes'))} "
        f"| {r['last_loss']:.4f} |"
    )
  return "\n".join(lines)


def flops_note(size: Size) -> str:
  """The FLOP convention, with this size's numbers at batch 1."""
  f = step_flops(size, StepConfig(1))
  t = lambda k: f"{f[k] / 1e12:.4g} T"
  return (
      f"FLOPs per step (batch 1): {t('flops')} = UNet forward + backward of every weight "
      f"{t('unet_training_flops')} ({f['unet_training_flops'] / f['unet_forward_flops']:.2f} × "
      f"its forward {t('unet_forward_flops')}) + VAE encoder forward on {size.frames} + 1 "
      f"frames {t('vae_encoder_flops')} + CLIP image encoder forward "
      f"{t('image_encoder_flops')} + CLIP resize {t('clip_resize_flops')}. Convolutions, "
      f"dense layers and attention products (2 × MACs); norms, activations, the loss and "
      f"the optimizer not; remat's recomputation not (model FLOPs). MFU = TFLOP/s ÷ the dense "
      f"bf16 peak. xla_flops: XLA's cost analysis (recomputation and elementwise work in, "
      f"cuBLAS / cuDNN custom calls out)."
  )


def result(
    size: Size,
    configs: Sequence[StepConfig],
    rows: list,
    *,
    steps: int,
    warmup: int,
    ema_decay: float,
    time_budget_s: Optional[float],
) -> dict:
  """The JSON document of a run (or of the rows so far)."""
  return dict(
      benchmark="svd_stage",
      size=size.name,
      unet=dict(size.unet),
      vae=dict(size.vae),
      image_encoder=dict(size.clip),
      frames=size.frames,
      pixels=[size.height, size.width],
      latent=list(size.latent),
      dtype=size.dtype,
      configs=[c.name for c in configs],
      steps=steps,
      warmup=warmup,
      optimizer=video_stage.OPTIM,
      ema_decay=ema_decay,
      loss=LOSS,
      cond_aug=dict(log_mean=COND_AUG_LOG_MEAN, log_std=COND_AUG_LOG_STD),
      time_budget_s=time_budget_s,
      fit_limit_bytes=FIT_LIMIT_BYTES,
      fsdp_devices=FSDP_DEVICES,
      flops_note=flops_note(size),
      rows=rows,
      table=table(rows),
      machine=measure.machine_info(),
      load_average=measure.load_average(),
  )


# ------------------------------------------------------------------------------ suite cases


def case(name: str, size: Size, config: StepConfig):
  """A `cases.Case` of one configuration for the suite runner (no reference)."""
  from vldm.benchmark import cases as cases_lib  # pylint: disable=g-import-not-at-top

  counts = step_flops(size, config)
  device = "cuda" if size.dtype == "bfloat16" else "cpu"
  what = (
      f"SVD image-to-video training step ({size.name}: whole UNet trained, VAE encoder and "
      f"CLIP image encoder frozen, in the step): batch {config.batch} × {size.frames} frames "
      f"× {size.height}×{size.width} pixels, {size.dtype} compute, float32 parameters, remat "
      f"{config.remat_policy}, attention {config.attention or 'default'}; encoders, v_edm "
      f"loss, gradients, clipping, AdamW, EMA"
  )
  described = dict(
      kind="svd_stage_train",
      device=device,
      dtype=size.dtype,
      size=size.name,
      batch=config.batch,
      frames=size.frames,
      pixels=[size.height, size.width],
      remat_policy=config.remat_policy,
      attention=config.attention or "default",
      **counts,
  )

  def build():
    bench = Bench(size)
    compiled, batch, times = bench.compile(config)
    memory = video_stage._program_memory(compiled)  # pylint: disable=protected-access
    step = bench.step_fn(compiled, batch)
    notes = dict(
        trace_s=times["trace_s"],
        **memory,
        **bench.param_counts,
        **bench.state_bytes(),
        xla_flops=video_stage._xla_flops(compiled),
    )  # pylint: disable=protected-access
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
  """The command line's flags (defined only when run as a program)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum(
      "size",
      "svd",
      list(SIZES),
      "svd: SVD's UNet, VAE encoder and CLIP ViT-H, "
      "14 frames × 576×1024, bf16; tiny: toys, 2 frames × 16×16, float32.",
  )
  flags.DEFINE_string(
      "configs",
      None,
      "Comma-separated batch:remat_policy:attention (remat: "
      f"{', '.join(unet_blocks.REMAT_POLICIES)}; attention: xla, cudnn, default). Default: "
      + "; ".join(f"{k}: {v}" for k, v in DEFAULT_CONFIGS.items()),
  )
  flags.DEFINE_string("out", None, "Where to write the JSON results (rewritten after each row).")
  flags.DEFINE_integer("steps", DEFAULT_STEPS, "Timed steps per configuration (median).")
  flags.DEFINE_integer("warmup", DEFAULT_WARMUP, "Untimed steps first (the first one included).")
  flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
  flags.DEFINE_float("ema_decay", video_stage.EMA_DECAY, "EMA of the parameters; 0: none.")
  flags.DEFINE_float(
      "peak_tflops",
      None,
      "Dense bf16 peak for MFU (default: by the GPU's name, 989 for an H200).",
  )
  flags.DEFINE_float(
      "time_budget_s",
      DEFAULT_TIME_BUDGET_S,
      "Start no configuration that would "
      "end after this many seconds (judged by the slowest so far); 0: no limit.",
  )
  flags.DEFINE_string("cache_dir", None, "A persistent XLA compilation cache directory.")


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  size = SIZES[f.size]
  try:
    configs = parse_configs(f.configs or DEFAULT_CONFIGS[size.name])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if f.steps < 1 or f.warmup < 1:
    raise app.UsageError("--steps and --warmup must be ≥ 1.")
  if f.cache_dir:
    jax.config.update("jax_compilation_cache_dir", f.cache_dir)
  budget = f.time_budget_s or None
  document = lambda rows: result(
      size,
      configs,
      rows,
      steps=f.steps,
      warmup=f.warmup,
      ema_decay=f.ema_decay,
      time_budget_s=budget,
  )

  def save(rows):
    if f.out:
      os.makedirs(os.path.dirname(os.path.abspath(f.out)), exist_ok=True)
      with open(f.out + ".tmp", "w") as out:
        json.dump(document(rows), out, indent=1, default=str)
      os.replace(f.out + ".tmp", f.out)

  rows = run(
      size,
      configs,
      steps=f.steps,
      warmup=f.warmup,
      seed=f.seed,
      ema_decay=f.ema_decay,
      peak_tflops=f.peak_tflops,
      time_budget_s=budget,
      on_row=save,
  )
  save(rows)
  print(table(rows))
  print(flops_note(size))
  if f.out:
    print(f"wrote {f.out}")


if __name__ == "__main__":
  # Before jax starts its backends: let one program use most of the GPU (the default takes 75 %).
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  from absl import app  # pylint: disable=g-import-not-at-top

  define_flags()
  app.run(main)
