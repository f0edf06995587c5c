"""Benchmark cases: one unit of work done by vldm (JAX) and by diffusers / PyTorch alike.

A `Case` is cheap to make (a name, the work in words, its analytic FLOPs and a JSON-ready config);
`case.build()` does the heavy part: it builds both models with the same weights (a random
diffusers model, saved with `save_pretrained` and loaded into vldm with `load_diffusers`),
compiles the JAX function and returns a `Runner` with one zero-argument callable per framework.
Each callable blocks until its result is ready.

The unit cases:
  unet_train_case    a training step: forward, MSE loss, backward and an AdamW update
                     (optax.adamw / torch.optim.AdamW, same hyperparameters); JAX state donated.
  unet_sample_case   N Euler steps with SVD's EulerDiscreteScheduler settings and classifier-free
                     guidance batched (uncond + cond in one UNet call per step, per-frame scales):
                     vldm's `samplers.sample` over `guidance.classifier_free_guidance`, against
                     StableVideoDiffusionPipeline's denoising loop (scale_model_input, concat image
                     latents, UNet, guidance, scheduler.step), no VAE or CLIP.
  unet_forward_case  one UNet call at the guided batch: one sampling step's network work.
  attention_case     multi-head attention alone (`jax.nn.dot_product_attention`, 'xla' or 'cudnn',
                     against torch's scaled_dot_product_attention as diffusers calls it).
  temporal_conv_case the (3,1,1) convolution over frames, forward + backward, per implementation
                     against torch's Conv3d.
"""
from __future__ import annotations

import dataclasses
import functools
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vldm import devices
from vldm.benchmark import flops as flops_lib
from vldm.benchmark import measure

# SVD's scheduler_config.json (stabilityai/stable-video-diffusion-img2vid).
SVD_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085,
    beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
    interpolation_type="linear", use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0,
    timestep_spacing="leading", timestep_type="continuous", steps_offset=1)
# The AdamW both frameworks use.
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
DTYPES = ("float32", "bfloat16")
# JAX-only variants of the temporal convolution, measured here before any model change.
TEMPORAL_CONV_VARIANTS = ("shifted_matmul", "conv3d", "conv2d")


@dataclasses.dataclass
class Runner:
  """A built case: zero-argument callables that do the work once and block until it is done."""
  jax_fn: Callable[[], Any]
  reference_fn: Optional[Callable[[], Any]]
  compile_s: float
  jax_work_bytes: Optional[int] = None  # see `measure.jax_work_bytes`
  jax_total_bytes: Optional[int] = None
  relative_error: Optional[float] = None
  notes: dict = dataclasses.field(default_factory=dict)
  compiled: Any = None  # the compiled JAX program (for `profile`)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  what: str
  flops: float
  config: dict
  build: Callable[[], Runner] = dataclasses.field(repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class UNetSetup:
  """A video UNet (diffusers UNetSpatioTemporalConditionModel kwargs) and the inputs it runs on.

  `dtype`: compute dtype. Training keeps float32 parameters (bf16: autocast / Flax `dtype`);
  sampling and forward runs cast the weights to it. `options`: vldm UNet fields
  (attention_implementation, temporal_conv_implementation, remat_policy); a remat policy other
  than 'none' turns on diffusers' gradient checkpointing for the reference.
  """
  unet_config: tuple  # sorted (key, value) pairs, hashable
  batch: int
  frames: int
  height: int
  width: int
  dtype: str = "float32"
  device: str = "cpu"
  options: tuple = ()
  seed: int = 0

  @classmethod
  def make(cls, unet_config: dict, batch: int, frames: int, height: int, width: int, **kwargs):
    as_tuple = lambda d: tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                      for k, v in d.items()))
    options = as_tuple(kwargs.pop("options", {}))
    if kwargs.get("dtype", "float32") not in DTYPES:
      raise ValueError(f"dtype must be one of {DTYPES}, got {kwargs['dtype']!r}.")
    return cls(as_tuple(unet_config), batch, frames, height, width, options=options, **kwargs)

  @property
  def config(self) -> dict:
    return dict(self.unet_config)

  @property
  def option_dict(self) -> dict:
    return dict(self.options)

  def vldm_module(self):
    """The vldm UNet of this config (no weights), with the options applied."""
    from vldm.convert import registry  # pylint: disable=g-import-not-at-top
    import vldm.convert  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    module = registry.format_for("UNetSpatioTemporalConditionModel").from_config(
        dict(self.config, _class_name="UNetSpatioTemporalConditionModel"))
    return module.clone(**self.option_dict)

  def forward_flops(self, batch: Optional[int] = None) -> flops_lib.Flops:
    return flops_lib.unet_flops(self.vldm_module(), self.height, self.width,
                                batch=batch or self.batch, frames=self.frames, context_length=1)

  def describe(self) -> dict:
    return dict(unet=self.config, batch=self.batch, frames=self.frames,
                latent=[self.height, self.width], dtype=self.dtype, device=self.device,
                options=self.option_dict)


