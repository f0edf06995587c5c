"""LoRA fine-tuning of any task: its parameters frozen, low-rank adapters of them trained.

`config.lora` (every config has it; `vldm.train.tasks.get_task` wraps the task when rank > 0):
  rank        r of every adapter (0: off, a plain run)
  alpha       the adapters' scale is alpha / r (None: alpha = r, scale 1, PEFT's convention)
  targets     which modules: names or regexes over diffusers module names
              (`vldm.models.lora.matches`), e.g. ('to_q', 'to_k', 'to_v', 'to_out.0'), or a motion
              LoRA's ('.*temporal.*attn.*to_(q|k|v|out.0)',)
  components  the top-level parameter groups adapted, e.g. ('unet',) or ('unet', 'text_encoder')

`LoraTask(task)`:
  params   {component: adapters} (`vldm.models.lora` layout: …/to_q/lora_A/kernel, B zero at
           the start): the only trainable leaves, so the only ones with optimizer state, EMA and
           checkpoints (a resumed run restores them and continues exactly).
  frozen   the task's own frozen tree + 'lora_base': the task's parameters as a plain run of the
           same config would start (its init, then `config.init_from` or the task's pretrained
           weights through `init_from.transform`), sharded by the rules on 'frozen/lora_base/…'.
           The step never writes it: the base weights stay bit-identical.
  loss     the task's loss with every adapted kernel W + (alpha / r) · A·B, merged inside the
           step (gradients reach A and B through the merge).
Sampling, evaluation and `vldm.recipes.stages` (sample, export) see the merged parameters
(`task_params`); `python -m vldm.export --workdir RUN --lora OUT` writes the adapters alone as a
diffusers LoRA file.
"""

from __future__ import annotations

from typing import Optional

import jax

from vldm.models import lora as lora_lib
from vldm.train import sharding as sharding_lib
from vldm.train import state as state_lib
from vldm.train import tasks as tasks_lib

BASE = "lora_base"


def settings(config) -> dict:
  """{rank, alpha, scale, targets, components} of `config.lora`, checked."""
  c = config.lora
  rank = int(c.rank)
  if rank < 1:
    raise tasks_lib.TaskInputError(f"lora.rank must be ≥ 1 for a LoRA run, got {c.rank}.")
  alpha = float(c.alpha) if c.get("alpha") is not None else float(rank)
  targets = (c.targets,) if isinstance(c.targets, str) else tuple(c.targets)
  components = (c.components,) if isinstance(c.components, str) else tuple(c.components)
  if not targets or not components:
    raise tasks_lib.TaskInputError("lora.targets and lora.components must not be empty.")
  return dict(rank=rank, alpha=alpha, scale=alpha / rank, targets=targets, components=components)


class LoraTask(tasks_lib.Task):
  """`task` with its parameters frozen and LoRA adapters trained (see the module docstring)."""

  owns_init_from = True

  def __init__(self, task: tasks_lib.Task):
    super().__init__(task.config)
    self.inner = task
    s = settings(task.config)
    self.rank, self.alpha, self.scale = s["rank"], s["alpha"], s["scale"]
    self.targets, self.components = s["targets"], s["components"]
    self.rules = tuple(tuple(r) for r in task.config.sharding.params)
    self._abstract_base = None
    self._modules = None
    # The trainer checks these attributes for None: keep the inner task's absence.
    if task.sample_fn is not None:
      self.sample_fn = lambda params, frozen, rng: task.sample_fn(
          *self.task_params(params, frozen), rng
      )
    if task.eval_fn is not None:
      self.eval_fn = lambda params, frozen, rng: task.eval_fn(
          *self.task_params(params, frozen), rng
      )

  # ---- the base model ---------------------------------------------------------------------
  def _key(self):
    return jax.random.key(self.config.seed, impl=state_lib.prng_impl(self.config))

  def abstract_base(self):
    """The task's parameters as ShapeDtypeStructs (traced once)."""
    if self._abstract_base is None:
      self._abstract_base = jax.eval_shape(self.inner.init_params, self._key())
    return self._abstract_base

  def modules(self) -> dict:
    """{component: {module name: path}} of the adapted modules."""
    if self._modules is None:
      base = self.abstract_base()
      unknown = [c for c in self.components if c not in base]
      if unknown:
        raise tasks_lib.TaskInputError(
            f"lora.components {list(unknown)} are not parameter groups of "
            f"{type(self.inner).__name__}; it has {sorted(base)}."
        )
      try:
        self._modules = {
            c: lora_lib.select(base[c], self.targets, what=f"the {c}") for c in self.components
        }
      except ValueError as e:
        raise tasks_lib.TaskInputError(f"lora.targets: {e}") from e
    return self._modules

  def base_params(self, mesh=None):
    """The frozen base: the task's init, then `config.init_from` / its pretrained weights through
    the transform, exactly as a plain run of this config starts; sharded on `mesh` (None: all
    devices, one data axis)."""
    from vldm.train import trainer  # pylint: disable=g-import-not-at-top  # trainer imports tasks

    if mesh is None:
      mesh = sharding_lib.make_mesh((("data", -1),))
    abstract = self.abstract_base()
    shardings = sharding_lib.tree_shardings(abstract, mesh, self.rules, prefix=f"frozen/{BASE}/")
    params = jax.jit(self.inner.init_params, out_shardings=shardings)(self._key())
    init_from = trainer.load_init_from(self.config, self.inner, abstract, self.rules, mesh)
    if init_from is not None:
      source, transform, _ = init_from
      params = jax.jit(transform, out_shardings=shardings)(source, params)
    return params

  def task_params(self, params, frozen):
    """(the task's parameters with the adapters merged, the task's own frozen tree)."""
    base = frozen[BASE]
    merged = dict(base)
    for component, adapters in params.items():
      merged[component] = lora_lib.merge(base[component], adapters, self.scale)
    return merged, {k: v for k, v in frozen.items() if k != BASE}

  # ---- the Task interface -----------------------------------------------------------------
  def init_params(self, rng):
    rng = jax.random.fold_in(rng, 0x10A)  # not the base init's draws
    base = self.abstract_base()
    return {
        c: lora_lib.init_adapters(jax.random.fold_in(rng, i), base[c], self.modules()[c], self.rank)
        for i, c in enumerate(self.components)
    }

  def loss_fn(self, params, frozen, batch, rng):
    return self.inner.loss_fn(*self.task_params(params, frozen), batch, rng)

  def trainable_labels(self, params):
    return None  # every adapter leaf trains; the base is not among the parameters at all

  def init_frozen(self, mesh):
    frozen = dict(self.inner.init_frozen(mesh))  # first: the task's data may need it
    frozen[BASE] = self.base_params(mesh)
    return frozen

  def abstract_frozen(self):
    return {**self.inner.abstract_frozen(), BASE: self.abstract_base()}

  def abstract_batch(self, batch_size: int):
    return self.inner.abstract_batch(batch_size)

  def make_data(self, sharding, process_index, process_count):
    return self.inner.make_data(sharding, process_index, process_count)

  def step_flops(self, batch_size: int) -> Optional[float]:
    return None  # the task's count assumes its own trainable set

  def pretrained_params(self):
    return None  # they enter the base (`base_params`), not the adapters
