"""LoRA adapters as a parameter tree of their own: which modules, initialisation, merging.

A vldm model's weights are named after the PyTorch module they mirror (`vldm.convert.core`): the
kernel at ('down_blocks_0', …, 'attn1', 'to_q', 'kernel') is the weight of the diffusers module
`down_blocks.0.….attn1.to_q`. `weight_modules(params)` lists these names (Dense and convolution
kernels: every 'kernel' leaf of two or more axes); `select` picks the targets by name patterns.

Adapters mirror the base tree: a targeted module at path P gets
`{'lora_A': {'kernel': A}, 'lora_B': {'kernel': B}}` at P, in Flax layout,
  Dense kernel [in, out]:              A [in, r],          B [r, out]
  convolution kernel [*k, in, out]:    A [*k, in, r],      B [1, …, 1, r, out]
and the merged kernel is W + scale · A·B (contracting r), scale = alpha / r. In PyTorch layout
(`vldm.convert.core.flax_to_torch`) these are PEFT's `….to_q.lora_A.weight` [r, in, *k] and
`….to_q.lora_B.weight` [out, r, 1, …], which is how `vldm.convert.lora` writes them.
"""

from __future__ import annotations

import difflib
import re
from typing import Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vldm.convert import core

LORA_A, LORA_B = "lora_A", "lora_B"
# PEFT's default `target_modules` of diffusers' LoRA training scripts: the attention projections.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
Patterns = Union[str, Sequence[str]]


def module_name(path: Sequence[str]) -> str:
  """('down_blocks_0', 'attentions_0', …, 'to_out_0') → 'down_blocks.0.attentions.0.….to_out.0'."""
  return core.flax_path_to_torch_key(tuple(path) + ("kernel",))[: -len(".weight")]


def weight_modules(params) -> dict[str, tuple]:
  """{diffusers module name: module path} of every Dense / convolution kernel in `params`
  (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    if path[-1] == "kernel" and len(np.shape(leaf)) >= 2:
      out[module_name(path[:-1])] = path[:-1]
  return out


def matches(name: str, patterns: Patterns) -> bool:
  """PEFT's `target_modules` rule for a list, plus regexes: a pattern selects a module whose name
  equals it or ends with '.' + it (`to_q`, `to_out.0`), or that it fully matches as a regular
  expression (`.*temporal.*attn.*to_(q|k|v|out.0)`)."""
  if isinstance(patterns, str):
    patterns = (patterns,)
  for pattern in patterns:
    if name == pattern or name.endswith("." + pattern):
      return True
    try:
      if re.fullmatch(pattern, name):
        return True
    except re.error:  # a plain name with regex metacharacters: the suffix rule above decided
      pass
  return False


def select(params, targets: Patterns, *, what: str = "the model") -> dict[str, tuple]:
  """{name: path} of the modules `targets` selects (see `matches`); ValueError when none is."""
  modules = weight_modules(params)
  chosen = {name: path for name, path in modules.items() if matches(name, targets)}
  if not chosen:
    names = sorted(modules)
    wanted = (targets,) if isinstance(targets, str) else tuple(targets)
    # Patterns are mostly module suffixes ('to_q', 'to_out.0'): suggest among those too.
    suffixes = {".".join(n.split(".")[-k:]) for n in names for k in (1, 2)}
    candidates = sorted(suffixes | set(names))
    close = sorted(
        {c for t in wanted for c in difflib.get_close_matches(t, candidates, n=3, cutoff=0.6)}
    )
    raise ValueError(
        f"The LoRA targets {list(wanted)} select no Dense or convolution module of {what}"
        + (f" (closest names: {', '.join(close)})" if close else "")
        + f"; it has {len(names)}, e.g. {', '.join(names[:6])}."
    )
  return chosen


def adapter_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple, tuple]:
  """(A shape, B shape) of a rank-`rank` adapter of a kernel [*k, in, out]."""
  *window, fan_in, fan_out = kernel_shape
  return tuple(window) + (fan_in, rank), (1,) * len(window) + (rank, fan_out)


def init_adapters(rng, params, modules: Mapping[str, tuple], rank: int):
  """Rank-`rank` adapters of `modules` ({name: path}, e.g. from `select`) in `params` (arrays or
  ShapeDtypeStructs): A as PEFT draws it by default (Kaiming-uniform with a = √5, i.e.
  U(±1/√fan_in)), B zero, so the adapted model starts as the base. Traceable (jit, eval_shape)."""
  if rank < 1:
    raise ValueError(f"A LoRA rank must be ≥ 1, got {rank}.")
  flat = traverse_util.flatten_dict(params)
  out = {}
  for i, name in enumerate(sorted(modules)):
    path = modules[name]
    a_shape, b_shape = adapter_shapes(np.shape(flat[path + ("kernel",)]), rank)
    bound = 1.0 / np.sqrt(np.prod(a_shape[:-1]))
    key = jax.random.fold_in(rng, i)
    out[path + (LORA_A, "kernel")] = jax.random.uniform(key, a_shape, jnp.float32, -bound, bound)
    out[path + (LORA_B, "kernel")] = jnp.zeros(b_shape, jnp.float32)
  return traverse_util.unflatten_dict(out)


def adapters_of(adapters) -> dict[tuple, dict]:
  """{module path: {'lora_A': A, 'lora_B': B}} of an adapter tree."""
  out: dict[tuple, dict] = {}
  for path, leaf in traverse_util.flatten_dict(adapters).items():
    if len(path) < 3 or path[-2] not in (LORA_A, LORA_B) or path[-1] != "kernel":
      raise ValueError(
          f"Not a LoRA adapter leaf: {'/'.join(path)} (expected …/lora_A|lora_B/kernel)."
      )
    out.setdefault(path[:-2], {})[path[-2]] = leaf
  for path, pair in out.items():
    if len(pair) != 2:
      raise ValueError(
          f"The adapter at {'/'.join(path)} has {sorted(pair)} but needs lora_A and lora_B."
      )
  return out


def rank_of(pair: Mapping) -> int:
  return int(np.shape(pair[LORA_A])[-1])


def delta(a, b):
  """A·B contracted over the rank: the kernel-shaped update (unscaled), in float32."""
  b = jnp.reshape(b, b.shape[-2:])
  return jnp.einsum(
      "...r,ro->...o",
      a.astype(jnp.float32),
      b.astype(jnp.float32),
      precision=jax.lax.Precision.HIGHEST,  # TPU matmuls default to bf16 passes
  )


def merge(params, adapters, scale: float):
  """`params` with every adapted kernel W replaced by W + scale · A·B (scale = alpha / r times
  any user scale); the rest unchanged. Traceable: the LoRA train step runs it."""
  flat = traverse_util.flatten_dict(params)
  for path, pair in adapters_of(adapters).items():
    key = path + ("kernel",)
    if key not in flat:
      raise ValueError(f"The adapter at {'/'.join(path)} has no kernel to adapt in the model.")
    kernel = flat[key]
    flat[key] = (kernel.astype(jnp.float32) + scale * delta(pair[LORA_A], pair[LORA_B])).astype(
        kernel.dtype
    )
  return traverse_util.unflatten_dict(flat)
