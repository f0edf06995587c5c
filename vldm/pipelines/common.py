"""What the sampling pipelines share: sampler settings, folder loading, noise, decoding, writing.

A pipeline holds flax modules and their params. Its conditioning encoders and sampling loop run as
one jitted function and the decoder as another (`CompiledCache`, kept on the pipeline object),
with the params passed as arguments rather than closed over (no weights baked into the
executable), so a second call with the same shapes and static settings compiles nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vldm import convert
from vldm import video_io
from vldm.diffusion import samplers
from vldm.diffusion.parameterization import Denoiser, Parameterization
from vldm.diffusion.schedules import DiscreteSchedule
from vldm.models import autoencoder as autoencoder_lib
from vldm.models import layers

Component = tuple  # (flax module, params)
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"


class PipelineError(ValueError):
  """A pipeline folder, component or input the pipelines cannot use; the message says why."""


# ---------------------------------------------------------------------------- sampler settings
@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Which sampler runs, on which schedule, with which options, for what the network predicts.

  `prediction_type` is a `vldm.diffusion.parameterization` name. A diffusers scheduler config with
  v-prediction and continuous timesteps (SVD) becomes 'v_edm': the network time is ¼ ln σ whatever
  the sampler, so every sampler (not only Euler) feeds an SVD UNet what it was trained on.
  """
  sampler: str = "euler"
  schedule: DiscreteSchedule = DiscreteSchedule()
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  prediction_type: str = "epsilon"

  def __post_init__(self):
    entry = samplers.get_sampler(self.sampler)  # unknown names list the registered ones
    unknown = sorted(set(self.options) - set(entry.defaults))
    if unknown:
      raise ValueError(f"Unknown option(s) {unknown} for sampler {self.sampler!r}; "
                       f"accepted: {sorted(entry.defaults)}.")
    Parameterization(self.prediction_type)  # validates the name
    object.__setattr__(self, "options", dict(self.options))

  @classmethod
  def from_scheduler_config(cls, config: Mapping[str, Any]) -> "SamplerSettings":
    """From a diffusers scheduler_config.json dict (`samplers.from_scheduler_config`)."""
    name, schedule, options, prediction_type = samplers.from_scheduler_config(dict(config))
    if prediction_type == "v_prediction" and config.get("timestep_type") == "continuous":
      prediction_type = "v_edm"
    return cls(name, schedule, options, prediction_type)

  def with_sampler(self, sampler: str, **options) -> "SamplerSettings":
    """Another sampler on the same schedule; keeps the current options the new one accepts."""
    accepted = samplers.get_sampler(sampler).defaults
    kept = {k: v for k, v in self.options.items() if k in accepted}
    return dataclasses.replace(self, sampler=sampler, options={**kept, **options})

  def plan(self, num_steps: int) -> samplers.Plan:
    return samplers.make_plan(self.sampler, self.schedule, num_steps, **self.options)


def as_sampler_settings(sampler) -> SamplerSettings:
  """SamplerSettings as given, or from a diffusers scheduler config dict (scheduler_config.json)."""
  if isinstance(sampler, SamplerSettings):
    return sampler
  if isinstance(sampler, Mapping):
    return SamplerSettings.from_scheduler_config(sampler)
  raise ValueError("sampler must be a SamplerSettings or a diffusers scheduler config dict; got "
                   f"{type(sampler).__name__}.")


def sample_latents(settings: SamplerSettings, network_fn: Callable, noise, num_steps: int,
                   rng=None, *, init_latents=None, strength: float = 1.0):
  """Runs the sampler from standard-normal `noise` with `network_fn(x, t) -> prediction` (the
  guided network); returns the final latents. With `init_latents`, SDEdit: they are noised to the
  step where the last ⌊num_steps·strength⌋ steps begin, and only those run. Traceable."""
  denoiser = Denoiser(network_fn, settings.prediction_type, settings.schedule)
  plan = settings.plan(num_steps)
  if init_latents is None:
    return samplers.run(plan, denoiser, noise, rng)
  plan = samplers.partial_plan(plan, strength)
  start = samplers.noise_to_start(plan, init_latents, noise)
  return samplers.run(plan, denoiser, noise, rng, start=start)


# ------------------------------------------------------------------------------------- folders
def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_model_index(folder: str) -> dict:
  """model_index.json of a diffusers pipeline folder ({} when the folder has none)."""
  if not os.path.isdir(folder):
    raise PipelineError(f"{folder} is not a folder; expected a diffusers pipeline folder "
                        f"(model_index.json and one subfolder per component).")
  path = os.path.join(folder, MODEL_INDEX)
  return read_json(path) if os.path.isfile(path) else {}


def listed(index: Mapping[str, Any], name: str) -> bool:
  """Whether model_index.json does not mark component `name` absent ([null, null])."""
  entry = index.get(name)
  return not (isinstance(entry, (list, tuple)) and all(v is None for v in entry))