# ------------------------------------------------------------------------------ shared weights


@functools.lru_cache(maxsize=4)
def _reference_folder(unet_config: tuple, seed: int) -> str:
  """A random diffusers UNet of this config saved with save_pretrained (once per config)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = diffusers.UNetSpatioTemporalConditionModel(**dict(unet_config))
  path = tempfile.mkdtemp(prefix="vldm_benchmark_unet_")
  model.save_pretrained(path)
  return path


def _torch_dtype(name: str):
  import torch  # pylint: disable=g-import-not-at-top
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _sync(device: str):
  if device == "cuda":
    import torch  # pylint: disable=g-import-not-at-top
    torch.cuda.synchronize()


def _build_pair(setup: UNetSetup, weights_dtype: str):
  """(vldm module, params on device, torch model on device) with the same weights."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from vldm.convert import load_diffusers  # pylint: disable=g-import-not-at-top
  path = _reference_folder(setup.unet_config, setup.seed)
  module, params = load_diffusers(path)
  compute = jnp.dtype(setup.dtype)
  module = module.clone(dtype=compute, param_dtype=jnp.dtype(weights_dtype), **setup.option_dict)
  params = _replicate(jax.tree.map(lambda p: jnp.asarray(p, weights_dtype), params))
  model = diffusers.UNetSpatioTemporalConditionModel.from_pretrained(
      path, torch_dtype=_torch_dtype(weights_dtype)).to(setup.device)
  return module, params, model


def _inputs(setup: UNetSetup, batch: int, channels: int, rng: np.random.Generator) -> dict:
  """NHWC numpy inputs of the UNet call: sample, timesteps (SVD's c_noise), context, time ids."""
  config = setup.config
  shape = (batch, setup.frames, setup.height, setup.width, channels)
  return dict(
      sample=rng.standard_normal(shape).astype(np.float32),
      timesteps=rng.uniform(-1.5, 1.5, (batch,)).astype(np.float32),
      context=rng.standard_normal((batch, 1, config["cross_attention_dim"])).astype(np.float32),
      time_ids=np.tile(np.array([[6.0, 127.0, 0.02]], np.float32), (batch, 1)))


def _split_over_cpus() -> bool:
  """Whether cases run data-parallel: on several XLA:CPU devices (`--cpu_devices`). Accelerator
  cases time one device, as before."""
  return jax.default_backend() == "cpu" and jax.local_device_count() > 1


def _replicate(tree):
  """Weights and other unbatched operands: on every device that the batch is split over."""
  return devices.replicate(tree) if _split_over_cpus() else jax.device_put(tree)


def _on_devices(*arrays) -> tuple:
  """Batched inputs split over the CPU devices (data-parallel, as the demo trains and samples);
  replicated where the batch does not divide; on the one device otherwise."""
  if not _split_over_cpus():
    return tuple(jax.device_put(arrays))
  return tuple(a if isinstance(a, jax.Array) else _replicate(a)
               for a in devices.split_batch(*arrays))


def _dict_on_devices(batched: dict) -> dict:
  return dict(zip(batched, _on_devices(*batched.values())))


def _to_torch(array, device: str, dtype=None, video: bool = False):
  """numpy → torch on device; video NHWC (B,F,H,W,C) → diffusers' (B,F,C,H,W)."""
  import torch  # pylint: disable=g-import-not-at-top
  array = np.asarray(array)
  if video:
    array = np.moveaxis(array, -1, 2)
  tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device)
  return tensor if dtype is None else tensor.to(dtype)


def _relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _memory(compiled) -> tuple:
  return measure.jax_work_bytes(compiled), measure.jax_total_bytes(compiled)


