"""The trainer on one device with the toy task: end to end, resume, frozen layers, hand-off, errors."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

import toy_task
from vldm import video_io
from vldm.train import checkpoint as checkpoint_lib
from vldm.train import config_lib
from vldm.train import metrics as metrics_lib
from vldm.train import sharding as sharding_lib
from vldm.train import tasks as tasks_lib
from vldm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs_tiny.py")  # the toy task (tests/toy_task.py)
config_lib.ensure_importable(os.path.join(REPO, "configs", "common.py"))  # configs_tiny imports it


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  # Each train_and_evaluate jits afresh; identical programs come back from the disk cache.
  previous = (
      jax.config.jax_compilation_cache_dir,
      jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
  compilation_cache.reset_cache()


def tiny(**overrides):
  base = {
      "total_steps": 4,
      "checkpoint_every": 2,
      "log_every": 2,
      "keep_checkpoints": 0,
      "tensorboard": False,
      "progress_bar": False,
  }
  return config_lib.load_config(TINY, {**base, **overrides})


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def saved_steps(workdir, config):
  checkpointer = checkpoint_lib.Checkpointer(workdir, config)
  steps = checkpointer.manager.all_steps()
  checkpointer.close()
  return list(steps)


def assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(path))


# A task that is interrupted while fetching a chosen batch (SIGTERM, or a crash).
INTERRUPT = {"batch": None, "how": None}


class InterruptedData(toy_task.ToyData):

  def __next__(self):
    if self.next_batch == INTERRUPT["batch"]:
      INTERRUPT["batch"] = None
      if INTERRUPT["how"] == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
      else:
        raise RuntimeError("simulated crash")
    return super().__next__()


@tasks_lib.register_task("toy_interrupted")
class InterruptedToyTask(toy_task.ToyTask):

  def make_data(self, sharding, process_index, process_count):
    return InterruptedData(self.config, sharding)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """4 uninterrupted steps, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("reference")
  state = trainer.train_and_evaluate(tiny(), workdir)
  return workdir, host(state)


def test_one_step_end_to_end(tmp_path):
  config = tiny(total_steps=1, log_every=1, sample_every=1, eval_every=1, tensorboard=True)
  state = trainer.train_and_evaluate(config, tmp_path)
  assert int(state.step) == 1
  record, evaluation = metrics_lib.read_metrics(tmp_path)
  assert record["step"] == evaluation["step"] == 1
  for key in ("loss", "learning_rate", "grad_norm", "steps_per_s", "clips_per_s"):
    assert np.isfinite(record[key]), key
  assert 0 <= evaluation["eval/sample_mean"] <= 1  # the task's eval_fn, every eval_every steps
  (events,) = os.listdir(tmp_path / "tensorboard")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # already loaded by the writer

  tags = {
      v.tag: v.metadata.plugin_data.plugin_name
      for e in tf.compat.v1.train.summary_iterator(str(tmp_path / "tensorboard" / events))
      for v in e.summary.value
  }
  assert tags["loss"] == "scalars" and "grad_norm" in tags and "clips_per_s" in tags
  assert tags["eval/sample_mean"] == "scalars"
  frames = video_io.read_frames(str(tmp_path / "samples" / "00000001" / "prompt_0.gif"))
  assert frames.shape == (8, 8, 8, 3)
  step_dir = tmp_path / "checkpoints" / "1"
  assert json.loads((step_dir / "data" / "metadata").read_text()) == {"next_batch": 1}
  saved_config = json.loads((step_dir / "config" / "metadata").read_text())
  assert saved_config["total_steps"] == 1 and saved_config["toy"]["features"] == 8


@pytest.mark.parametrize("how", ["sigterm", "crash"])
def test_interrupted_run_resumes_to_the_same_result(reference, tmp_path, how):
  _, expected = reference
  config = tiny(task="toy_interrupted")
  INTERRUPT.update(batch=1 if how == "sigterm" else 2, how=how)
  if how == "sigterm":  # the handler saves after the step in flight and returns
    state = trainer.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 2
  else:  # a crash in step 3 loses it; the periodic checkpoint of step 2 remains
    with pytest.raises(RuntimeError, match="simulated crash"):
      trainer.train_and_evaluate(config, tmp_path)
  assert saved_steps(tmp_path, config)[-1] == 2
  resumed = host(trainer.train_and_evaluate(config, tmp_path))
  assert int(resumed.step) == 4
  assert_trees_close(resumed.params, expected.params, atol=1e-6)
  assert_trees_close(resumed.ema_params, expected.ema_params, atol=1e-6)
  assert_trees_close(resumed.opt_state, expected.opt_state, atol=1e-6)
  data = json.loads((tmp_path / "checkpoints" / "4" / "data" / "metadata").read_text())
  assert data == {"next_batch": 4}