def check_components(folder: str, pipeline: str, needs: Mapping[str, str]) -> dict:
  """Raises a PipelineError naming every missing subfolder and everything `pipeline` needs.

  `needs` maps a subfolder name to what it must hold. Returns the folder's model_index.json.
  A component that model_index.json lists as [null, null] (diffusers' "absent") is missing.
  """
  index = read_model_index(folder)
  missing = []
  for name in needs:
    if not listed(index, name) or not os.path.isdir(os.path.join(folder, name)):
      missing.append(name)
  if missing:
    wanted = "; ".join(f"{name}/ ({what})" for name, what in needs.items())
    raise PipelineError(f"{folder} has no {', '.join(m + '/' for m in missing)} component "
                        f"subfolder. The {pipeline} pipeline needs: {wanted}.")
  return index


def load_component(folder: str, name: str, accepted: Sequence[type], what: str) -> Component:
  """`load_diffusers(folder/name)`, checking that the module is one of `accepted`."""
  path = os.path.join(folder, name)
  try:
    module, params = convert.load_diffusers(path)
  except (convert.ConversionError, OSError) as e:
    raise PipelineError(f"Cannot load the {name}/ component of {folder}: {e}") from e
  if not isinstance(module, tuple(accepted)):
    found = getattr(module, "reference_class", type(module).__name__)
    raise PipelineError(f"{path} holds a {found}; the pipeline needs {what} there.")
  return module, params


def load_sampler_settings(folder: str, name: str = "scheduler") -> SamplerSettings:
  path = os.path.join(folder, name, SCHEDULER_CONFIG)
  if not os.path.isfile(path):
    raise PipelineError(f"{os.path.join(folder, name)} has no {SCHEDULER_CONFIG}.")
  try:
    return SamplerSettings.from_scheduler_config(read_json(path))
  except ValueError as e:
    raise PipelineError(f"Cannot use the scheduler in {path}: {e}") from e


# ----------------------------------------------------------------------------------------- rng
def example_keys(rng, batch: int):
  """One PRNG key per example, [batch]: from an int seed or a key (split), or [batch] keys as
  given. Per-example keys make each example's draws independent of the batch it is in."""
  if rng is None:
    raise ValueError("Pass rng (an int seed, a PRNG key, or one key per example) or the noise.")
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.key(int(rng))
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  single = rng.shape == () if typed else rng.shape == (2,)
  if single:
    return jax.random.split(rng, batch)
  if rng.shape[:1] != (batch,):
    raise ValueError(f"rng must be one key or {batch} keys (one per example); got shape "
                     f"{rng.shape}.")
  return rng


def draw_normal(keys, shape: Sequence[int], salt: int):
  """[B, *shape] standard normals, example b from fold_in(keys[b], salt)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, salt), tuple(shape),
                                              jnp.float32))(keys)


def sampler_key(keys):
  """The stochastic samplers' key (one for the batch, from the first example's key)."""
  return jax.random.fold_in(keys[0], 2**20)


def check_array(name: str, value, shape: Sequence[int]):
  value = jnp.asarray(value, jnp.float32)
  if value.shape != tuple(shape):
    raise ValueError(f"{name} must have shape {tuple(shape)}; got {value.shape}.")
  return value


# -------------------------------------------------------------------------------------- shapes
VAES = (autoencoder_lib.AutoencoderKL, autoencoder_lib.AutoencoderKLTemporalDecoder)


def size_multiple(vae: nn.Module, unet: nn.Module) -> tuple[int, int]:
  """(pixels per latent, the multiple H and W must be): VAE factor × the UNet's 2**(levels−1)."""
  vae_factor = autoencoder_lib.downsampling_factor(vae.block_out_channels)
  return vae_factor, vae_factor * 2 ** (len(unet.block_out_channels) - 1)


def check_size(height: int, width: int, vae: nn.Module, unet: nn.Module,
               low_res_factor: int = 1) -> None:
  """H and W fit the VAE × UNet downsampling (× low_res_factor: a cascade whose base samples at
  1/low_res_factor of them)."""
  vae_factor, multiple = size_multiple(vae, unet)
  base = f" at 1/{low_res_factor} of the size" if low_res_factor > 1 else ""
  multiple *= low_res_factor
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
      raise ValueError(
          f"{name} must be a positive multiple of {multiple} (the VAE downsamples by {vae_factor} "
          f"and the UNet by {multiple // vae_factor // low_res_factor} more{base}); got "
          f"height={height}, width={width}.")


