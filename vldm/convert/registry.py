"""Which vldm module stands for which diffusers / transformers class, and how to move between them.

Which class `save_diffusers` writes (`export_class_of`): the module's `reference_class` (its
diffusers / transformers class) when that class describes the module exactly (`ModelFormat.check`
finds no problem), else the vldm-native class registered for the module's type with
`register_native` (e.g. 'VldmUNet' for a Video LDM UNet that no diffusers class describes), else
the reference class's error. `save_diffusers(..., class_name=...)` forces a class.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import numpy as np

from vldm.convert import core

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class ModelFormat:
  """How one reference class maps onto a vldm module.

  from_config:   reference config.json dict → vldm module.
  to_config:     vldm module → reference config.json dict (with `_class_name` / `architectures`).
  init_args:     module → example inputs for `module.init` (tiny shapes, only traced for shapes).
  init_method:   the module method `init` runs through (None: __call__).
  rename_keys:   state dict → state dict, for legacy key names (applied before matching).
  ignore:        regexes of reference keys to drop (non-parameter buffers).
  check:         module → problems (empty: this class describes the module exactly); None: the
                 problems are to_config's ConversionError.
  layout:        'torch': PyTorch keys and layouts (core.torch_to_flax / flax_to_torch); 'vldm':
                 vldm's own parameter paths, Flax layout (core.vldm_state_to_params).
  buffers:       (module, params) → {key: array}: non-parameter buffers the reference class keeps
                 in its state dict (written with the weights; `ignore` drops them on load).
  """

  class_name: str
  weights_file: str
  from_config: Callable[[dict], nn.Module]
  to_config: Callable[[nn.Module], dict]
  init_args: Callable[[nn.Module], tuple]
  init_method: Any = None
  rename_keys: Callable[[dict], dict] = lambda state: state
  ignore: tuple[str, ...] = ()
  check: Callable[[nn.Module], list[str]] | None = None
  layout: str = "torch"
  buffers: Callable[[nn.Module, Any], dict] | None = None

  def problems(self, module: nn.Module) -> list[str]:
    """Why this class cannot describe `module` exactly ([] when it can)."""
    if self.check is not None:
      return list(self.check(module))
    try:
      self.to_config(module)
    except core.ConversionError as e:
      return [str(e)]
    return []

  def param_shapes(self, module: nn.Module):
    kw = {} if self.init_method is None else {"method": self.init_method}
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *self.init_args(module), **kw))
    return variables["params"]


_FORMATS: dict[str, ModelFormat] = {}
# Module type → the vldm-native class that save_diffusers falls back to.
_NATIVE: dict[type, str] = {}
# Classes that are not models of their own → what to do with such a folder instead.
_HINTS: dict[str, str] = {}
LAYOUTS = ("torch", "vldm")


def register(fmt: ModelFormat) -> ModelFormat:
  if fmt.layout not in LAYOUTS:
    raise ValueError(f"Unknown layout {fmt.layout!r} for {fmt.class_name}; accepted: {LAYOUTS}.")
  _FORMATS[fmt.class_name] = fmt
  return fmt


def register_native(module_type: type, class_name: str) -> None:
  """Modules of `module_type` that their reference class cannot describe save as `class_name`."""
  _NATIVE[module_type] = class_name


def register_hint(class_name: str, hint: str) -> None:
  """`load_diffusers` of a `class_name` folder raises an error that says `hint`."""
  _HINTS[class_name] = hint


def supported_classes() -> list[str]:
  return sorted(_FORMATS)


def read_config(path: str) -> dict:
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise core.ConversionError(f"{path} is not a diffusers or transformers model folder: it has no "
                               f"config.json. Supported classes: {', '.join(supported_classes())}.")
  with open(config_path) as f:
    return json.load(f)


def class_name_of(config: dict) -> str:
  """diffusers configs name their class in `_class_name`; transformers ones in `architectures`."""
  if "_class_name" in config:
    return config["_class_name"]
  architectures = config.get("architectures") or []
  return architectures[0] if architectures else config.get("model_type", "<unnamed>")


def format_for(name: str) -> ModelFormat:
  if name in _HINTS:
    raise core.ConversionError(f"A {name} folder is not a model of its own: {_HINTS[name]}")
  if name not in _FORMATS:
    raise core.ConversionError(f"Unsupported model class {name!r}. Supported classes: "
                               f"{', '.join(supported_classes())}.")
  return _FORMATS[name]


def load_diffusers(path: str):
  """Loads a diffusers model folder or a transformers CLIP folder → (flax module, params).

  The class comes from config.json; see DESIGN.md for each class's call signature.
  """
  config = read_config(path)
  fmt = format_for(class_name_of(config))
  module = fmt.from_config(config)
  state = fmt.rename_keys(core.read_safetensors(os.path.join(path, fmt.weights_file)))
  state = {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in state.items()}
  if fmt.layout == "vldm":
    params = core.vldm_state_to_params(state, fmt.param_shapes(module))
  else:
    params = core.torch_to_flax(state, fmt.param_shapes(module), ignore=fmt.ignore)
  return module, params


def write_config(config: dict, path: str) -> None:
  """Writes config.json into the folder `path` (created if needed)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)


