"""The trainer on several devices and processes (subprocesses with fake CPU devices).

Each subprocess sets XLA_FLAGS before importing jax; results are compared here with the same run
on this process's single device.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import traverse_util
from jax.experimental.compilation_cache import compilation_cache

from vldm.train import checkpoint as checkpoint_lib
from vldm.train import config_lib
from vldm.train import metrics as metrics_lib
from vldm.train import sharding as sharding_lib
from vldm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
TINY = os.path.join(TESTS, "configs_tiny.py")  # the toy task (tests/toy_task.py)
config_lib.ensure_importable(os.path.join(REPO, "configs", "common.py"))  # configs_tiny imports it
OVERRIDES = {"total_steps": 4, "checkpoint_every": 2, "log_every": 2, "keep_checkpoints": 0,
             "tensorboard": False, "progress_bar": False}
TOLERANCE = 1e-5


def subprocess_env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
             PYTHONPATH=os.pathsep.join([REPO, TESTS]))  # configs, and the task toy_task
  env.update(extra)
  return env


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  # Each train_and_evaluate jits afresh; identical programs come back from the disk cache.
  path = str(tmp_path_factory.getbasetemp() / "jax_cache")
  previous = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  jax.config.update("jax_compilation_cache_dir", previous[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The run on one device: 4 steps, checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("single_device")
  state = trainer.train_and_evaluate(config_lib.load_config(TINY, OVERRIDES), workdir)
  return workdir, jax.tree.map(np.asarray, jax.device_get(state))


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def assert_close(actual: dict, expected: dict, atol=TOLERANCE):
  assert actual.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], atol=atol, rtol=0, err_msg=key)


EIGHT_DEVICES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import traverse_util
    from vldm.train import config_lib, trainer
    tiny, fresh, resumed, out = sys.argv[1:5]
    overrides = json.loads(sys.argv[5])
    overrides["mesh"] = (("data", 2), ("fsdp", 4))
    config = config_lib.load_config(tiny, overrides)
    assert jax.device_count() == 8
    report = {}
    for name, workdir in (("fresh", fresh), ("resumed", resumed)):
      state = trainer.train_and_evaluate(config, workdir)
      params = traverse_util.flatten_dict(state.params)
      np.savez(f"{out}/{name}.npz", **{"/".join(k): np.asarray(v) for k, v in params.items()})
      report[name] = {"/".join(k): [str(v.sharding.spec), list(v.addressable_shards[0].data.shape)]
                      for k, v in params.items()}
    print("REPORT" + json.dumps(report))
""")


def test_eight_devices_match_one_and_shard_params(reference, tmp_path, compile_cache):
  ref_dir, expected = reference
  resumed = tmp_path / "resumed"  # the single-device run's step-2 checkpoint, resumed on 8
  shutil.copytree(ref_dir, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  os.remove(resumed / "metrics.jsonl")
  result = subprocess.run(
      [sys.executable, "-c", EIGHT_DEVICES, TINY, str(tmp_path / "fresh"), str(resumed),
       str(tmp_path), json.dumps(OVERRIDES)],
      env=subprocess_env(8, **compile_cache), cwd=REPO, capture_output=True, text=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.split("REPORT", 1)[1])
  for name in ("fresh", "resumed"):
    assert_close(dict(np.load(tmp_path / f"{name}.npz")), flat(expected.params))
  # FSDP: kernels shard their largest divisible axis over the 4-way 'fsdp' axis.
  shardings = report["fresh"]
  assert shardings["blocks_0/conv1/kernel"] == ["P(None, None, None, 'fsdp')",
                                                [3, 3, 8, 2]]
  assert shardings["conv_out/kernel"] == ["P(None, None, 'fsdp', None)", [3, 3, 2, 3]]
  for name, (spec, shard_shape) in shardings.items():  # every kernel sharded, vectors not
    assert ("fsdp" in spec) == (len(shard_shape) > 1), name
  rates = [r["steps_per_s"] for r in metrics_lib.read_metrics(tmp_path / "fresh")]
  print(f"8 fake devices: {rates[-1]:.1f} steps/s")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
  _, expected = reference
  workdir = tmp_path / "two_processes"
  port = free_port()
  args = [sys.executable, "-m", "vldm.train", "--config", TINY, "--workdir", str(workdir),
          "--config.mesh=(('data', -1), ('fsdp', 2))"]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  processes = [
      subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=subprocess_env(2, VLDM_DISTRIBUTED="1", JAX_NUM_PROCESSES="2",
                                          JAX_PROCESS_ID=str(i),
                                          JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}"))
      for i in range(2)]
  try:
    outputs = [p.communicate(timeout=400)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, output in zip(processes, outputs):
    assert p.returncode == 0, output[-3000:]
  assert "process 1 of 2, 2 local / 4 global devices" in outputs[1]
  params = checkpoint_lib.load_params(workdir, sharding_lib.make_mesh((("data", -1),)),
                                      use_ema=False)  # 4 devices' checkpoint onto 1
  assert_close(flat(jax.device_get(params)), flat(expected.params))
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [2, 4]  # process 0 only
