"""The training loop: `train_and_evaluate(config, workdir)`, importable from a notebook.

Start-up order: a run resumes from its own workdir's newest checkpoint; otherwise it starts from
`config.init_from` (another stage's parameters through a named transform); otherwise from scratch.
The host reads device values only at logging, checkpoint and sample steps.
"""

from __future__ import annotations

import logging
import os
import time

import jax
import numpy as np
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from vldm import video_io
from vldm.train import checkpoint as checkpoint_lib
from vldm.train import metrics as metrics_lib
from vldm.train import sharding as sharding_lib
from vldm.train import state as state_lib
from vldm.train import tasks as tasks_lib

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradient norm became NaN or infinite."""


def _check_batch_size(config, mesh) -> None:
  if config.batch_size % mesh.size:
    raise ValueError(
        f"batch_size {config.batch_size} must divide evenly over the {mesh.size} "
        f"devices of the mesh {dict(mesh.shape)}."
    )


def check_batch(batch) -> None:
  """TypeError unless every leaf of the batch is a jax.Array (the train step's input)."""
  host = [
      jax.tree_util.keystr(path)
      for path, x in jax.tree_util.tree_leaves_with_path(batch)
      if not isinstance(x, jax.Array)
  ]
  if host:
    raise TypeError(
        f"The task's data yielded host values at {host[:5]}; batches must hold only "
        "global jax.Arrays (convert captions to token ids or embeddings in make_data)."
    )


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def load_init_from(config, task, abstract_params, rules, mesh):
  """The parameters this run starts from and the transform that maps them into this model:
  another stage's newest ones (`config.init_from.workdir`), else the task's pretrained weights
  (`task.pretrained_params()`, e.g. a diffusers folder's; components it lacks keep their init),
  else None.

  Checked with shapes only (`jax.eval_shape`) against `abstract_params` (the task's
  `init_params` shapes), before this model's parameters are created. Returns (source, transform,
  where) or None.
  """
  init_from = config.init_from
  transform = tasks_lib.get_init_transform(init_from.transform, task)
  if init_from.workdir:
    where = init_from.workdir
    try:
      source = checkpoint_lib.load_params(init_from.workdir, mesh, rules, use_ema=init_from.use_ema)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"config.init_from.workdir={init_from.workdir!r}: {e}") from e
  else:
    source = task.pretrained_params()
    if source is None:
      return None
    where = "the task's pretrained weights"
    source = sharding_lib.place(
        source, sharding_lib.tree_shardings(source, mesh, rules, prefix="params/")
    )
    named = transform
    transform = lambda s, t: named({**t, **s}, t)
  produced = jax.eval_shape(transform, source, abstract_params)
  problems = tasks_lib.describe_mismatch(produced, abstract_params)
  if not problems:
    problems = [
        f"dtype {a.dtype} instead of {b.dtype}"
        for a, b in zip(jax.tree.leaves(produced), jax.tree.leaves(abstract_params))
        if a.dtype != b.dtype
    ]
  if problems:
    raise checkpoint_lib.CheckpointMismatchError(
        f"init_from transform {init_from.transform!r} does not produce this model's parameters "
        f"from {where}:\n  " + "\n  ".join(problems)
    )
  return source, transform, where


def _write_samples(task, state, frozen, builder, workdir, step) -> None:
  clips = task.sample_fn(
      state.params_for_sampling(), frozen, builder.key(builder.config.seed + 1)
  )  # fixed noise: comparable over steps
  clips = {name: _to_host(frames) for name, frames in clips.items()}
  if jax.process_index() == 0:
    folder = epath.Path(workdir) / "samples" / f"{step:08d}"
    for name, frames in clips.items():
      video_io.write_gif(frames, os.fspath(folder / f"{name}.gif"))


def _scalars(metrics) -> dict:
  return {k: float(np.asarray(v)) for k, v in metrics.items()}


def _initial_state(config, task, builder, mesh, checkpointer, data):
  """Resume from the workdir, else start from `init_from` or the pretrained weights, else from
  scratch."""
  latest = checkpointer.latest_step()
  if latest is not None:
    _check_saved_key(checkpointer, latest, builder)
    state, data_state = checkpointer.restore(latest, builder)
    data.set_state(data_state)
    log.info("Resumed at step %d.", latest)
    return state
  init_from = None
  # A task that owns init_from applied it itself (LoRA: to its frozen base).
  if not getattr(task, "owns_init_from", False):
    init_from = load_init_from(config, task, builder.abstract_params, builder.rules, mesh)
  params = builder.init_params(config.seed)
  if init_from is not None:
    source, transform, where = init_from
    params = jax.jit(transform, out_shardings=builder.param_shardings)(source, params)
    log.info("Initialised from %s (transform %r).", where, config.init_from.transform)
  return builder.init_state(params, config.seed)


