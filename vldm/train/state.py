"""The train state, its sharded initialisation and the train step."""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vldm.train import optimizer as optimizer_lib
from vldm.train import sharding as sharding_lib
from vldm.train import tasks as tasks_lib


@flax.struct.dataclass
class TrainState:
  """Everything a run updates; checkpointed item by item (see vldm.train.checkpoint)."""
  step: jax.Array          # int32 scalar: the number of updates applied
  params: Any              # the full parameter tree (float32), trainable and frozen leaves
  opt_state: Any           # optimizer state of the trainable leaves only
  ema_params: Any          # EMA of the trainable leaves only; None when ema_decay is 0
  rng: jax.Array           # raw uint32 key data of config.prng_impl; step keys: fold_in(rng, step)

  def params_for_sampling(self):
    """Parameters with the EMA (where kept) in place of the trainable leaves."""
    return tasks_lib.merge(self.params, self.ema_params)


def prng_impl(config) -> str:
  """`config.prng_impl`, checked; the process default for configs saved before the key existed."""
  name = config.get("prng_impl") or jax.config.jax_default_prng_impl
  try:
    jax.random.key(0, impl=name)
  except (ValueError, TypeError) as e:  # jax's message lists the accepted names
    raise ValueError(f"config.prng_impl={name!r} is not a jax PRNG implementation: {e}") from None
  return name


class StateBuilder:
  """Builds the state's functions once the trainable leaves are known.

  Everything here is shape-first: `abstract_state` comes from `jax.eval_shape`, shardings are
  derived from it, and the real state is created by a jit with those out_shardings.
  """

  def __init__(self, task: tasks_lib.Task, config, mesh):
    self.task, self.config, self.mesh = task, config, mesh
    self.tx, self.schedule = optimizer_lib.make_optimizer(config)
    self.ema_decay = float(config.ema_decay)
    self.rules = tuple(tuple(r) for r in config.sharding.params)
    self.prng_impl = prng_impl(config)
    self.abstract_params = jax.eval_shape(task.init_params, self.key(0))
    labels = task.trainable_labels(self.abstract_params)
    self.trainable = tasks_lib.trainable_paths(self.abstract_params, labels)
    self.param_shardings = sharding_lib.tree_shardings(self.abstract_params, mesh, self.rules,
                                                       prefix="params/")
    self.abstract_state = jax.eval_shape(self.state_from_params, self.abstract_params,
                                         jax.random.key_data(self.key(0)))
    self.state_shardings = sharding_lib.tree_shardings(self.abstract_state, mesh, self.rules)

  def key(self, seed: int) -> jax.Array:
    """A typed key of the config's implementation, independent of the process default."""
    return jax.random.key(seed, impl=self.prng_impl)

  def state_from_params(self, params, rng) -> TrainState:
    trainable, _ = tasks_lib.split(params, self.trainable)
    ema = jax.tree.map(jnp.copy, trainable) if self.ema_decay else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(trainable), ema_params=ema, rng=rng)

  def init_params(self, seed: int):
    """Freshly initialised parameters, created sharded."""
    init = jax.jit(self.task.init_params, out_shardings=self.param_shardings)
    return init(self.key(seed))

  def init_state(self, params, seed: int) -> TrainState:
    """A step-0 state around `params` (donated), created sharded."""
    build = jax.jit(self.state_from_params, out_shardings=self.state_shardings,
                    donate_argnums=(0,))
    # Stored as raw key data: checkpoints hold plain uint32 arrays.
    return build(params, jax.random.key_data(jax.random.fold_in(self.key(seed), 1)))

  def make_train_step(self, frozen_shardings, batch_shardings) -> Callable:
    """The jitted step `(state, frozen, batch) -> (state, metrics)`, state donated."""
    task, tx, paths, decay = self.task, self.tx, self.trainable, self.ema_decay
    activation_rules = tuple(tuple(r) for r in self.config.sharding.activations)
    schedule, mesh, impl = self.schedule, self.mesh, self.prng_impl

    def step_fn(state: TrainState, frozen, batch):
      # Typed: the task's draws follow the config's implementation, not the process default.
      rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl=impl), state.step)
      trainable, fixed = tasks_lib.split(state.params, paths)

      def loss_of(trainable):
        return task.loss_fn(tasks_lib.merge(trainable, fixed), frozen, batch, rng)

      # Activation constraints (nn.with_logical_constraint in models) resolve on this mesh.
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
          nn.logical_axis_rules(activation_rules):
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
      updates, opt_state = tx.update(grads, state.opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
      ema = (optimizer_lib.ema_update(state.ema_params, trainable, decay)
             if state.ema_params is not None else None)
      metrics = dict(metrics, loss=loss, grad_norm=optimizer_lib.global_norm(grads),
                     learning_rate=schedule(state.step))
      new_state = state.replace(step=state.step + 1, params=tasks_lib.merge(trainable, fixed),
                                opt_state=opt_state, ema_params=ema)
      return new_state, metrics

    return jax.jit(step_fn, in_shardings=(self.state_shardings, frozen_shardings, batch_shardings),
                   out_shardings=(self.state_shardings, sharding_lib.replicated(self.mesh)),
                   donate_argnums=(0,))