# ------------------------------------------------------------------------- encoding, decoding
def encode_frames(vae: nn.Module, vae_params, frames):
  """Frames [B,F,H,W,3] in [0,1] → latents [B,F,h,w,c] as the sampler sees them: the posterior
  mode (minus shift_factor) × scaling_factor, the inverse of `decode_latents`. Traceable."""
  b, f = frames.shape[:2]
  pixels = frames.reshape((b * f,) + frames.shape[2:]).astype(jnp.float32) * 2 - 1
  latents = vae.apply({"params": vae_params}, pixels, method="encode").mode()
  shift = getattr(vae, "shift_factor", None)
  if shift is not None:
    latents = latents - shift
  return (latents * vae.scaling_factor).reshape((b, f) + latents.shape[1:])


def decode_latents(vae: nn.Module, vae_params, latents, decode_chunk_size: Optional[int] = None):
  """Video latents [B,F,h,w,c] (as sampled, i.e. × scaling_factor) → frames [B,F,H,W,3] in [0,1].

  The temporal decoder decodes each clip k frames at a time (`decode_chunk_size`, as SVD's
  pipeline); `AutoencoderKL` decodes frame by frame, k frames per sequential step. Traceable.
  """
  latents = latents / vae.scaling_factor
  shift = getattr(vae, "shift_factor", None)
  if shift is not None:
    latents = latents + shift
  variables = {"params": vae_params}
  if isinstance(vae, autoencoder_lib.AutoencoderKLTemporalDecoder):
    video = vae.apply(variables, latents, decode_chunk_size, method="decode")
  else:
    b, f = latents.shape[:2]
    flat = latents.reshape((b * f,) + latents.shape[2:])
    chunk = b * f if decode_chunk_size is None else max(1, min(decode_chunk_size, b * f))
    pad = -(b * f) % chunk
    flat = jnp.concatenate([flat, jnp.zeros((pad,) + flat.shape[1:], flat.dtype)]) if pad else flat
    chunks = flat.reshape((-1, chunk) + flat.shape[1:])
    decode = lambda z: vae.apply(variables, z, method="decode")
    images = jax.lax.map(decode, chunks) if chunks.shape[0] > 1 else decode(chunks[0])[None]
    images = images.reshape((-1,) + images.shape[2:])[:b * f]
    video = images.reshape((b, f) + images.shape[1:])
  # diffusers' postprocess: denormalise from [-1, 1] and clamp.
  return jnp.clip(video.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


# --------------------------------------------------------------------- low-res conditioning
def low_res_condition(latents, noise, alpha_bar, factor: int):
  """A Video LDM upsampler's conditioning: low-resolution latents [B,F,h,w,c] (scaled, as a
  sampler returns them) noised to ᾱ — conditioning augmentation, so that the upsampler learns not
  to copy the low-resolution model's small errors — and nearest-upsampled ×factor to the
  resolution it samples. Concatenated to the UNet input channels. Traceable."""
  noisy = jnp.sqrt(alpha_bar) * latents + jnp.sqrt(1 - alpha_bar) * noise
  return layers.upsample_nearest(noisy, factor)


# ------------------------------------------------------------------------------- compile cache
class CompiledCache:
  """Jitted functions kept on a pipeline object, one per static setting.

  jax.jit caches executables per input shape on each jitted function, so holding the function
  (rather than building a new closure per call) is what makes the second call free. `traces`
  counts Python traces (= compilations), for tests and logs.
  """

  def __init__(self):
    self._functions: dict = {}
    self.traces = 0

  def get(self, key, fn: Callable) -> Callable:
    """The jitted `fn` stored under `key` (jitted on first use)."""
    if key not in self._functions:

      def counted(*args, **kwargs):
        self.traces += 1
        return fn(*args, **kwargs)

      self._functions[key] = jax.jit(counted)
    return self._functions[key]

  def decoder(self, vae: nn.Module, decode_chunk_size: Optional[int]) -> Callable:
    """Jitted `(vae_params, latents) -> frames in [0, 1]` (see `decode_latents`)."""
    return self.get(("decode", decode_chunk_size), functools.partial(
        decode_latents, vae, decode_chunk_size=decode_chunk_size))


def compiled_cache_field():
  return dataclasses.field(default_factory=CompiledCache, init=False, repr=False, compare=False)


# -------------------------------------------------------------------------------------- output
def write_clips(frames, out_dir: str, names: Sequence[str], *, fps: float = 8.0) -> list[dict]:
  """Writes frames [N,F,H,W,3] in [0,1] as OUT/<name>.gif and .mp4; returns [{gif, mp4}]."""
  frames = np.asarray(frames)
  if frames.ndim != 5 or len(names) != frames.shape[0]:
    raise ValueError(f"Expected frames [N,F,H,W,3] with N = {len(names)} names; got "
                     f"{frames.shape}.")
  written = []
  for name, clip in zip(names, frames):
    path = os.path.join(out_dir, name)
    written.append(dict(gif=video_io.write_gif(clip, path + ".gif", fps=fps),
                        mp4=video_io.write_mp4(clip, path + ".mp4", fps=fps)))
  return written
