"""The task interface the trainer is generic over, a registry of tasks and of init transforms.

A task bundles one training stage's model, loss and data. `config.task` names it: a registered
name or a 'module.path:ClassName' import path. The trainer builds it as `Task(config)`.

Parameters are nested dicts (Flax linen `params` collections). Every `rng` the trainer passes is a
typed key (`jax.random.key`) of `config.prng_impl`. Methods the trainer calls:
  init_params(rng) -> params               pure and jit-able: it runs under `jax.eval_shape` and
                                           `jax.jit(out_shardings=...)`, so full-size parameters
                                           never exist unsharded.
  loss_fn(params, frozen, batch, rng) -> (scalar loss, dict of scalar metrics)
                                           traced inside the jitted train step.
  trainable_labels(params) -> pytree of 'train' / 'freeze' with the structure of `params`, or
                                           None (all trainable). Called on abstract params
                                           (ShapeDtypeStructs), so it may use paths and shapes only.
                                           Frozen leaves get no gradient, optimizer state or EMA.
  init_frozen(mesh) -> pytree              sub-models used but never trained (autoencoder, text
                                           encoder), loaded as they are; {} by default.
  make_data(sharding, process_index, process_count) -> DataIterator
  sample_fn(params, frozen, rng) -> {name: frames}   optional (None): frames (F, H, W, 3) or
                                           (H, W, 3), float in [0, 1] or uint8; written as GIFs.
  eval_fn(params, frozen, rng) -> {name: float}  optional (None): metrics of samples, run every
                                           `config.eval_every` steps, logged as eval/<name>.
  init_transforms() -> {name: fn}          optional extra `init_from` transforms (see below).
  abstract_frozen() -> pytree              optional: init_frozen's ShapeDtypeStructs (no weights);
  abstract_batch(batch_size) -> pytree     optional: ShapeDtypeStructs of one global batch as
                                           make_data yields it. With these two a stage compiles
                                           without weights or data (`vldm.train.compile_only`).
  step_flops(batch_size) -> float          optional: the analytic model FLOPs of one training step
                                           (no recomputation), to check the compiled count.
  pretrained_params() -> pytree or None    optional: host weights to start from when no
                                           `init_from.workdir` is set (e.g. a diffusers folder's),
                                           mapped by the `init_from.transform`; top-level parts it
                                           lacks keep their init.
  owns_init_from -> bool                   True when the task applies `config.init_from` (and its
                                           pretrained weights) itself; the trainer then starts its
                                           parameters from `init_params` alone (LoRA: the base
                                           model is frozen, the adapters start fresh).

With `config.lora.rank` > 0, `get_task` wraps the task in `vldm.train.lora.LoraTask`: its
parameters become frozen and low-rank adapters of them train (see there).

A DataIterator yields batches (pytrees of global jax.Arrays only, whose leading axis is sharded with
`sharding`; each process contributes its own slice; host values such as caption strings are turned
into arrays, e.g. token ids, inside make_data) and has `get_state() -> dict` and
`set_state(dict)`. The state must be JSON-serialisable and the same on every process (e.g. the
index of the next global batch): it is saved once, beside the arrays.

Init transforms (`config.init_from.transform`) say how another stage's parameters enter this
model: `fn(source, target) -> params`, with `source` the other workdir's newest parameters and
`target` this model's freshly initialised ones, both nested dicts; the result must have the
target's structure, shapes and dtypes. They are traced under jit, so they must be pure.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

PyTree = Any
TRAIN, FREEZE = "train", "freeze"


class TaskInputError(ValueError):
  """A task's config, folders or data cannot be used; the message says what is accepted.
  `python -m vldm.train` prints it without a traceback."""


class CannotCompileAhead(TypeError):
  """The task cannot describe its frozen models or batches without weights or data
  (`vldm.train.compile_only` needs `abstract_frozen` and `abstract_batch`)."""


class DataIterator(Protocol):

  def __iter__(self) -> Iterator[PyTree]:
    ...

  def __next__(self) -> PyTree:
    ...

  def get_state(self) -> dict:
    ...

  def set_state(self, state: dict) -> None:
    ...


class Task:
  """Base class with the optional parts' defaults; subclasses define the rest."""

  sample_fn: Optional[Callable[..., Mapping[str, Any]]] = None
  eval_fn: Optional[Callable[..., Mapping[str, float]]] = None
  owns_init_from: bool = False

  def __init__(self, config):
    self.config = config

  def init_params(self, rng) -> PyTree:
    raise NotImplementedError

  def loss_fn(self, params, frozen, batch, rng):
    raise NotImplementedError

  def trainable_labels(self, params) -> Optional[PyTree]:
    return None

  def init_frozen(self, mesh) -> PyTree:
    return {}

  def pretrained_params(self) -> Optional[PyTree]:
    return None

  def make_data(self, sharding, process_index: int, process_count: int) -> DataIterator:
    raise NotImplementedError

  def abstract_frozen(self) -> PyTree:
    raise CannotCompileAhead(
        f"{type(self).__name__} cannot describe its frozen models without "
        "loading them (no abstract_frozen): it does not compile ahead."
    )

  def abstract_batch(self, batch_size: int) -> PyTree:
    raise CannotCompileAhead(
        f"{type(self).__name__} cannot describe its batches without data "
        "(no abstract_batch): it does not compile ahead."
    )

  def step_flops(self, batch_size: int) -> Optional[float]:  # pylint: disable=unused-argument
    return None

  def init_transforms(self) -> Mapping[str, Callable]:
    return {}