def _check_saved_key(checkpointer, step, builder) -> None:
  """A clear error for a run resumed under another PRNG implementation: its key's shape differs."""
  try:
    saved = tuple(checkpointer.manager.item_metadata(step)["train"]["rng"].shape)
  except (KeyError, TypeError, AttributeError):  # no shapes in the metadata: restore checks
    return
  expected = tuple(builder.abstract_state.rng.shape)
  if saved == expected:
    return
  fitting = []
  for name in ("threefry2x32", "rbg", "unsafe_rbg"):
    try:
      if jax.random.key_data(jax.random.key(0, impl=name)).shape == saved:
        fitting.append(name)
    except ValueError:  # not in this jax version
      pass
  raise checkpoint_lib.CheckpointMismatchError(
      f"The checkpoint {checkpointer.directory / str(step)} holds a PRNG key of shape {saved}, "
      f"but config.prng_impl={builder.prng_impl!r} makes keys of shape {expected}: set "
      f"config.prng_impl to the implementation the run started with"
      + (f" (one of {fitting})." if fitting else ".")
  )


def train_and_evaluate(config, workdir: str) -> state_lib.TrainState:
  """Trains `config.task` for `config.total_steps` steps in `workdir`; returns the final state."""
  workdir = os.fspath(workdir)
  is_main = jax.process_index() == 0
  task = tasks_lib.get_task(config)
  mesh = sharding_lib.make_mesh(config.mesh)
  _check_batch_size(config, mesh)
  builder = state_lib.StateBuilder(task, config, mesh)

  frozen = task.init_frozen(mesh)
  frozen_shardings = sharding_lib.tree_shardings(frozen, mesh, builder.rules, prefix="frozen/")
  frozen = sharding_lib.place(frozen, frozen_shardings)
  data_sharding = sharding_lib.batch_sharding(mesh)
  data = task.make_data(data_sharding, jax.process_index(), jax.process_count())
  train_step = builder.make_train_step(frozen_shardings, data_sharding)

  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  writer = bar = None
  try:
    state = _initial_state(config, task, builder, mesh, checkpointer, data)
    step = int(jax.device_get(state.step))
    total = config.total_steps
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=config.tensorboard)
    bar = tqdm.tqdm(
        total=total,
        initial=step,
        desc="train",
        dynamic_ncols=True,
        disable=not (is_main and config.progress_bar),
    )
    every = lambda n: bool(n) and step % n == 0
    compiled, last_time, last_step = None, None, step

    with checkpoint_lib.PreemptionWatcher(checkpointer) as watcher:
      while step < total:
        batch = next(data)
        if compiled is None:  # compile once, outside the throughput clock
          check_batch(batch)
          compiled = train_step.lower(state, frozen, batch).compile()
          _log_memory(compiled)
          last_time = time.perf_counter()
        state, metrics = compiled(state, frozen, batch)
        step += 1
        bar.update()
        preempted = watcher.preempted(step)
        save = every(config.checkpoint_every) or step == total or preempted
        log_now = every(config.log_every) or step == total
        if save or log_now:
          scalars = _scalars(jax.device_get(metrics))  # the only host sync between logs
          _check_finite(scalars, step, checkpointer, workdir)
        if log_now:
          now = time.perf_counter()
          rate = (step - last_step) / max(now - last_time, 1e-9)
          last_time, last_step = now, step
          scalars.update(steps_per_s=rate, clips_per_s=rate * config.batch_size)
          writer.write(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
        if task.sample_fn is not None and every(config.sample_every):
          started = time.perf_counter()
          _write_samples(task, state, frozen, builder, workdir, step)
          last_time += time.perf_counter() - started  # throughput counts training only
        if task.eval_fn is not None and every(config.get("eval_every", 0)):
          started = time.perf_counter()
          results = task.eval_fn(
              state.params_for_sampling(), frozen, builder.key(config.seed + 2)
          )  # fixed: comparable over steps
          writer.write(step, {f"eval/{k}": v for k, v in results.items()})
          log.info("Step %d eval: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
          last_time += time.perf_counter() - started
        if save:
          checkpointer.save(step, state, data.get_state())
        if preempted:
          log.warning(
              "Preempted: saved step %d in %s; rerun the same command to resume.", step, workdir
          )
          break
  finally:
    checkpointer.wait()
    checkpointer.close()
    if writer is not None:
      writer.close()
    if bar is not None:
      bar.close()
  return state


def _check_finite(scalars, step, checkpointer, workdir) -> None:
  bad = {k: scalars[k] for k in ("loss", "grad_norm") if not np.isfinite(scalars[k])}
  if bad:
    checkpointer.wait()
    last = checkpointer.latest_step()
    where = (
        f"the last good checkpoint is step {last} in {checkpoint_lib.checkpoint_dir(workdir)}"
        if last is not None
        else "no checkpoint was saved yet"
    )
    raise NonFiniteLossError(
        f"Non-finite {', '.join(f'{k}={v}' for k, v in bad.items())} at step {step}; stopping "
        f"({where}). Lower the learning rate, check the data, or resume from the checkpoint."
    )


def _log_memory(compiled) -> None:
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    analysis = None
  if analysis is not None:
    log.info(
        "Train step memory per device: arguments %.1f MiB, outputs %.1f MiB, temporaries "
        "%.1f MiB.",
        analysis.argument_size_in_bytes / 2**20,
        analysis.output_size_in_bytes / 2**20,
        analysis.temp_size_in_bytes / 2**20,
    )
