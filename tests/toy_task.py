"""A small self-contained task for the trainer's tests: a conv denoiser on coloured squares.

Configs name it by import path, 'toy_task:ToyTask' (tests/ is on sys.path under pytest, as for
`import parity`); its config is tests/configs_tiny.py.

It exercises every part of the trainer interface at test size: a class-conditioned denoiser built
from the shared layers, a frozen sub-model (a fixed class-embedding table standing in for a text
encoder), optional frozen layers (`toy.freeze`, a regex on parameter paths, like the frozen
spatial layers of the video stage), an index-based resumable data stream, a `grow` init transform
(a deeper model initialised from a shallower one) and a sampler whose denoising trajectory is
written as a GIF per class "prompt".
"""

from __future__ import annotations

import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vldm.models import layers
from vldm.train import tasks as tasks_lib

# Colours of the toy classes (the shapes palette's first entries), in [-1, 1].
PALETTE = np.array([(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40)], np.float32)
SIGMA_MIN, SIGMA_MAX = 0.02, 2.0


def remat_policy(name: Optional[str]):
  """A `jax.checkpoint_policies` entry by name (None: no rematerialisation)."""
  if name is None:
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy):
    raise ValueError(
        f"Unknown remat policy {name!r}; see jax.checkpoint_policies "
        "(e.g. 'nothing_saveable', 'dots_saveable', 'everything_saveable')."
    )
  return policy


class ToyDenoiser(nn.Module):
  """conv_in → ResnetBlock2D × depth (time + class embedding) → GN → SiLU → conv_out → ε."""

  features: int = 16
  depth: int = 2
  groups: int = 4
  remat_policy: Optional[str] = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, sigma, context):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    temb = layers.timestep_embedding(jnp.log(sigma) * 4.0, self.features)
    temb = layers.TimestepEmbedding(self.features, name="time_embedding", **kw)(temb)
    temb = temb + context.astype(temb.dtype)
    h = layers.conv(self.features, 3, name="conv_in", **kw)(x)
    h = nn.with_logical_constraint(h, ("batch", "height", "width", "embed"))
    block = layers.ResnetBlock2D
    if self.remat_policy is not None:
      block = nn.remat(block, policy=remat_policy(self.remat_policy))
    for i in range(self.depth):
      h = block(groups=self.groups, eps=1e-5, name=f"blocks_{i}", **kw)(h, temb)
    h = nn.silu(layers.GroupNorm(self.groups, 1e-5, name="norm_out", **kw)(h))
    return layers.conv(x.shape[-1], 3, name="conv_out", **kw)(h).astype(jnp.float32)


