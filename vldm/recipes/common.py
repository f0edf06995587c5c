"""What the shapes recipe's tasks share: host initialisation, captioned data, frozen sub-models."""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vldm.data import pipeline as pipeline_lib
from vldm.data import shapes
from vldm.data import sources
from vldm.models import tokenizer as tokenizer_lib
from vldm.train import checkpoint as checkpoint_lib
from vldm.train import sharding as sharding_lib


# ------------------------------------------------------------------------------ initialisation
def host_init(abstract_params, seed: int, constants: Optional[Mapping[str, float]] = None):
  """Parameters drawn on the host with flax's default initialisers, chosen by leaf name.

  XLA:CPU takes 10-30 s to compile a flax `init` of a small UNet (hundreds of random-number
  kernels); these parameters enter the trainer's jitted init as constants and compile in well
  under a second. Leaves: 'kernel' → lecun normal (truncated at 2σ, fan-in = all axes but the
  last), 'embedding' → normal with std 1/√features, 'scale' → 1, every other name → 0 unless
  `constants` gives its value (e.g. the α blenders' 'mix_factor'). Only for small models: the
  whole tree exists on the host (`config.host_init=False` uses the model's own init instead).
  """
  constants = dict(constants or {})
  rng = np.random.default_rng(seed)
  flat = {}
  for path, leaf in traverse_util.flatten_dict(abstract_params).items():
    shape, dtype, name = tuple(leaf.shape), leaf.dtype, path[-1]
    if name == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      draw = rng.standard_normal(shape)
      while np.any(np.abs(draw) > 2):  # truncated normal, as jax.random.truncated_normal
        bad = np.abs(draw) > 2
        draw[bad] = rng.standard_normal(int(bad.sum()))
      value = draw * (np.sqrt(1.0 / fan_in) / 0.87962566103423978)
    elif name == "embedding":
      value = rng.standard_normal(shape) / np.sqrt(shape[-1])
    elif name == "scale":
      value = np.ones(shape)
    else:
      value = np.full(shape, constants.get(name, 0.0))
    flat[path] = jnp.asarray(value, dtype)
  return traverse_util.unflatten_dict(flat)


def task_init(task, init: Callable, rng, constants: Optional[Mapping[str, float]] = None):
  """`init(rng)`, or with `task.config.host_init` the same tree drawn by `host_init`.

  The shapes are traced once per task: the trainer traces `init_params` twice (the shardings'
  `eval_shape`, then the jitted init) and tracing a UNet's init costs seconds on CPU.
  """
  if not task.config.host_init:
    return init(rng)
  if getattr(task, "_param_shapes", None) is None:
    task._param_shapes = jax.eval_shape(init, rng)
  return host_init(task._param_shapes, task.config.seed, constants)


# ------------------------------------------------------------------------------------- text
def shapes_tokenizer(max_length: int = 8) -> tokenizer_lib.WordTokenizer:
  """The file-free word tokenizer of the shapes captions (15 words + pad, bos, unk, eos)."""
  texts = [
      shapes.video_caption(c, s, d)
      for c in shapes.COLORS
      for s in shapes.SHAPES
      for d in shapes.DIRECTIONS
  ]
  return tokenizer_lib.WordTokenizer(texts, max_length=max_length)


def all_prompts() -> list[str]:
  """Every video prompt: 6 colors × 3 shapes × 4 directions = 72."""
  return [
      shapes.video_caption(c, s, d)
      for c in shapes.COLORS
      for s in shapes.SHAPES
      for d in shapes.DIRECTIONS
  ]


def sample_all_prompts(pipe, num_samples: int, seed: int, batch_size: int, **kwargs):
  """(prompts, seeds, clips): every prompt (`all_prompts`) num_samples times through `pipe`, clip
  k from seed + k, in batches of one size (padded with the first prompt: one compilation)."""
  prompts = [p for p in all_prompts() for _ in range(num_samples)]
  seeds = [seed + k for k in range(len(prompts))]
  clips = []
  for i in range(0, len(prompts), batch_size):
    chunk, chunk_seeds = prompts[i : i + batch_size], seeds[i : i + batch_size]
    pad = batch_size - len(chunk)
    keys = jax.vmap(jax.random.key)(jnp.asarray(chunk_seeds + chunk_seeds[:1] * pad, jnp.uint32))
    frames = pipe(chunk + chunk[:1] * pad, rng=keys, **kwargs)
    clips.append(np.asarray(frames[: len(chunk)]))
  return prompts, seeds, np.concatenate(clips)


# ------------------------------------------------------------------------------------- data
_METADATA = ("index", "held_out")


class CaptionedData:
  """A data Pipeline whose batches hold only global arrays: the pixels ('image' or 'video'),
  'fps' (and 'motion' where the data has motion scores) for micro-conditioning, 'input_ids' (the
  tokenized captions, with a tokenizer; '' where dropped for guidance) and 'step', the index of
  the global batch (broadcast over the batch) for schedules inside the loss, e.g. when the
  adversarial loss starts. The state is the pipeline's, so a resumed run continues exactly."""

  def __init__(self, pipeline: pipeline_lib.Pipeline, tokenizer=None):
    self.pipeline, self.tokenizer = pipeline, tokenizer

  def __iter__(self):
    return self

  def __next__(self):
    p = self.pipeline
    state = p.get_state()
    step = state["epoch"] * p.steps_per_epoch + state["position"]
    batch = next(p)
    captions = batch.pop("caption")
    # Pixels, or a latent cache's fields (whatever the batch holds besides its metadata).
    out = {k: v for k, v in batch.items() if k not in _METADATA}
    local = len(captions)
    if self.tokenizer is not None:
      out["input_ids"] = self._global(self.tokenizer(captions))
    out["step"] = self._global(np.full((local,), step, np.int32))
    return out

  def _global(self, local):
    p = self.pipeline
    if p.sharding is None:
      return local
    return pipeline_lib.to_global(local, p.sharding, p.global_batch_size)

  def get_state(self) -> dict:
    return self.pipeline.get_state()

  def set_state(self, state: dict) -> None:
    self.pipeline.set_state(state)


def make_data(data_config, sharding, process_index, process_count, tokenizer=None):
  """The training stream of `data_config` (vldm.data.config) as a CaptionedData."""
  pipeline = sources.make_pipeline(
      data_config,
      train=True,
      sharding=sharding,
      process_index=process_index,
      process_count=process_count,
  )
  return CaptionedData(pipeline, tokenizer)


# ---------------------------------------------------------------------------- frozen models
def load_stage_params(workdir: str, mesh=None):
  """Another stage's newest parameters (EMA where kept), to use frozen."""
  if mesh is None:  # the trainer's kind of mesh (Auto axes): arrays on both can meet in one jit
    mesh = sharding_lib.make_mesh((("data", -1),))
  return checkpoint_lib.load_params(workdir, mesh, rules=((".*", "replicate"),))
