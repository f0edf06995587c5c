"""Fast checks of the trainer's parts: config arguments, sharding rules, tasks, video files."""
import os
import runpy
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldm import devices
from vldm import video_io
from vldm.train import config_lib
from vldm.train import distributed
from vldm.train import optimizer as optimizer_lib
from vldm.train import sharding as sharding_lib
from vldm.train import state as state_lib
from vldm.train import tasks as tasks_lib
from vldm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "configs_tiny.py")  # the toy task (tests/toy_task.py)
config_lib.ensure_importable(os.path.join(REPO, "configs", "common.py"))  # for configs_tiny too
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_parse_arg_converts_by_default_type_and_names_accepted_keys():
  arg = common.parse_arg("stage=video,runlocal,res=64, lr=0.5", stage="image", runlocal=False,
                         res=32, lr=1.0)
  assert (arg.stage, arg.runlocal, arg.res, arg.lr) == ("video", True, 64, 0.5)
  assert common.parse_arg(None, runlocal=False).runlocal is False
  assert common.parse_arg("runlocal=False", runlocal=True).runlocal is False
  with pytest.raises(ValueError, match="Unknown config argument 'stag'.*did you mean 'stage'"):
    common.parse_arg("stag=video", stage="image")
  with pytest.raises(ValueError, match="res=abc must be of type int"):
    common.parse_arg("res=abc", res=32)


def test_config_has_the_common_keys_and_is_locked():
  config = config_lib.load_config(TINY + ":runlocal=False")
  for key in ("total_steps", "batch_size", "seed", "log_every", "checkpoint_every",
              "init_from.workdir", "init_from.transform", "mesh", "dtype", "remat_policy",
              "prng_impl"):
    assert config_lib.unknown_key_error(config, key) is None, key
  assert config.total_steps == 2000 and config.toy.resolution == 32
  with pytest.raises(AttributeError):
    config.no_such_key = 1
  assert config_lib.override_keys(["--config.a.b=1", "--noconfig.c", "--workdir=x"]) == ["a.b", "c"]


def test_make_mesh_fills_the_rest_and_rejects_bad_shapes():
  mesh = sharding_lib.make_mesh((("data", -1), ("fsdp", 1)))
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
  with pytest.raises(ValueError, match="needs 3 devices"):
    sharding_lib.make_mesh((("data", 3), ("fsdp", 1)), devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="at most one axis may have size -1"):
    sharding_lib.make_mesh((("data", -1), ("fsdp", -1)))


def test_cpu_cores_become_devices_only_when_they_divide_every_batch(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
  assert devices.cpu_cores_as_devices([8, 2, 64]) == 2
  assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2 "
                                     "--xla_cpu_multi_thread_eigen=false")
  assert devices.cpu_cores_as_devices([8]) == 0  # a device count is set already: it stays
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
  assert devices.cpu_cores_as_devices([8, 2]) == 0 and not os.environ["XLA_FLAGS"]
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
  assert devices.cpu_cores_as_devices([8]) == 0 and not os.environ["XLA_FLAGS"]


def test_split_batch_leaves_one_device_alone():
  x = np.zeros((4, 3), np.float32)
  out, none = devices.split_batch(x, None)
  assert none is None and out is x


def test_fsdp_spec_shards_the_largest_divisible_axis():
  P = jax.sharding.PartitionSpec
  assert sharding_lib.fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, "fsdp")
  assert sharding_lib.fsdp_spec((3, 3, 320, 6), 4) == P(None, None, "fsdp", None)
  assert sharding_lib.fsdp_spec((3, 3, 5, 7), 4) == P()  # nothing divides
  assert sharding_lib.fsdp_spec((1024,), 4) == P()  # vectors stay replicated
  assert sharding_lib.fsdp_spec((64, 64), 1) == P()


def test_distributed_is_wanted_only_for_several_processes():
  assert not distributed.wanted({})
  assert not distributed.wanted({"SLURM_NTASKS": "1"})
  assert distributed.wanted({"SLURM_NTASKS": "8"})
  assert distributed.wanted({"VLDM_DISTRIBUTED": "1"})
  assert not distributed.wanted({"VLDM_DISTRIBUTED": "0", "SLURM_NTASKS": "8"})
  with pytest.raises(ValueError, match="VLDM_DISTRIBUTED"):
    distributed.wanted({"VLDM_DISTRIBUTED": "maybe"})


