"""LoRA files (PEFT / diffusers / kohya safetensors) fused into vldm parameters, and written.

`apply_lora(params, path, scale=1.0, *, module=None)` adds scale · (alpha / r) · B·A to every
weight the file adapts, as diffusers' `load_lora_weights` followed by `fuse_lora(lora_scale=scale)`
does. `params` is a pipeline's dict of components ({'unet': …, 'text_encoder': …}, as
`TextToVideoPipeline.params` holds them; other entries pass through), or one model's parameter
tree with `module` naming what it is ('unet' or 'text_encoder'; then the file's other parts are
left out). Module names are the diffusers / transformers ones (`vldm.models.lora.module_name`).

Key formats, per adapted module M of component C ('unet', 'text_encoder'):
  PEFT       C.M.lora_A.weight [r, in, *k], C.M.lora_B.weight [out, r, *1] (+ C.M.lora_B.bias)
  diffusers  C.M.lora.down.weight / C.M.lora.up.weight; C.M.lora_linear_layer.down / .up; the old
             attention-processor keys C.….attn1.processor.to_q_lora.down.weight (to_out_lora:
             to_out.0; in the text encoder q_proj … out_proj); keys without C: the UNet's
  kohya      lora_unet_<M with '.' → '_'>.lora_down.weight / .lora_up.weight / .alpha, and
             lora_te_… for the text encoder (LoCon convolutions: down [r, in, kh, kw], up
             [out, r, 1, 1])
  PEFT's own folder (adapter_model.safetensors + adapter_config.json, keys base_model.model.M…):
             one model's adapter; `module` says which.
The scale of a module is alpha / r: alpha from the file's `lora_adapter_metadata` (diffusers'
`save_lora_weights`: LoraConfig fields per component, with `alpha_pattern` / `rank_pattern`, PEFT's
suffix-regex rule, and `use_rslora`: alpha / √r), else from the module's kohya `.alpha`, else
alpha = r (scale 1), as diffusers infers it. Text-encoder names may come with or without
transformers' `text_model.` prefix. DoRA, LoHa and LoKr files are refused, naming their keys.

`save_lora(adapters, folder, alpha=…)` writes vldm adapters (`vldm.models.lora`) as diffusers'
`pytorch_lora_weights.safetensors` (PEFT keys per component and the `lora_adapter_metadata` that
diffusers' `save_lora_weights` writes), which `pipe.load_lora_weights(folder)` reads.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import json
import logging
import os
import re
from typing import Mapping, Optional, Union

import numpy as np
from flax import traverse_util

from vldm.convert import core
from vldm.convert.core import ConversionError
from vldm.models import lora as lora_lib

log = logging.getLogger(__name__)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
COMPONENTS = ("unet", "text_encoder")
TEXT_MODEL = "text_model."
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
# Parts of other models or methods that vldm has no place for: key fragment → what it is.
UNSUPPORTED = {
    "lora_te1_": "SDXL's first text encoder (vldm has no SDXL)",
    "lora_te2_": "SDXL's second text encoder (vldm has no SDXL)",
    "text_encoder_2.": "SDXL's second text encoder (vldm has no SDXL)",
    "dora_scale": "DoRA magnitudes",
    "lora_magnitude_vector": "DoRA magnitudes",
    "hada_": "LoHa (LyCORIS) factors",
    "lokr_": "LoKr factors",
    "lora_mid": "LoCon Tucker factors",
}
# Old attention-processor keys: `…attn1.processor.to_q_lora.down.weight`.
_PROCESSOR_NAMES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
_PROCESSOR_KEY = re.compile(r"(.*)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_SUFFIXES = (  # (key suffix, part)
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),
    (".lora.down.weight", "A"),
    (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"),
    (".lora_linear_layer.up.weight", "B"),
    (".alpha", "alpha"),
)
_KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}


@dataclasses.dataclass
class Adapter:
  """One module's LoRA in PyTorch layout: A [r, in, *k], B [out, r, *1], the scale alpha / r."""

  a: np.ndarray
  b: np.ndarray
  scale: float
  bias: Optional[np.ndarray] = None  # PEFT's lora_bias: added to the module's bias

  @property
  def rank(self) -> int:
    return int(self.a.shape[0])

  def delta(self) -> np.ndarray:
    """B·A in PyTorch layout [out, in, *k], unscaled, float32."""
    a = self.a.astype(np.float32)
    b = self.b.astype(np.float32).reshape(self.b.shape[0], -1)
    return (b @ a.reshape(a.shape[0], -1)).reshape((b.shape[0],) + a.shape[1:])