def _compile(fn, *args):
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - start


# ------------------------------------------------------------------------------------ training


def unet_train_case(name: str, setup: UNetSetup) -> Case:
  forward = setup.forward_flops()
  what = (f"training step of the video UNet: forward, MSE loss, backward, AdamW update; batch "
          f"{setup.batch} × {setup.frames} frames × {setup.height}×{setup.width} latents, "
          f"{setup.dtype} compute, float32 parameters")
  return Case(name, what, flops_lib.training_flops(forward).total,
              dict(kind="train", forward_flops=forward.total, **setup.describe()),
              functools.partial(_build_train, setup))


def _build_train(setup: UNetSetup) -> Runner:
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  module, params, model = _build_pair(setup, "float32")
  config = setup.config
  rng = np.random.default_rng(setup.seed + 1)
  inputs = _inputs(setup, setup.batch, config["in_channels"], rng)
  target = rng.standard_normal(inputs["sample"].shape[:-1] + (config["out_channels"],))
  target = target.astype(np.float32)

  tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                   weight_decay=ADAMW["weight_decay"])

  def step(params, opt_state, batch):
    def loss_fn(p):
      out = module.apply({"params": p}, batch["sample"], batch["timesteps"], batch["context"],
                         batch["time_ids"])
      return jnp.mean(jnp.square(out.astype(jnp.float32) - batch["target"]))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batch = _dict_on_devices(dict(inputs, target=target))
  opt_state = jax.jit(tx.init)(params)
  compiled, compile_s = _compile(jax.jit(step, donate_argnums=(0, 1)), params, opt_state, batch)
  state = {"params": params, "opt": opt_state, "loss": None}

  def jax_fn():
    state["params"], state["opt"], state["loss"] = compiled(state["params"], state["opt"], batch)
    jax.block_until_ready((state["params"], state["loss"]))
    return state["loss"]

  device = setup.device
  model.train()
  if setup.option_dict.get("remat_policy", "none") != "none":
    model.enable_gradient_checkpointing()
  optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW["lr"],
                                betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                                weight_decay=ADAMW["weight_decay"])
  t_args = (_to_torch(inputs["sample"], device, video=True),
            _to_torch(inputs["timesteps"], device), _to_torch(inputs["context"], device),
            _to_torch(inputs["time_ids"], device))
  t_target = _to_torch(target, device, video=True)
  autocast = setup.dtype != "float32"

  def reference_fn():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=_torch_dtype(setup.dtype), enabled=autocast):
      out = model(*t_args, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out.float(), t_target)
    loss.backward()
    optimizer.step()
    _sync(device)
    return loss

  # The first step of each starts from the same weights: their losses must agree.
  error = _relative(float(jax_fn()), float(reference_fn().detach()))
  return Runner(jax_fn, reference_fn, compile_s, *_memory(compiled), error,
                dict(error_of="first-step loss"), compiled)


# ------------------------------------------------------------------------------------ sampling


def unet_sample_case(name: str, setup: UNetSetup, num_steps: int = 25) -> Case:
  per_call = setup.forward_flops(batch=2 * setup.batch)
  what = (f"{num_steps}-step Euler sampling (SVD scheduler, v-prediction, Karras σ) with "
          f"classifier-free guidance batched (UNet at batch {2 * setup.batch}), {setup.frames} "
          f"frames × {setup.height}×{setup.width} latents, {setup.dtype}; denoising loop only "
          f"(the StableVideoDiffusionPipeline loop, no VAE / CLIP)")
  return Case(name, what, num_steps * per_call.total,
              dict(kind="sample", num_steps=num_steps, forward_flops=per_call.total,
                   **setup.describe()),
              functools.partial(_build_sample, setup, num_steps))


def _sample_inputs(setup: UNetSetup):
  config = setup.config
  latent_channels = config["out_channels"]
  rng = np.random.default_rng(setup.seed + 2)
  shape = (setup.batch, setup.frames, setup.height, setup.width, latent_channels)
  return dict(
      noise=rng.standard_normal(shape).astype(np.float32),
      image_latents=rng.standard_normal(shape).astype(np.float32),
      context=rng.standard_normal((setup.batch, 1, config["cross_attention_dim"]))
      .astype(np.float32),
      time_ids=np.tile(np.array([[6.0, 127.0, 0.02]], np.float32), (setup.batch, 1)))