def test_unknown_task_and_labels_are_clear_errors(monkeypatch):
  config = config_lib.load_config(TINY, {"task": "tyo"})
  monkeypatch.setattr(tasks_lib, "_TASKS", {})  # none registered: import paths only
  with pytest.raises(ValueError, match="Unknown task 'tyo'; give a 'package.module:ClassName' "
                     "path\\.$"):
    tasks_lib.get_task(config)
  tasks_lib.register_task("toy", "toy_task:ToyTask")
  with pytest.raises(ValueError, match="Unknown task 'tyo'.*registered name.*closest: \\['toy'\\]"):
    tasks_lib.get_task(config)
  assert type(tasks_lib.get_task(config_lib.load_config(TINY))).__name__ == "ToyTask"  # by path
  params = {"a": {"kernel": 1}, "b": {"kernel": 2}}
  with pytest.raises(ValueError, match="Unknown trainable labels \\['frozen'\\]"):
    tasks_lib.trainable_paths(params, {"a": {"kernel": "train"}, "b": {"kernel": "frozen"}})
  with pytest.raises(ValueError, match="froze every parameter"):
    tasks_lib.trainable_paths(params, {"a": {"kernel": "freeze"}, "b": {"kernel": "freeze"}})
  paths = tasks_lib.trainable_paths(params, {"a": {"kernel": "train"}, "b": {"kernel": "freeze"}})
  trainable, frozen = tasks_lib.split(params, paths)
  assert trainable == {"a": {"kernel": 1}} and frozen == {"b": {"kernel": 2}}
  assert tasks_lib.merge(trainable, frozen) == params


def test_batches_must_be_arrays():
  trainer.check_batch({"image": jnp.zeros((2,))})
  with pytest.raises(TypeError, match="host values at .*'caption'.*jax.Arrays"):
    trainer.check_batch({"image": jnp.zeros((2,)), "caption": ["a red square", "a blue circle"]})


def test_copy_matching_keeps_new_leaves():
  source = {"a": jnp.ones((2,)), "b": jnp.ones((3,))}
  target = {"a": jnp.zeros((2,)), "b": jnp.zeros((4,)), "c": jnp.zeros((1,))}
  out = tasks_lib.copy_matching(source, target)
  np.testing.assert_array_equal(out["a"], 1.0)
  np.testing.assert_array_equal(out["b"], 0.0)  # shape changed: keeps its init
  with pytest.raises(tasks_lib.CheckpointMismatchError,
                     match="(?s)shape \\(3,\\) in the checkpoint, \\(4,\\) in this model: b"):
    tasks_lib.as_is(source, target)


def test_bfloat16_compute_and_remat_keep_float32_params():
  """Shapes only (no compile): params stay float32 under bf16 compute; remat policies by name."""
  config = config_lib.load_config(TINY, {"dtype": "bfloat16", "remat_policy": "nothing_saveable"})
  task = tasks_lib.get_task(config)
  builder = state_lib.StateBuilder(task, config, sharding_lib.make_mesh(config.mesh))
  assert {x.dtype for x in jax.tree.leaves(builder.abstract_params)} == {jnp.dtype("float32")}
  batch = {"image": jnp.zeros((8, 8, 8, 3)), "label": jnp.zeros((8,), jnp.int32)}
  frozen = task.init_frozen(None)
  loss, _ = jax.eval_shape(task.loss_fn, builder.abstract_params, frozen, batch,
                           jax.random.PRNGKey(0))
  assert loss.dtype == jnp.float32 and loss.shape == ()
  bad = config_lib.load_config(TINY, {"remat_policy": "everything"})
  with pytest.raises(ValueError, match="Unknown remat policy 'everything'"):
    jax.eval_shape(tasks_lib.get_task(bad).init_params, jax.random.PRNGKey(0))


def test_state_key_follows_the_configs_prng_impl():
  """Shapes only: the state's raw key is the config's implementation's, whatever the process
  default; configs from before the key take the process default."""
  mesh = sharding_lib.make_mesh((("data", -1),))
  for impl, shape in (("threefry2x32", (2,)), ("rbg", (4,))):
    config = config_lib.load_config(TINY, {"prng_impl": impl})
    builder = state_lib.StateBuilder(tasks_lib.get_task(config), config, mesh)
    rng = builder.abstract_state.rng
    assert rng.shape == shape and rng.dtype == "uint32"
    assert jax.random.key_impl(builder.key(0)) == jax.random.key_impl(jax.random.key(0, impl=impl))
  old = config_lib.load_config(TINY)
  old.unlock()
  del old["prng_impl"]
  assert state_lib.prng_impl(old) == jax.config.jax_default_prng_impl
  with pytest.raises(ValueError, match="config.prng_impl='threefry' is not a jax PRNG "
                                       "implementation.*threefry2x32"):
    state_lib.prng_impl(config_lib.load_config(TINY, {"prng_impl": "threefry"}))