@dataclasses.dataclass
class _Parts:
  """What a file holds for one module before its names are resolved."""

  a: Optional[np.ndarray] = None
  b: Optional[np.ndarray] = None
  bias: Optional[np.ndarray] = None
  alpha: Optional[float] = None
  keys: list = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------------------ reading
def _locate(path: str) -> tuple[str, Optional[dict]]:
  """(weights file, PEFT adapter_config or None) of a file or folder."""
  if os.path.isdir(path):
    for name in (LORA_WEIGHTS, PEFT_WEIGHTS):
      if os.path.isfile(os.path.join(path, name)):
        weights = os.path.join(path, name)
        config = os.path.join(path, PEFT_CONFIG)
        if name == PEFT_WEIGHTS and os.path.isfile(config):
          with open(config, encoding="utf-8") as f:
            return weights, json.load(f)
        return weights, None
    raise ConversionError(
        f"{path} holds no LoRA weights: looked for {LORA_WEIGHTS} (diffusers) and {PEFT_WEIGHTS} "
        f"(PEFT); pass the .safetensors file itself if it has another name."
    )
  return path, None


def _file_metadata(path: str) -> dict:
  """The per-component LoraConfig fields of diffusers' `lora_adapter_metadata` ({} without)."""
  raw = core.read_safetensors_metadata(path).get(METADATA_KEY)
  if not raw:
    return {}
  try:
    flat = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: its {METADATA_KEY} is not JSON ({e}).") from e
  out: dict = {}
  for key, value in flat.items():
    component, _, field = key.partition(".")
    out.setdefault(component, {})[field] = value
  return out


def _check_supported(keys, path: str) -> None:
  found = collections.defaultdict(list)
  for key in keys:
    for fragment, what in UNSUPPORTED.items():
      if fragment in key:
        found[what].append(key)
  if found:
    raise ConversionError(
        f"{path} holds weights vldm cannot fuse: "
        + "; ".join(f"{what} ({len(k)} keys, e.g. {k[0]})" for what, k in found.items())
        + "."
    )


def _split_component(key: str, module: Optional[str]) -> tuple[str, str]:
  if key.startswith("base_model.model."):  # PEFT's own save_pretrained
    if module is None:
      raise ConversionError(
          "A PEFT adapter folder adapts one model; say which with module='unet' or "
          "module='text_encoder'."
      )
    return module, key[len("base_model.model.") :]
  for component in COMPONENTS:
    if key.startswith(component + "."):
      return component, key[len(component) + 1 :]
  return "unet", key  # diffusers' oldest files: attention-processor keys of the UNet alone


def _parse_diffusers_key(component: str, rest: str) -> Optional[tuple[str, str]]:
  """(module name, part) of a PEFT / diffusers key within its component, or None."""
  rest = rest.replace(".processor.", ".")
  match = _PROCESSOR_KEY.fullmatch(rest)
  if match:
    parent, projection, direction = match.groups()
    name = f"{parent}.{_PROCESSOR_NAMES[component][projection]}"
    return name, "A" if direction == "down" else "B"
  for suffix, part in _SUFFIXES:
    if rest.endswith(suffix):
      return rest[: -len(suffix)], part
  return None