def vldm_sampler(module, num_steps: int, min_guidance: float = 1.0, max_guidance: float = 3.0):
  """fn(params, inputs) → latents: vldm's guided Euler sampling, as the SVD pipeline runs it."""
  from vldm.diffusion import guidance  # pylint: disable=g-import-not-at-top
  from vldm.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from vldm.diffusion.parameterization import Denoiser  # pylint: disable=g-import-not-at-top
  sampler, schedule, options, prediction_type = samplers.from_scheduler_config(SVD_SCHEDULER)

  def sample(params, inputs):
    batch, frames = inputs["noise"].shape[:2]
    compute = module.dtype

    def network(x, t, c):
      x = jnp.concatenate([x.astype(compute), c["image_latents"].astype(compute)], axis=-1)
      return module.apply({"params": params}, x, t, c["context"], c["time_ids"])

    cond = dict(context=inputs["context"], image_latents=inputs["image_latents"],
                time_ids=inputs["time_ids"])
    uncond = dict(cond, context=jnp.zeros_like(cond["context"]),
                  image_latents=jnp.zeros_like(cond["image_latents"]))
    scales = guidance.frame_guidance_scale(min_guidance, max_guidance, frames, batch)
    guided = guidance.classifier_free_guidance(network, cond, uncond, scales)
    denoiser = Denoiser(guided, prediction_type, schedule)
    return samplers.sample(sampler, denoiser, inputs["noise"], schedule, num_steps, **options)

  return sample