def make_examples(seed: int, indices: np.ndarray, resolution: int, num_classes: int):
  """Example `i` is a function of (seed, i) only: a coloured square on black, in [-1, 1]."""
  images = np.full((len(indices), resolution, resolution, 3), -1.0, np.float32)
  labels = np.zeros((len(indices),), np.int32)
  for row, index in enumerate(indices):
    rng = np.random.default_rng([seed, int(index)])
    label = int(rng.integers(num_classes))
    size = int(rng.integers(resolution // 4, resolution // 2 + 1))
    y, x = rng.integers(0, resolution - size + 1, size=2)
    images[row, y : y + size, x : x + size] = PALETTE[label % len(PALETTE)] / 127.5 - 1.0
    labels[row] = label
  return images, labels


class ToyData:
  """Global batch `b` holds examples b·B … b·B+B−1; each device builds only its own rows.

  The state is the index of the next global batch, the same on every process, so a resumed run
  continues the stream exactly, on any number of processes or devices.
  """

  def __init__(self, config, sharding):
    self.seed, self.sharding = config.seed, sharding
    self.batch_size = config.batch_size
    self.resolution, self.num_classes = config.toy.resolution, config.toy.num_classes
    self.nan_batch = config.toy.nan_batch
    self.next_batch = 0

  def __iter__(self):
    return self

  def __next__(self):
    index, self.next_batch = self.next_batch, self.next_batch + 1
    shape = (self.batch_size, self.resolution, self.resolution, 3)
    cache = {}

    def rows(part, slices):  # this device's rows of the global batch
      span = range(*slices[0].indices(self.batch_size))
      if span not in cache:
        indices = index * self.batch_size + np.asarray(span, np.int64)
        cache[span] = make_examples(self.seed, indices, self.resolution, self.num_classes)
      image, label = cache[span]
      if part == "image" and self.nan_batch is not None and index == self.nan_batch:
        image = np.full_like(image, np.nan)  # a corrupt batch, for the non-finite-loss check
      return image if part == "image" else label

    image = jax.make_array_from_callback(shape, self.sharding, lambda s: rows("image", s))
    label = jax.make_array_from_callback(shape[:1], self.sharding, lambda s: rows("label", s))
    return {"image": image, "label": label}

  def get_state(self) -> dict:
    return {"next_batch": self.next_batch}

  def set_state(self, state: dict) -> None:
    self.next_batch = int(state["next_batch"])


class ToyTask(tasks_lib.Task):
  """ε-prediction denoising of coloured squares with σ log-uniform in [0.02, 2]."""

  def __init__(self, config):
    super().__init__(config)
    toy = config.toy
    self.model = ToyDenoiser(
        features=toy.features,
        depth=toy.depth,
        groups=toy.groups,
        remat_policy=config.remat_policy,
        dtype=jnp.dtype(config.dtype),
    )
    self.resolution, self.num_classes = toy.resolution, toy.num_classes
    self._sampler = None

  def init_params(self, rng):
    image = jnp.zeros((1, self.resolution, self.resolution, 3))
    context = jnp.zeros((1, self.model.features))
    return self.model.init(rng, image, jnp.ones((1,)), context)["params"]

  def init_frozen(self, mesh):
    # Stands in for a pretrained text encoder: a fixed table, never trained.
    rng = np.random.default_rng(1234)
    return {
        "class_table": rng.normal(size=(self.num_classes, self.model.features)).astype(np.float32)
    }

  def trainable_labels(self, params):
    pattern = self.config.toy.freeze
    if not pattern:
      return None
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: tasks_lib.FREEZE if re.search(pattern, "/".join(k)) else tasks_lib.TRAIN for k in flat}
    )

  def _denoise(self, params, frozen, noisy, sigma, label):
    context = frozen["class_table"][label]
    scaled = noisy / jnp.sqrt(1.0 + sigma**2)[:, None, None, None]
    return self.model.apply({"params": params}, scaled, sigma, context)

  def loss_fn(self, params, frozen, batch, rng):
    image, label = batch["image"], batch["label"]
    rng_sigma, rng_noise = jax.random.split(rng)
    u = jax.random.uniform(rng_sigma, image.shape[:1])
    sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** u
    noise = jax.random.normal(rng_noise, image.shape)
    noisy = image + sigma[:, None, None, None] * noise
    prediction = self._denoise(params, frozen, noisy, sigma, label)
    loss = jnp.mean((prediction - noise) ** 2)
    return loss, {"sigma_mean": jnp.mean(sigma)}

  def make_data(self, sharding, process_index, process_count):
    return ToyData(self.config, sharding)

  def init_transforms(self):
    return {"grow": grow}

  def sample_fn(self, params, frozen, rng):
    """{'prompt_<class>': the denoising trajectory of x0 estimates, (steps, H, W, 3) in [0, 1]}."""
    if self._sampler is None:
      self._sampler = jax.jit(self._sample)
    return self._sampler(params, frozen, rng)

  def eval_fn(self, params, frozen, rng):
    """{'sample_mean': the final samples' mean pixel}: a metric of samples, as config.eval's are."""
    final = {k: v[-1] for k, v in self.sample_fn(params, frozen, rng).items()}
    return {"sample_mean": float(np.mean([np.asarray(v) for v in final.values()]))}

  def _sample(self, params, frozen, rng, steps: int = 8):
    label = jnp.arange(self.num_classes)
    shape = (self.num_classes, self.resolution, self.resolution, 3)
    sigmas = jnp.concatenate([jnp.geomspace(SIGMA_MAX, SIGMA_MIN, steps), jnp.zeros((1,))])

    def step(x, i):  # Euler steps of the probability-flow ODE, dx/dσ = ε̂
      eps = self._denoise(params, frozen, x, jnp.full((shape[0],), sigmas[i]), label)
      x0 = x - sigmas[i] * eps
      return x + (sigmas[i + 1] - sigmas[i]) * eps, jnp.clip((x0 + 1.0) / 2.0, 0.0, 1.0)

    _, frames = jax.lax.scan(step, jax.random.normal(rng, shape) * SIGMA_MAX, jnp.arange(steps))
    return {f"prompt_{c}": frames[:, c] for c in range(self.num_classes)}


def grow(source, target):
  """A deeper toy model from a shallower one: shared layers copied, new blocks keep their init."""
  flat_src = traverse_util.flatten_dict(source)
  flat_tgt = traverse_util.flatten_dict(target)
  unused = [k for k in flat_src if k not in flat_tgt or flat_src[k].shape != flat_tgt[k].shape]
  if unused:
    raise ValueError(
        f"grow: the source parameters {['/'.join(k) for k in unused][:5]} have no "
        "place in the target model (is the target shallower or narrower?)."
    )
  return tasks_lib.copy_matching(source, target)