def _collect(state: Mapping[str, np.ndarray], path: str, module: Optional[str]):
  """({component: {module name or kohya name: _Parts}}, kohya?) of a file's tensors."""
  _check_supported(state, path)
  kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in state)
  parts: dict = collections.defaultdict(lambda: collections.defaultdict(_Parts))
  unknown = []
  for key, value in state.items():
    if kohya:
      name, _, part = key.partition(".")
      component = next((c for p, c in KOHYA_PREFIXES.items() if name.startswith(p)), None)
      part = _KOHYA_PARTS.get(part)
    else:
      component, rest = _split_component(key, module)
      parsed = _parse_diffusers_key(component, rest)
      name, part = parsed if parsed else (None, None)
    if component is None or part is None:
      unknown.append(key)
      continue
    entry = parts[component][name]
    entry.keys.append(key)
    if part == "alpha":
      entry.alpha = float(np.asarray(value).reshape(-1)[0])
    else:
      setattr(entry, part.lower(), np.asarray(value))
  if unknown:
    raise ConversionError(
        f"{path}: keys in no LoRA format vldm reads ({len(unknown)}): "
        f"{', '.join(sorted(unknown)[:8])}{' …' if len(unknown) > 8 else ''}. Accepted: PEFT "
        "(….lora_A.weight / .lora_B.weight), "
        "diffusers (….lora.down.weight / .lora.up.weight, ….processor.to_q_lora.down.weight) "
        "and kohya (lora_unet_… / lora_te_… with .lora_down.weight, .lora_up.weight, .alpha)."
    )
  return parts, kohya


def _pattern_key(patterns, name: str) -> Optional[str]:
  """PEFT's `get_pattern_key`: the first pattern P with `(.*\\.)?(P)$` matching the name."""
  for pattern in patterns:
    if re.match(rf"(.*\.)?({pattern})$", name):
      return pattern
  return None


def _scale(name: str, rank: int, alpha: Optional[float], config: Mapping) -> float:
  """alpha / r of one module (see the module docstring)."""
  if config:
    pattern = _pattern_key(config.get("alpha_pattern") or {}, name)
    alpha = (
        config["alpha_pattern"][pattern]
        if pattern is not None
        else config.get("lora_alpha", config.get("r", rank))
    )
    if config.get("use_rslora"):
      return float(alpha) / float(np.sqrt(rank))
  elif alpha is None:
    alpha = rank
  return float(alpha) / rank


def read_lora(path: str, *, module: Optional[str] = None) -> tuple[dict, bool]:
  """({component: {module name: Adapter}}, kohya?) of a LoRA file or folder. Kohya files keep their
  underscored names ('down_blocks_0_…_to_q', no prefix), resolved against a model in `apply_lora`.
  """
  weights, peft_config = _locate(path)
  state = core.read_safetensors(weights)
  metadata = _file_metadata(weights)
  if peft_config is not None:
    metadata = {module: peft_config}
  parts, kohya = _collect(state, path, module)
  out: dict = {}
  problems = []
  for component, modules in parts.items():
    for name, p in modules.items():
      if p.a is None or p.b is None:
        problems.append(
            f"{name}: {'lora_B (up)' if p.a is not None else 'lora_A (down)'} "
            f"missing (has {', '.join(p.keys)})"
        )
        continue
      if p.a.shape[0] != p.b.shape[1] or p.b.ndim != p.a.ndim:
        problems.append(
            f"{name}: A {p.a.shape} and B {p.b.shape} do not chain (A [r, in, …], " "B [out, r, …])"
        )
        continue
      rank = int(p.a.shape[0])
      if kohya:
        name = name[len(next(pre for pre in KOHYA_PREFIXES if name.startswith(pre))) :]
      scale = _scale(name, rank, p.alpha, metadata.get(component, {}))
      out.setdefault(component, {})[name] = Adapter(p.a, p.b, scale, p.bias)
  if problems:
    raise ConversionError(
        f"{path}: incomplete LoRA modules ({len(problems)}): " + "; ".join(problems[:8]) + "."
    )
  if not out:
    raise ConversionError(f"{path} holds no LoRA weights.")
  return out, kohya