def torch_sampler(model, num_steps: int, device: str, dtype, min_guidance: float = 1.0,
                  max_guidance: float = 3.0):
  """fn(inputs) → latents (B,F,C,H,W): StableVideoDiffusionPipeline's denoising loop."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  config = {k: v for k, v in SVD_SCHEDULER.items() if not k.startswith("_")}
  scheduler = diffusers.EulerDiscreteScheduler(**config)

  @torch.no_grad()
  def sample(inputs):
    noise = _to_torch(inputs["noise"], device, dtype, video=True)
    image_latents = _to_torch(inputs["image_latents"], device, dtype, video=True)
    context = _to_torch(inputs["context"], device, dtype)
    batch, frames = noise.shape[:2]
    # The pipeline's batching: unconditional (zeros) first, then conditional.
    image_latents = torch.cat([torch.zeros_like(image_latents), image_latents])
    context = torch.cat([torch.zeros_like(context), context])
    time_ids = _to_torch(inputs["time_ids"], device, dtype).repeat(2, 1)
    scale = torch.linspace(min_guidance, max_guidance, frames, device=device)[None, :]
    scale = scale.repeat(batch, 1).to(dtype)[..., None, None, None]
    scheduler.set_timesteps(num_steps, device=device)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
      model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
      model_input = torch.cat([model_input, image_latents], dim=2)
      pred = model(model_input, t, encoder_hidden_states=context, added_time_ids=time_ids,
                   return_dict=False)[0]
      uncond, cond = pred.chunk(2)
      pred = uncond + scale * (cond - uncond)
      latents = scheduler.step(pred, t, latents).prev_sample
    _sync(device)
    return latents

  return sample


def _build_sample(setup: UNetSetup, num_steps: int) -> Runner:
  module, params, model = _build_pair(setup, setup.dtype)
  model.eval()
  inputs = _sample_inputs(setup)
  device_inputs = _dict_on_devices(inputs)
  compiled, compile_s = _compile(jax.jit(vldm_sampler(module, num_steps)), params, device_inputs)

  def jax_fn():
    return compiled(params, device_inputs).block_until_ready()

  reference = torch_sampler(model, num_steps, setup.device, _torch_dtype(setup.dtype))
  reference_fn = functools.partial(reference, inputs)
  ours = np.asarray(jax_fn(), np.float32)
  theirs = np.moveaxis(reference_fn().float().cpu().numpy(), 2, -1)
  return Runner(jax_fn, reference_fn, compile_s, *_memory(compiled),
                _relative(ours, theirs), dict(error_of="final latents"), compiled)


# ------------------------------------------------------------------------------------- forward


def unet_forward_case(name: str, setup: UNetSetup) -> Case:
  forward = setup.forward_flops()
  what = (f"one video-UNet forward, batch {setup.batch} × {setup.frames} frames × "
          f"{setup.height}×{setup.width} latents, {setup.dtype}, no gradient")
  return Case(name, what, forward.total, dict(kind="forward", **setup.describe()),
              functools.partial(_build_forward, setup))


def _build_forward(setup: UNetSetup) -> Runner:
  import torch  # pylint: disable=g-import-not-at-top
  module, params, model = _build_pair(setup, setup.dtype)
  model.eval()
  inputs = _inputs(setup, setup.batch, setup.config["in_channels"], np.random.default_rng(3))
  args = _on_devices(inputs["sample"], inputs["timesteps"], inputs["context"], inputs["time_ids"])
  apply = jax.jit(lambda p, *a: module.apply({"params": p}, *a))
  compiled, compile_s = _compile(apply, params, *args)
  dtype, device = _torch_dtype(setup.dtype), setup.device
  t_args = (_to_torch(inputs["sample"], device, dtype, video=True),
            _to_torch(inputs["timesteps"], device), _to_torch(inputs["context"], device, dtype),
            _to_torch(inputs["time_ids"], device, dtype))

  def jax_fn():
    return compiled(params, *args).block_until_ready()

  @torch.no_grad()
  def reference_fn():
    out = model(*t_args, return_dict=False)[0]
    _sync(device)
    return out

  error = _relative(np.asarray(jax_fn(), np.float32),
                    np.moveaxis(reference_fn().float().cpu().numpy(), 2, -1))
  return Runner(jax_fn, reference_fn, compile_s, *_memory(compiled), error,
                dict(error_of="output"), compiled)


# ------------------------------------------------------------------------------- micro: attention


def attention_case(name: str, batch: int, tokens: int, heads: int, head_dim: int,
                   implementation: Optional[str], *, dtype: str = "float32", device: str = "cpu",
                   train: bool = False, where: str = "") -> Case:
  forward = 4.0 * batch * tokens * tokens * heads * head_dim
  what = (f"{where + ' ' if where else ''}self-attention alone{' forward + backward' if train else ''}"
          f": {batch} × {tokens} tokens × {heads} heads × {head_dim}, {dtype}, "
          f"implementation {implementation or 'default'}; reference: torch "
          f"scaled_dot_product_attention on (B, heads, T, D) views, as diffusers calls it")
  config = dict(kind="attention", batch=batch, tokens=tokens, heads=heads, head_dim=head_dim,
                implementation=implementation, dtype=dtype, device=device, train=train)
  return Case(name, what, forward * (flops_lib.TRAIN_FACTOR if train else 1), config,
              functools.partial(_build_attention, config))


def _build_attention(c: dict) -> Runner:
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  shape = (c["batch"], c["tokens"], c["heads"], c["head_dim"])
  q, k, v, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
  dtype = jnp.dtype(c["dtype"])
  attend = functools.partial(jax.nn.dot_product_attention, implementation=c["implementation"])
  args = _on_devices(*(np.asarray(a, dtype) for a in (q, k, v, g)))
  if c["train"]:
    fn = jax.jit(lambda q, k, v, g: jax.grad(
        lambda q, k, v: jnp.sum((attend(q, k, v) * g).astype(jnp.float32)), (0, 1, 2))(q, k, v))
  else:
    fn = jax.jit(lambda q, k, v, g: attend(q, k, v))
  compiled, compile_s = _compile(fn, *args)
  device, t_dtype = c["device"], _torch_dtype(c["dtype"])
  tq, tk, tv, tg = (_to_torch(a, device, t_dtype).requires_grad_(c["train"]) for a in (q, k, v, g))

  def jax_fn():
    return jax.block_until_ready(compiled(*args))

  def reference_fn():
    with torch.set_grad_enabled(c["train"]):
      out = torch.nn.functional.scaled_dot_product_attention(
          tq.transpose(1, 2), tk.transpose(1, 2), tv.transpose(1, 2)).transpose(1, 2)
      if c["train"]:
        out.backward(tg)
    _sync(device)
    return out

  ours = np.asarray(jax.jit(attend)(*args[:3]), np.float32)
  theirs = reference_fn().detach().float().cpu().numpy()
  return Runner(jax_fn, reference_fn, compile_s, *_memory(compiled),
                _relative(ours, theirs), dict(error_of="attention output"), compiled)


# --------------------------------------------------------------------------- micro: temporal conv


def temporal_conv(x, kernel, implementation: str):
  """The (3,1,1) convolution over frames of (B, F, H, W, C) with a (k,1,1,I,O) kernel.

  'shifted_matmul' and 'conv3d' are `vldm.models.layers.TemporalConv`'s; 'conv2d' (frames × pixels
  as a 2-D image, kernel (k, 1)) is a candidate measured here.
  """
  if implementation == "conv2d":
    b, f, h, w, ch = x.shape
    k = kernel.shape[0]
    y = jax.lax.conv_general_dilated(x.reshape(b, f, h * w, ch), kernel.reshape(k, 1, ch, -1),
                                     (1, 1), ((k // 2, k // 2), (0, 0)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y.reshape(b, f, h, w, -1)
  from vldm.models import layers  # pylint: disable=g-import-not-at-top
  module = layers.TemporalConv(kernel.shape[-1], kernel.shape[0], implementation=implementation,
                               dtype=x.dtype, param_dtype=kernel.dtype)
  bias = jnp.zeros((kernel.shape[-1],), kernel.dtype)
  return module.apply({"params": {"kernel": kernel, "bias": bias}}, x)


def temporal_conv_case(name: str, batch: int, frames: int, height: int, width: int, channels: int,
                       implementation: str, *, dtype: str = "float32", device: str = "cpu") -> Case:
  if implementation not in TEMPORAL_CONV_VARIANTS:
    raise ValueError(f"Unknown temporal conv variant {implementation!r}; accepted: "
                     f"{TEMPORAL_CONV_VARIANTS}.")
  forward = 2.0 * batch * frames * height * width * 3 * channels * channels
  what = (f"(3,1,1) temporal convolution, forward + backward (input and kernel gradients), "
          f"{batch} × {frames} frames × {height}×{width} × {channels} channels, {dtype}, "
          f"implementation {implementation}; reference: torch Conv3d on NCDHW (diffusers)")
  config = dict(kind="temporal_conv", batch=batch, frames=frames, height=height, width=width,
                channels=channels, implementation=implementation, dtype=dtype, device=device)
  return Case(name, what, flops_lib.TRAIN_FACTOR * forward, config,
              functools.partial(_build_temporal_conv, config))


def _build_temporal_conv(c: dict) -> Runner:
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  ch = c["channels"]
  shape = (c["batch"], c["frames"], c["height"], c["width"], ch)
  x, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
  kernel = (rng.standard_normal((3, 1, 1, ch, ch)) / np.sqrt(3 * ch)).astype(np.float32)
  dtype = jnp.dtype(c["dtype"])
  x_on, g_on = _on_devices(np.asarray(x, dtype), np.asarray(g, dtype))
  args = (x_on, _replicate(jnp.asarray(kernel, dtype)), g_on)
  conv = functools.partial(temporal_conv, implementation=c["implementation"])
  fn = jax.jit(lambda x, w, g: jax.grad(
      lambda x, w: jnp.sum((conv(x, w) * g).astype(jnp.float32)), (0, 1))(x, w))
  compiled, compile_s = _compile(fn, *args)
  device, t_dtype = c["device"], _torch_dtype(c["dtype"])
  layer = torch.nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0)).to(device=device, dtype=t_dtype)
  with torch.no_grad():  # torch (O, I, k, 1, 1) ← (k, 1, 1, I, O)
    layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(np.transpose(kernel, (4, 3, 0, 1, 2)))))
    layer.bias.zero_()
  tx = _to_torch(np.moveaxis(x, -1, 1), device, t_dtype).requires_grad_(True)  # (B, C, F, H, W)
  tg = _to_torch(np.moveaxis(g, -1, 1), device, t_dtype)

  def jax_fn():
    return jax.block_until_ready(compiled(*args))

  def reference_fn():
    out = layer(tx)
    out.backward(tg)
    _sync(device)
    return out

  ours = np.asarray(jax.jit(conv)(*args[:2]), np.float32)
  theirs = np.moveaxis(reference_fn().detach().float().cpu().numpy(), 1, -1)
  return Runner(jax_fn, reference_fn, compile_s, *_memory(compiled),
                _relative(ours, theirs), dict(error_of="convolution output"), compiled)


def reference_available() -> bool:
  """Whether torch and diffusers import (the reference side of every case)."""
  try:
    import diffusers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True

