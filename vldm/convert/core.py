"""PyTorch state dicts ↔ Flax parameter trees, by name.

vldm's modules are named after the diffusers / transformers state-dict keys, so the mapping is
mechanical: `down_blocks.0.resnets.1.conv1.weight` ↔ ('down_blocks_0', 'resnets_1', 'conv1',
'kernel'). The Flax parameter *template* (shapes from `jax.eval_shape(module.init, ...)`) decides
each leaf's layout:

  kernel, 4-D   PyTorch Conv2d (O, I, kh, kw)    → (kh, kw, I, O)
  kernel, 5-D   PyTorch Conv3d (O, I, t, kh, kw) → (t, kh, kw, I, O)
  kernel, 2-D   PyTorch Linear (out, in)         → (in, out)
  scale         norm weight                      → as is
  embedding     nn.Embedding weight              → as is
  anything else (bias, mix_factor, class_embedding, ...) → as is

vldm's own files (the 'VldmUNet' folder format, temporal-layer files) skip the renaming: their keys
are the Flax paths joined by '/', in Flax layout (`params_to_vldm_state` / `vldm_state_to_params`).
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

import numpy as np
from flax import traverse_util

# Module names whose PyTorch spelling itself ends in `_<digit>`: they are not list indices.
_LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_TORCH_TO_FLAX_AXES = {4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0), 2: (1, 0)}
_FLAX_TO_TORCH_AXES = {n: tuple(np.argsort(axes)) for n, axes in _TORCH_TO_FLAX_AXES.items()}


class ConversionError(ValueError):
  """A weights file or folder that does not fit the model it is loaded into."""


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
  """'a.0.b.weight' → ('a_0', 'b', 'weight'): numeric segments join the name before them."""
  parts = key.split(".")
  path: list[str] = []
  for part in parts:
    if part.isdigit() and path:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  return tuple(path)


def flax_path_to_torch_key(path: Iterable[str], literal_names: Iterable[str] = ()) -> str:
  """The inverse of `torch_key_to_flax_path`, with Flax leaf names back to PyTorch's.

  `literal_names`: module names whose `_<digit>` ending is part of the PyTorch name (e.g.
  torchvision's `branch3x3_1`), not a list index.
  """
  path = list(path)
  leaf = path.pop()
  parts = []
  literal = _LITERAL_NAMES.union(literal_names)
  for name in path:
    match = re.fullmatch(r"(.+)_(\d+)", name)
    if match and name not in literal:
      parts.extend(match.groups())
    else:
      parts.append(name)
  parts.append("weight" if leaf in _WEIGHT_LEAVES else leaf)
  return ".".join(parts)


def _flax_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == "kernel" and value.ndim in _TORCH_TO_FLAX_AXES:
    return np.transpose(value, _TORCH_TO_FLAX_AXES[value.ndim])
  return value


def _torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
  if leaf_name == "kernel" and value.ndim in _FLAX_TO_TORCH_AXES:
    return np.ascontiguousarray(np.transpose(value, _FLAX_TO_TORCH_AXES[value.ndim]))
  return value


def _list_names(names, limit: int = 20) -> str:
  names = sorted(names)
  more = f" … and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    template,
    *,
    ignore: Iterable[str] = (),
    literal_names: Iterable[str] = (),
):
  """Builds a Flax parameter tree shaped like `template` from a PyTorch-named state dict.

  `template` is a nested dict whose leaves have `.shape` (e.g. from `jax.eval_shape`). `ignore`
  holds regular expressions of PyTorch keys to drop (buffers such as position_ids);
  `literal_names` as in `flax_path_to_torch_key`. Missing, unexpected and mis-shaped weights are
  all listed by name in one error.
  """
  ignore = [re.compile(p) for p in ignore]
  literal_names = frozenset(literal_names)
  flat_template = traverse_util.flatten_dict(template)
  to_key = lambda path: flax_path_to_torch_key(path, literal_names)
  by_torch_key = {to_key(path): path for path in flat_template}
  out, unexpected, wrong_shape = {}, [], []
  for key, value in state.items():
    if any(p.fullmatch(key) for p in ignore):
      continue
    path = by_torch_key.get(key)
    if path is None:
      unexpected.append(key)
      continue
    value = _flax_layout(path[-1], np.asarray(value))
    want = tuple(flat_template[path].shape)
    if value.shape != want:
      wrong_shape.append(f"{key}: file {value.shape} vs model {want}")
      continue
    out[path] = value
  missing = [to_key(p) for p in flat_template if p not in out]
  missing = [k for k in missing if k not in {w.split(":")[0] for w in wrong_shape}]
  _raise_misfits(
      "The weights do not fit the model",
      (
          ("missing weights", missing),
          ("unexpected weights", unexpected),
          ("shape mismatches", wrong_shape),
      ),
  )
  return traverse_util.unflatten_dict(out)


def _raise_misfits(headline: str, kinds) -> None:
  """ConversionError listing each non-empty (label, names) kind of misfit, or nothing."""
  problems = [f"{label} ({len(names)}): {_list_names(names)}" for label, names in kinds if names]
  if problems:
    raise ConversionError(f"{headline}: " + "; ".join(problems) + ".")


def flax_to_torch(params) -> dict[str, np.ndarray]:
  """A Flax parameter tree → a PyTorch-named, PyTorch-laid-out dict of float32 numpy arrays."""
  state = {}
  for path, value in traverse_util.flatten_dict(params).items():
    state[flax_path_to_torch_key(path)] = _torch_layout(path[-1], np.asarray(value, np.float32))
  return state


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays, with a clear error for missing or broken files."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise ConversionError(f"No weights file at {path}.")
  try:
    return load_file(path)
  except TypeError:  # bfloat16 has no numpy dtype: read through JAX, keep float32 on the host
    from safetensors.flax import load_file as load_jax  # pylint: disable=g-import-not-at-top

    return {k: np.asarray(v, np.float32) for k, v in load_jax(path).items()}
  except Exception as e:  # safetensors raises its own error types, with terse messages
    raise ConversionError(
        f"Cannot read the safetensors file {path} ({os.path.getsize(path)} bytes): "
        f"it is truncated or not a safetensors file ({e})."
    ) from e


def write_safetensors(
    state: Mapping[str, np.ndarray], path: str, metadata: Mapping[str, str] | None = None
) -> None:
  """Writes numpy arrays; `metadata` (str → str) goes in the header (default {'format': 'pt'})."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  metadata = {"format": "pt"} if metadata is None else dict(metadata)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata=metadata)


def read_safetensors_metadata(path: str) -> dict[str, str]:
  """The str → str metadata of a .safetensors header ({} when it has none)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(path):
    raise ConversionError(f"No weights file at {path}.")
  try:
    with safe_open(path, framework="np") as f:
      return dict(f.metadata() or {})
  except Exception as e:  # safetensors raises its own error types, with terse messages
    raise ConversionError(
        f"Cannot read the safetensors file {path}: it is truncated or not a "
        f"safetensors file ({e})."
    ) from e


# ---- vldm's own layout: parameter paths joined by '/', Flax layout -----------------------------
PATH_SEPARATOR = "/"


def params_to_vldm_state(params) -> dict[str, np.ndarray]:
  """A Flax parameter tree → {'down_blocks_0/resnets_0/…/kernel': float32 array}, Flax layout.

  The keys are vldm's own parameter paths, so the mapping needs no model and is exact.
  """
  return {
      PATH_SEPARATOR.join(path): np.asarray(value, np.float32)
      for path, value in traverse_util.flatten_dict(params).items()
  }


def vldm_state_to_params(state: Mapping[str, np.ndarray], template=None):
  """The inverse of `params_to_vldm_state`. With a `template` (nested dict of leaves with
  `.shape`), missing, unexpected and mis-shaped weights are all listed by path in one error."""
  flat = {tuple(key.split(PATH_SEPARATOR)): np.asarray(value) for key, value in state.items()}
  if template is not None:
    check_fits(flat, traverse_util.flatten_dict(template), source="weights", target="model")
  return traverse_util.unflatten_dict(flat)


def check_fits(
    flat: Mapping[tuple, np.ndarray],
    flat_template: Mapping[tuple, object],
    *,
    source: str,
    target: str,
    need_all: bool = True,
) -> None:
  """Raises ConversionError listing the paths of `flat` that `flat_template` lacks or shapes
  differently and, with `need_all`, the template paths that `flat` does not provide."""
  join = PATH_SEPARATOR.join
  missing = [join(p) for p in flat_template if p not in flat] if need_all else []
  unexpected = [join(p) for p in flat if p not in flat_template]
  wrong_shape = [
      f"{join(p)}: {source} {tuple(v.shape)} vs {target} {tuple(flat_template[p].shape)}"
      for p, v in flat.items()
      if p in flat_template and tuple(v.shape) != tuple(flat_template[p].shape)
  ]
  _raise_misfits(
      f"The {source} do not fit the {target}",
      (
          (f"missing in the {source}", missing),
          (f"not in the {target}", unexpected),
          ("shape mismatches", wrong_shape),
      ),
  )