# ------------------------------------------------------------------------------------- fusing
def _aliases(component: str, names, kohya: bool) -> dict[str, str]:
  """Accepted spelling → vldm module name: the name itself, without transformers' `text_model.`
  (transformers 5 drops it), and kohya's underscored form."""
  out = {}
  for name in names:
    spellings = [name]
    if component == "text_encoder" and name.startswith(TEXT_MODEL):
      spellings.append(name[len(TEXT_MODEL) :])
    for spelling in spellings:
      out[spelling.replace(".", "_") if kohya else spelling] = name
  return out


def _missing_error(path, component, missing, available) -> ConversionError:
  lines = []
  for name in sorted(missing)[:8]:
    close = difflib.get_close_matches(name, available, n=2, cutoff=0.6)
    lines.append(name + (f" (closest: {', '.join(close)})" if close else ""))
  more = f" … and {len(missing) - 8} more" if len(missing) > 8 else ""
  return ConversionError(
      f"{path} adapts modules that the {component} does not have ({len(missing)}): "
      + "; ".join(lines)
      + more
      + f". Its {len(available)} Dense / convolution modules include "
      f"{', '.join(sorted(available)[:5])}. Is the LoRA made for another model?"
  )


def fuse(
    params,
    adapters: Mapping[str, Adapter],
    *,
    scale: float = 1.0,
    component: str = "unet",
    kohya: bool = False,
    source: str = "the LoRA",
):
  """One component's `params` with scale × each adapter's scale × B·A added (see `apply_lora`)."""
  modules = lora_lib.weight_modules(params)
  aliases = _aliases(component, modules, kohya)
  missing = [name for name in adapters if name not in aliases]
  if missing:
    raise _missing_error(source, component, missing, list(aliases))
  flat = traverse_util.flatten_dict(params)
  mismatched = []
  for name, adapter in adapters.items():
    path = modules[aliases[name]]
    kernel = flat[path + ("kernel",)]
    update = _flax_kernel(adapter.delta())
    if update.shape != tuple(np.shape(kernel)):
      mismatched.append(
          f"{name}: LoRA update {adapter.delta().shape} vs weight "
          f"{_torch_shape(np.shape(kernel))} (PyTorch layout)"
      )
      continue
    factor = np.float32(scale * adapter.scale)
    flat[path + ("kernel",)] = _add(kernel, factor * update)
    if adapter.bias is not None:
      if path + ("bias",) not in flat:
        mismatched.append(f"{name}: the LoRA has a bias but the module has none")
        continue
      flat[path + ("bias",)] = _add(flat[path + ("bias",)], factor * adapter.bias)
  if mismatched:
    raise ConversionError(
        f"{source} does not fit the {component}'s weights ({len(mismatched)}): "
        + "; ".join(mismatched[:8])
        + "."
    )
  return traverse_util.unflatten_dict(flat)


def _flax_kernel(weight: np.ndarray) -> np.ndarray:
  """A PyTorch Linear / ConvNd weight [out, in, *k] in Flax's layout [*k, in, out]."""
  return np.transpose(weight, tuple(range(2, weight.ndim)) + (1, 0))


def _torch_shape(shape) -> tuple:
  """A Flax kernel's shape [*k, in, out] in PyTorch's layout [out, in, *k] (for messages)."""
  shape = tuple(shape)
  return shape[-1:] + shape[-2:-1] + shape[:-2]


def _add(weight, update: np.ndarray):
  """weight + update in float32, back in the weight's dtype; numpy stays numpy, jax stays jax."""
  if isinstance(weight, np.ndarray):
    return (weight.astype(np.float32) + update).astype(weight.dtype)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return (weight.astype(jnp.float32) + update).astype(weight.dtype)


def _is_components(params) -> bool:
  return isinstance(params, Mapping) and any(c in params for c in COMPONENTS)


