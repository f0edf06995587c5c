"""Orbax checkpoints of a run, resuming, preemption, and loading another stage's parameters.

Layout: `WORKDIR/checkpoints/<step>/` with items
  params      the full parameter tree               (StandardSave: sharded arrays)
  ema_params  EMA of the trainable leaves           (absent when ema_decay is 0)
  opt_state   optimizer state (trainable leaves)
  train       {'step', 'rng'}
  data        the data iterator's state             (JsonSave)
  config      the run's config                      (JsonSave)
Arrays are restored onto the current run's shardings, so a run may resume on another number of
devices. Saves are asynchronous; the arrays are copied off the devices before `save` returns, so
the next (donating) step may run while files are written.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from vldm.train import sharding as sharding_lib
from vldm.train import tasks as tasks_lib

ARRAY_ITEMS = ("params", "ema_params", "opt_state", "train")
JSON_ITEMS = ("data", "config")

CheckpointMismatchError = tasks_lib.CheckpointMismatchError


def checkpoint_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def _handlers():
  handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
  handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
  return handlers


def _manager(directory, *, max_to_keep=None, async_save=True, read_only=False):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def _shapes(metadata) -> Any:
  """Tree of ShapeDtypeStructs from a StandardSave item's metadata."""
  tree = getattr(metadata, "tree", metadata)
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                      is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class Checkpointer:
  """The run's own checkpoints: periodic async saves, keep-last-N, resume."""

  def __init__(self, workdir, config):
    self.directory = checkpoint_dir(workdir)
    self.manager = _manager(self.directory, max_to_keep=config.keep_checkpoints or None,
                            async_save=config.async_checkpointing)
    self.config_json = json.loads(config.to_json_best_effort())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    args = {
        "params": ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "train": ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        "data": ocp.args.JsonSave(data_state),
        "config": ocp.args.JsonSave(self.config_json),
    }
    if state.ema_params is not None:
      args["ema_params"] = ocp.args.StandardSave(state.ema_params)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, builder) -> tuple[Any, dict]:
    """(state, data_state) of `step`, placed on the builder's shardings."""
    abstract, shardings = builder.abstract_state, builder.state_shardings
    saved = self.manager.item_metadata(step)
    problems = tasks_lib.describe_mismatch(_shapes(saved["params"]), abstract.params)
    if problems:
      raise CheckpointMismatchError(
          f"The checkpoint {self.directory / str(step)} does not fit this model (was the config "
          f"changed? start a new workdir, or use init_from with a transform):\n  "
          + "\n  ".join(problems))
    args = {
        "params": ocp.args.StandardRestore(_with_shardings(abstract.params, shardings.params)),
        "opt_state": ocp.args.StandardRestore(
            _with_shardings(abstract.opt_state, shardings.opt_state)),
        "train": ocp.args.StandardRestore(_with_shardings(
            {"step": abstract.step, "rng": abstract.rng},
            {"step": shardings.step, "rng": shardings.rng})),
        "data": ocp.args.JsonRestore(),
    }
    if abstract.ema_params is not None:
      if saved.get("ema_params") is None:
        raise CheckpointMismatchError(f"The checkpoint {self.directory / str(step)} has no EMA "
                                      "parameters but this run keeps them (ema_decay > 0).")
      args["ema_params"] = ocp.args.StandardRestore(
          _with_shardings(abstract.ema_params, shardings.ema_params))
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError) as e:
      raise CheckpointMismatchError(
          f"The checkpoint {self.directory / str(step)} does not fit this run's state "
          f"(optimizer or trainable parameters changed?): {e}") from e
    state = abstract.replace(
        step=restored["train"]["step"], rng=restored["train"]["rng"],
        params=restored["params"], opt_state=restored["opt_state"],
        ema_params=restored["ema_params"] if abstract.ema_params is not None else None)
    return state, restored["data"] or {}

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.close()


def load_params(workdir, mesh, rules=((".*", "fsdp"),), *, use_ema: bool = True,
                step: Optional[int] = None, prefix: str = "params/"):
  """The parameters of another run (its newest checkpoint unless `step`), sharded on `mesh`.

  With `use_ema`, the EMA replaces the trainable leaves where the run kept one. Used for stage
  hand-off (`init_from`) and for frozen sub-models trained by an earlier stage.
  """
  workdir = epath.Path(workdir)
  if not workdir.exists():
    raise FileNotFoundError(f"The workdir {workdir} to load parameters from does not exist.")
  directory = checkpoint_dir(workdir)
  if not directory.exists():
    raise FileNotFoundError(f"{workdir} holds no checkpoints ({directory} is missing).")
  manager = _manager(directory, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory} holds no finished checkpoint.")
    metadata = manager.item_metadata(step)
    items = ["params"] + (["ema_params"] if use_ema and metadata.get("ema_params") else [])
    args = {}
    for name in items:
      shapes = _shapes(metadata[name])
      shardings = sharding_lib.tree_shardings(shapes, mesh, rules, prefix=prefix)
      args[name] = ocp.args.StandardRestore(_with_shardings(shapes, shardings))
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  finally:
    manager.close()
  return tasks_lib.merge(restored["params"], restored.get("ema_params") if use_ema else None)


class PreemptionWatcher:
  """Notices a preemption notice (SIGTERM) so that the loop saves and stops.

  One process: a SIGTERM handler sets a flag. Several processes: JAX's preemption service (started
  by `jax.distributed.initialize`) agrees on a step at which every process saves, via
  `CheckpointManager.reached_preemption`.
  """

  def __init__(self, checkpointer: Checkpointer):
    self.checkpointer = checkpointer
    self.flag = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self.flag.set()

  def preempted(self, step: int) -> bool:
    if self._multi:
      return self.checkpointer.reached_preemption(step)
    return self.flag.is_set()