def save_diffusers(module: nn.Module, params, path: str, *, class_name: str | None = None) -> None:
  """Writes `module` and `params` as a model folder that `load_diffusers` reads back.

  The class is `export_class_of(module)` unless `class_name` forces one (an error then says why
  that class cannot describe the module). Diffusers / transformers classes load in their
  `from_pretrained`; vldm-native ones (e.g. 'VldmUNet') only in vldm.
  """
  if class_name is not None and class_name not in _candidates(module):
    format_for(class_name)  # raises for an unknown class
    raise core.ConversionError(
        f"Cannot save this {type(module).__name__} as {class_name}; the "
        f"classes for it: {', '.join(_candidates(module))}."
    )
  fmt = format_for(export_class_of(module) if class_name is None else class_name)
  config = fmt.to_config(module)  # raises, naming what the class cannot hold
  if class_name is not None:
    problems = fmt.problems(module)  # what it holds but would load back differently
    if problems:
      raise core.ConversionError(
          f"Cannot save this {type(module).__name__} as {class_name}: " + "; ".join(problems) + "."
      )
  write_config(config, path)
  weights = os.path.join(path, fmt.weights_file)
  if fmt.layout == "vldm":
    core.write_safetensors(
        core.params_to_vldm_state(params), weights, metadata={"format": "flax", "layout": "vldm"}
    )
  else:
    state = core.flax_to_torch(params)
    if fmt.buffers is not None:
      state.update(fmt.buffers(module, params))
    core.write_safetensors(state, weights)


def _candidates(module: nn.Module) -> list[str]:
  """The module's reference class, then its vldm-native class (when registered)."""
  reference = getattr(module, "reference_class", type(module).__name__)
  native = [name for cls, name in _NATIVE.items() if isinstance(module, cls)]
  return [reference] + [name for name in native[:1] if name != reference]


def export_class_of(module: nn.Module) -> str:
  """The class `save_diffusers` writes `module` as (see the module docstring).

  An image UNet that UNet2DConditionModel describes → 'UNet2DConditionModel'; an SVD-layout video
  UNet → 'UNetSpatioTemporalConditionModel'; a Video LDM UNet (SD layers inflated) → 'VldmUNet'.
  """
  reference, *native = _candidates(module)
  if reference in _FORMATS and (not native or not _FORMATS[reference].problems(module)):
    return reference
  if not native:
    format_for(reference)  # raises: no class for this module at all
    return reference  # save_diffusers then raises to_config's error
  return native[0]


def module_fields(module: nn.Module, names: Iterable[str]) -> dict:
  """The given dataclass fields of a module as JSON-ready values (tuples → lists)."""
  out = {}
  for name in names:
    value = getattr(module, name)
    out[name] = list(value) if isinstance(value, tuple) else value
  return out


def config_kwargs(cls, config: dict, rename: dict | None = None) -> dict:
  """The entries of a reference config that are fields of `cls` (tuples for lists)."""
  rename = rename or {}
  fields = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for key, value in config.items():
    key = rename.get(key, key)
    if key in fields:
      out[key] = tuple(value) if isinstance(value, list) else value
  return out