# Tasks: name -> class or 'module:attr' (imported on first use, so configs stay light).
_TASKS: dict[str, Any] = {}


def register_task(name: str, target=None):
  """Registers a task class (or a 'module:attr' path) under `name`; usable as a decorator."""
  if target is None:
    return lambda cls: register_task(name, cls)
  _TASKS[name] = target
  return target


def _import(path: str):
  module, _, attr = path.partition(":")
  if not attr:
    raise ValueError(f"Task path {path!r} must look like 'package.module:ClassName'.")
  return getattr(importlib.import_module(module), attr)


def get_task(config) -> Task:
  name = config.task
  target = _TASKS.get(name)
  if target is None:
    if ":" not in name:
      close = difflib.get_close_matches(name, list(_TASKS), n=3, cutoff=0.5)
      raise ValueError(
          f"Unknown task {name!r}; give a 'package.module:ClassName' path"
          + (f" or a registered name: {sorted(_TASKS)}" if _TASKS else "")
          + (f" (closest: {close})" if close else "")
          + "."
      )
    target = name
  cls = _import(target) if isinstance(target, str) else target
  task = cls(config)
  lora = config.get("lora")
  if lora is not None and lora.get("rank"):
    from vldm.train import lora as lora_lib  # pylint: disable=g-import-not-at-top  # imports tasks

    task = lora_lib.LoraTask(task)
  return task


# ----------------------------------------------------------------------------------------------
# Trainable / frozen split. Parameters are nested dicts; the split keeps dicts of the same shape
# holding only trainable (or only frozen) leaves, so the optimizer never sees frozen leaves.


def trainable_paths(params, labels) -> frozenset:
  """Flattened-dict paths of the trainable leaves."""
  flat = traverse_util.flatten_dict(params)
  if labels is None:
    return frozenset(flat)
  flat_labels = traverse_util.flatten_dict(labels)
  if set(flat_labels) != set(flat):
    missing = sorted("/".join(map(str, p)) for p in set(flat) - set(flat_labels))
    raise ValueError(f"trainable_labels must label every parameter; unlabelled: {missing[:5]}")
  bad = {v for v in flat_labels.values() if v not in (TRAIN, FREEZE)}
  if bad:
    raise ValueError(
        f"Unknown trainable labels {sorted(map(str, bad))}; " f"accepted: {TRAIN!r}, {FREEZE!r}."
    )
  paths = frozenset(p for p, v in flat_labels.items() if v == TRAIN)
  if not paths:
    raise ValueError("trainable_labels froze every parameter: nothing to train.")
  return paths


def split(params, paths: frozenset):
  """(trainable, frozen) nested dicts."""
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if k in paths}
  frozen = {k: v for k, v in flat.items() if k not in paths}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(*trees):
  """Union of nested dicts with disjoint leaves (later ones win)."""
  flat = {}
  for tree in trees:
    if tree:
      flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------
# Init transforms.


class CheckpointMismatchError(ValueError):
  """Saved parameters do not fit the model they are restored or transformed into."""


def describe_mismatch(source, target, limit: int = 8) -> list[str]:
  """Human-readable differences between two parameter trees (paths, shapes, dtypes ignored)."""
  src = {"/".join(map(str, k)): np.shape(v) for k, v in traverse_util.flatten_dict(source).items()}
  tgt = {"/".join(map(str, k)): np.shape(v) for k, v in traverse_util.flatten_dict(target).items()}
  problems = [f"missing in the checkpoint: {k} {tgt[k]}" for k in sorted(tgt.keys() - src.keys())]
  problems += [f"not in this model: {k} {src[k]}" for k in sorted(src.keys() - tgt.keys())]
  problems += [
      f"shape {src[k]} in the checkpoint, {tgt[k]} in this model: {k}"
      for k in sorted(src.keys() & tgt.keys())
      if src[k] != tgt[k]
  ]
  if len(problems) > limit:
    problems = problems[:limit] + [f"... and {len(problems) - limit} more"]
  return problems


def as_is(source, target):
  """The other stage's parameters unchanged; the trees must match exactly."""
  problems = describe_mismatch(source, target)
  if problems:
    raise CheckpointMismatchError(
        "init_from transform 'as_is' needs the same parameters:\n  " + "\n  ".join(problems)
    )
  return jax.tree.map(lambda s, t: s.astype(t.dtype), source, target)


def copy_matching(source, target):
  """Copies every source leaf whose path and shape exist in the target; the rest keeps its init.

  Useful when this model extends the other (new layers, e.g. temporal layers inserted into an
  image model under new names).
  """
  flat_src = traverse_util.flatten_dict(source)
  flat = traverse_util.flatten_dict(target)
  for key, value in flat.items():
    if key in flat_src and np.shape(flat_src[key]) == np.shape(value):
      flat[key] = jnp.asarray(flat_src[key], value.dtype)
  return traverse_util.unflatten_dict(flat)


_TRANSFORMS: dict[str, Callable] = {"as_is": as_is, "copy_matching": copy_matching}


def register_init_transform(name: str, fn=None):
  """Registers `fn(source, target) -> params` under `name`; usable as a decorator."""
  if fn is None:
    return lambda f: register_init_transform(name, f)
  _TRANSFORMS[name] = fn
  return fn


def get_init_transform(name: str, task: Task) -> Callable:
  available = {**_TRANSFORMS, **task.init_transforms()}
  if name not in available:
    raise ValueError(f"Unknown init_from transform {name!r}; available: {sorted(available)}.")
  return available[name]
