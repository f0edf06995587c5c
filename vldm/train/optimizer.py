"""AdamW with linear warmup, cosine (or constant) decay and global-norm clipping; EMA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DECAYS = ("cosine", "constant")


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr`, then cosine decay to `lr * end_lr_factor` at the end."""
  optim = config.optim
  warmup = min(optim.warmup_steps, config.total_steps)
  if optim.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1), end_value=optim.lr * optim.end_lr_factor)
  if optim.decay == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim.lr, max(warmup, 1)), optax.constant_schedule(optim.lr)],
        [warmup])
  raise ValueError(f"Unknown optim.decay {optim.decay!r}; accepted: {DECAYS}.")


def _decay_mask(params):
  # Weight decay on kernels and embeddings only, not on biases or norm scales.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for the trainable parameters only (frozen ones never reach it)."""
  optim = config.optim
  schedule = learning_rate_schedule(config)
  parts = []
  if optim.grad_clip:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule


def ema_update(ema, params, decay: float):
  """ema ← decay·ema + (1 − decay)·params, leaf by leaf."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def global_norm(tree):
  return optax.global_norm(tree).astype(jnp.float32)
