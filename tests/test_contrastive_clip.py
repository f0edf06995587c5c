"""vldm.recipes.contrastive_clip: CLIP's contrastive loss, the shapes image tower's stage
(configs/svd_shapes.py:stage=clip) and how an image-to-video stage reads it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vldm.data import shapes
from vldm.recipes import contrastive_clip
from vldm.train import config_lib
from vldm.train import tasks as tasks_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "svd_shapes.py")
config_lib.ensure_importable(CONFIG)


def _log_softmax(x):
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_loss_is_clips_symmetric_cross_entropy_with_equal_captions_as_matches():
  rng = np.random.default_rng(0)
  images, texts = rng.normal(size=(5, 6)), rng.normal(size=(5, 6))
  ids = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [1, 2]])  # examples 0, 2 and 4 share a caption
  scale = 2.5
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  logits = np.exp(scale) * unit(images) @ unit(texts).T
  same = (ids[:, None, :] == ids[None, :, :]).all(-1).astype(float)
  targets = same / same.sum(1, keepdims=True)
  expected = 0.5 * (
      -(targets * _log_softmax(logits)).sum(1).mean()
      - (targets.T * _log_softmax(logits.T)).sum(1).mean()
  )
  got_targets = contrastive_clip.matching_targets(jnp.asarray(ids))
  np.testing.assert_allclose(got_targets, targets, rtol=1e-6)
  loss, accuracy = contrastive_clip.contrastive_loss(
      jnp.asarray(images, jnp.float32), jnp.asarray(texts, jnp.float32), scale, got_targets
  )
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  right = [targets[i, np.argmax(logits[i])] > 0 for i in range(5)]
  assert float(accuracy) == pytest.approx(np.mean(right))


def test_shapes_clip_stage_learns_to_match_frames_and_captions():
  config = config_lib.load_config(f"{CONFIG}:stage=clip,root=/unused")
  task = tasks_lib.get_task(config)
  # Validation stills 0–17: every colour × shape once.
  examples = [shapes.make_example("image", "validation", i, size=32) for i in range(18)]
  assert len({e["caption"] for e in examples}) == 18
  batch = dict(
      image=jnp.asarray(np.stack([e["image"] for e in examples]), jnp.float32) / 127.5 - 1,
      input_ids=jnp.asarray(task.tokenizer([e["caption"] for e in examples])),
  )
  params = task.init_params(jax.random.key(0))
  assert set(params) == {"image_encoder", "text_encoder", "text_projection", "logit_scale"}
  optimizer = optax.adam(1e-3)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    (loss, metrics), grads = jax.value_and_grad(task.loss_fn, has_aux=True)(params, {}, batch, None)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss, metrics["accuracy"]

  params, state, first, _ = step(params, state)
  for _ in range(80):
    params, state, loss, accuracy = step(params, state)
  assert float(loss) < 0.25 * float(first)
  assert float(accuracy) == 1.0


def test_i2v_stage_reads_the_clip_stages_image_tower():
  config = config_lib.load_config(f"{CONFIG}:root=/runs,clip=/runs/clip")
  assert config.ldm.image_encoder.workdir == "/runs/clip"
  assert (
      config.ldm.image_encoder.model.to_dict()
      == config_lib.load_config(f"{CONFIG}:stage=clip,root=/runs").ldm.image_encoder.model.to_dict()
  )
  assert config_lib.load_config(f"{CONFIG}:root=/runs").ldm.image_encoder.workdir is None
  with pytest.raises(ValueError, match="Unknown stage 'video'"):
    config_lib.load_config(f"{CONFIG}:stage=video,root=/runs")


def test_i2v_stage_loads_the_trained_image_tower(tmp_path):
  """`clip=ROOT/clip` (ldm.image_encoder.workdir): the i2v stage's frozen image tower is the
  contrastive stage's trained one."""
  # pylint: disable=g-import-not-at-top
  from vldm.recipes import common
  from vldm.recipes import components
  from vldm.train import trainer

  root = str(tmp_path)
  clip = config_lib.load_config(f"{CONFIG}:stage=clip,root={root},runlocal=True")
  trainer.train_and_evaluate(clip, os.path.join(root, "clip"))
  trained = common.load_stage_params(os.path.join(root, "clip"))["image_encoder"]
  i2v = config_lib.load_config(f"{CONFIG}:root={root},clip={root}/clip,runlocal=True")
  task = tasks_lib.get_task(i2v)
  loaded = components.image_encoder_params(i2v, task.image_encoder, i2v.seed)
  random = components.image_encoder_params(
      config_lib.load_config(f"{CONFIG}:root={root},runlocal=True"), task.image_encoder, i2v.seed
  )
  leaves = jax.tree_util.tree_leaves
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(trained)
  for got, want in zip(leaves(loaded), leaves(trained)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Not the random tower the i2v stage builds without `clip=`.
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(loaded), leaves(random)))