def apply_lora(params, path: str, scale: float = 1.0, *, module: Optional[str] = None):
  """`params` with the LoRA at `path` fused in: W += scale · (alpha / r) · B·A (see the module
  docstring for `params`, `module` and the formats). Errors name the modules the model lacks
  (with the closest it has) and keys in no known format."""
  if module is not None and module not in COMPONENTS:
    raise ValueError(f"module must be one of {COMPONENTS} (or None), got {module!r}.")
  adapters, kohya = read_lora(path, module=module)
  if module is not None and not _is_components(params):
    if module not in adapters:
      raise ConversionError(f"{path} holds no {module} weights; it adapts {sorted(adapters)}.")
    left_out = sorted(set(adapters) - {module})
    if left_out:
      log.info("apply_lora: left out the %s parts of %s (module=%r).", left_out, path, module)
    return fuse(params, adapters[module], scale=scale, component=module, kohya=kohya, source=path)
  if not _is_components(params):
    raise ValueError(
        "apply_lora needs a dict of components ({'unet': …, 'text_encoder': …}) or one model's "
        "parameters with module='unet' or module='text_encoder'."
    )
  wanted = [c for c in adapters if module in (None, c)]
  lacking = [c for c in wanted if c not in params]
  if lacking:
    raise ConversionError(
        f"{path} adapts {', '.join(lacking)}, which the params lack (they hold "
        f"{sorted(params)}); pass those parameters too, or one model's with module=…."
    )
  out = dict(params)
  for component in wanted:
    out[component] = fuse(
        params[component],
        adapters[component],
        scale=scale,
        component=component,
        kohya=kohya,
        source=path,
    )
  return out


# ------------------------------------------------------------------------------------ writing
def _config(component: str, ranks: dict, alphas: dict) -> dict:
  """LoraConfig fields as diffusers' `save_lora_weights` writes them: the most common rank and
  alpha, the others as patterns (PEFT matches a pattern as a name suffix)."""
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]

  def peft_name(name):  # transformers 5's CLIPTextModel has no `text_model.`; a suffix fits both
    return (
        name[len(TEXT_MODEL) :]
        if component == "text_encoder" and name.startswith(TEXT_MODEL)
        else name
    )

  return {
      "r": r,
      "lora_alpha": alpha,
      "target_modules": sorted(peft_name(n) for n in ranks),
      "rank_pattern": {peft_name(n): v for n, v in sorted(ranks.items()) if v != r},
      "alpha_pattern": {peft_name(n): v for n, v in sorted(alphas.items()) if v != alpha},
      "lora_dropout": 0.0,
      "bias": "none",
      "use_dora": False,
      "use_rslora": False,
      "lora_bias": False,
      "init_lora_weights": True,
      "peft_type": "LORA",
      "task_type": None,
  }


def save_lora(
    adapters,
    folder: str,
    *,
    alpha: Union[float, Mapping[str, float]],
    weight_name: str = LORA_WEIGHTS,
) -> str:
  """Writes {component: adapter tree (`vldm.models.lora`)} as a diffusers LoRA file in `folder`
  (PEFT keys, `lora_adapter_metadata`); `alpha`: one value, or {component: value}. Returns the
  file's path."""
  state, metadata = {}, {}
  for component, tree in adapters.items():
    if component not in COMPONENTS:
      raise ValueError(
          f"Cannot write adapters of {component!r}: diffusers' LoRA files hold " f"{COMPONENTS}."
      )
    value = float(alpha[component] if isinstance(alpha, Mapping) else alpha)
    pairs = lora_lib.adapters_of(tree)
    ranks = {lora_lib.module_name(p): lora_lib.rank_of(pair) for p, pair in pairs.items()}
    state.update({f"{component}.{k}": v for k, v in core.flax_to_torch(tree).items()})
    alphas = {name: value for name in ranks}
    config = _config(component, ranks, alphas)
    metadata.update({f"{component}.{k}": v for k, v in config.items()})
  os.makedirs(folder, exist_ok=True)
  out = os.path.join(folder, weight_name)
  core.write_safetensors(
      state,
      out,
      metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)},
  )
  return out