def test_configs_are_installed_with_the_package(monkeypatch):
  """setup.py packages configs/ (the demo loads configs/shapes.py, which imports configs.common),
  and the demo finds its config file."""
  import setuptools  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(setuptools, "setup", lambda **kwargs: calls.append(kwargs))
  monkeypatch.chdir(REPO)  # find_packages looks under the working directory, as pip runs it
  runpy.run_path(os.path.join(REPO, "setup.py"))
  (kwargs,) = calls
  assert "configs" in kwargs["packages"] and "vldm.train" in kwargs["packages"]
  assert "tests" not in kwargs["packages"]
  from vldm import demo  # pylint: disable=g-import-not-at-top
  assert os.path.isfile(demo.CONFIG_FILE) and demo.CONFIG_FILE.endswith(
      os.path.join("configs", "shapes.py"))


def test_installed_wheel_holds_configs_and_the_demo_finds_them(tmp_path):
  """`pip install .` (not editable): the demo loads configs/shapes.py from the installed copy."""
  source = tmp_path / "source"  # a copy: building in place would write build/ into the checkout
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
  for name in ("vldm", "configs"):
    shutil.copytree(os.path.join(REPO, name), source / name, ignore=ignore)
  shutil.copy(os.path.join(REPO, "setup.py"), source)
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(source), "-w",
                        str(tmp_path / "wheel")], check=True, timeout=120, capture_output=True)
  (wheel,) = (tmp_path / "wheel").iterdir()
  with zipfile.ZipFile(wheel) as f:
    assert {"configs/__init__.py", "configs/common.py", "configs/shapes.py"} <= set(f.namelist())
  site = tmp_path / "site"
  subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                 check=True, timeout=120, capture_output=True)
  found = subprocess.run(
      [sys.executable, "-c", "from vldm import demo; print(demo.__file__, demo.CONFIG_FILE)"],
      cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)), check=True, timeout=120,
      capture_output=True, text=True).stdout.split()
  assert found == [str(site / "vldm" / "demo.py"), str(site / "configs" / "shapes.py")]


def test_schedule_warms_up_then_decays():
  config = config_lib.load_config(TINY, {"total_steps": 100, "optim.warmup_steps": 10})
  schedule = optimizer_lib.learning_rate_schedule(config)
  lr = config.optim.lr
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(lr)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)
  constant = optimizer_lib.learning_rate_schedule(
      config_lib.load_config(TINY, {"optim.decay": "constant", "optim.warmup_steps": 10}))
  assert float(constant(50)) == pytest.approx(lr)


@pytest.mark.filterwarnings("ignore:os.fork")  # imageio starts ffmpeg: fork + exec is safe
def test_gif_and_mp4_round_trip(tmp_path):
  frames = np.zeros((5, 16, 18, 3), np.float32)
  for i in range(5):
    frames[i, 4:10, 2 + 2 * i:8 + 2 * i] = (1.0, 0.2, 0.2)  # a red square moving right
  gif = video_io.write_gif(frames, str(tmp_path / "a" / "clip.gif"), fps=4)
  back = video_io.read_frames(gif)
  assert back.shape == (5, 16, 18, 3)
  np.testing.assert_allclose(back.astype(np.float32) / 255.0, frames, atol=0.02)
  mp4 = video_io.write_mp4(frames * 2.0 - 1.0, str(tmp_path / "clip.mp4"), fps=4,
                           value_range=(-1.0, 1.0))
  back = video_io.read_frames(mp4)
  assert back.shape == (5, 16, 18, 3)
  assert abs(back.astype(np.float32).mean() / 255.0 - frames.mean()) < 0.03
  with pytest.raises(ValueError, match="Expected frames of shape"):
    video_io.to_uint8(np.zeros((2, 3)))


def test_png_exact_or_on_a_palette(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)  # 1600 colors
  exact = video_io.write_png(image, str(tmp_path / "a" / "exact.png"))
  np.testing.assert_array_equal(video_io.read_frames(exact)[0], image)
  back = video_io.read_frames(video_io.write_png(image, str(tmp_path / "p.png"), palette=True))
  assert back.shape == (1, 40, 40, 3) and len(np.unique(back.reshape(-1, 3), axis=0)) <= 256
  assert np.abs(back[0].astype(float) - image).mean() < 20  # lossy, but near