def test_run_resumes_under_its_own_prng_impl(reference, tmp_path):
  """A run trained with prng_impl='rbg' while the process default is rbg too (as vldm.demo sets
  it) resumes exactly under the default threefry: the state's key follows the config."""
  _, threefry = reference
  workdir = tmp_path / "rbg"
  config = tiny(prng_impl="rbg")
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  try:
    expected = host(trainer.train_and_evaluate(config, workdir))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
  assert previous == "threefry2x32" and expected.rng.shape == (4,)  # rbg's key data
  assert threefry.rng.shape == (2,)  # threefry2x32's
  assert (
      np.abs(expected.params["conv_out"]["kernel"] - threefry.params["conv_out"]["kernel"]).max()
      > 1e-6
  )  # other draws
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = host(trainer.train_and_evaluate(config, workdir))
  assert int(resumed.step) == 4
  np.testing.assert_array_equal(resumed.rng, expected.rng)
  assert_trees_close(resumed.params, expected.params, atol=1e-6)
  assert_trees_close(resumed.opt_state, expected.opt_state, atol=1e-6)
  with pytest.raises(
      checkpoint_lib.CheckpointMismatchError,
      match=r"key of shape \(4,\), but config.prng_impl='threefry2x32' makes keys "
      r"of shape \(2,\).*one of \['rbg', 'unsafe_rbg'\]",
  ):
    trainer.train_and_evaluate(tiny(), workdir)  # resumed without the run's prng_impl
  with pytest.raises(
      ValueError, match="config.prng_impl='rgb' is not a jax PRNG implementation.*" "rbg"
  ):
    trainer.train_and_evaluate(tiny(prng_impl="rgb"), tmp_path / "bad")


def test_stage_hand_off_with_frozen_layers(reference, tmp_path):
  """Like image → video: a deeper model starts from the shallower run's parameters ('grow'),
  the copied layers stay frozen and only the new block (and the output layers) train."""
  source_dir, _ = reference
  frozen_names = ("conv_in", "time_embedding", "blocks_0", "blocks_1")
  config = tiny(
      total_steps=2,
      **{
          "toy.depth": 3,
          "toy.freeze": f"^({'|'.join(frozen_names)})/",
          "init_from.workdir": str(source_dir),
          "init_from.transform": "grow",
      },
  )
  state = host(trainer.train_and_evaluate(config, tmp_path))
  mesh = sharding_lib.make_mesh(config.mesh)
  source = traverse_util.flatten_dict(host(checkpoint_lib.load_params(source_dir, mesh)))
  params = traverse_util.flatten_dict(state.params)
  assert {k for k in params if k not in source} == {k for k in params if k[0] == "blocks_2"}
  trainable = {k for k in params if k[0] not in frozen_names}
  for key, value in source.items():
    if key not in trainable:  # bit-identical after two updates
      np.testing.assert_array_equal(params[key], value, err_msg=str(key))
  assert not np.allclose(params["conv_out", "kernel"], source["conv_out", "kernel"])
  opt_leaves = [
      (jax.tree_util.keystr(p), x)
      for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
      if np.ndim(x) > 0
  ]
  assert len(opt_leaves) == 2 * len(trainable)  # Adam's mu and nu, for trainable leaves only
  assert not [p for p, _ in opt_leaves if any(f"'{name}'" in p for name in frozen_names)]
  assert set(traverse_util.flatten_dict(state.ema_params)) == trainable


def test_init_from_errors(reference, tmp_path):
  source_dir, _ = reference
  missing = tiny(**{"init_from.workdir": str(tmp_path / "no_such_run")})
  with pytest.raises(FileNotFoundError, match="init_from.workdir.*does not exist"):
    trainer.train_and_evaluate(missing, tmp_path / "a")
  deeper = tiny(**{"toy.depth": 3, "init_from.workdir": str(source_dir)})  # 'as_is'
  with pytest.raises(
      checkpoint_lib.CheckpointMismatchError,
      match="(?s)'as_is'.*missing in the checkpoint: blocks_2/conv1/kernel",
  ):
    trainer.train_and_evaluate(deeper, tmp_path / "b")
  with pytest.raises(ValueError, match="Unknown init_from transform 'grw'.*'grow'"):
    trainer.train_and_evaluate(
        tiny(**{"init_from.workdir": str(source_dir), "init_from.transform": "grw"}), tmp_path / "c"
    )


def test_resuming_with_an_incompatible_model_fails_clearly(reference, tmp_path):
  source_dir, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(source_dir, workdir)
  with pytest.raises(
      checkpoint_lib.CheckpointMismatchError,
      match="(?s)does not fit this model.*shape .*8.* in the checkpoint",
  ):
    trainer.train_and_evaluate(tiny(**{"toy.features": 12, "toy.groups": 4}), workdir)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny(checkpoint_every=1, **{"toy.nan_batch": 2})
  with pytest.raises(
      trainer.NonFiniteLossError,
      match="(?s)Non-finite loss=nan.* at step 3.*last good checkpoint is step 2",
  ):
    trainer.train_and_evaluate(config, tmp_path)
  assert saved_steps(tmp_path, config) == [1, 2]
  params = checkpoint_lib.load_params(tmp_path, sharding_lib.make_mesh(config.mesh), use_ema=False)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(host(params)))


def test_unknown_config_key_names_the_closest_keys(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "vldm.train",
          "--config",
          TINY,
          "--workdir",
          str(tmp_path),
          "--config.optim.lrr=1",
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert result.returncode != 0
  assert "Unknown config key 'optim.lrr'; the closest valid keys are: optim.lr" in result.stderr
  with pytest.raises(ValueError, match="Unknown config key 'no_such_key'; the closest valid keys"):
    config_lib.load_config(TINY, {"no_such_key": 1})
