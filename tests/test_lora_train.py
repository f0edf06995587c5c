"""LoRA training with the sharded trainer (`config.lora`, vldm.train.lora), and its export.

configs/video_ldm.py's image stage on a tiny random Stable Diffusion folder (tests/sd_folders.py),
trained from a prepared latent cache (no video decoding), with LoRA adapters on the attention
projections and the res-block convolutions, in a subprocess with 8 CPU devices (data 2 × fsdp 4):
a fresh run of 4 steps, and one resumed from the step-2 checkpoint of the same run. Then the
adapters are exported (`vldm.export --lora`) and loaded by diffusers' `load_lora_weights`.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import recipe_runs
import sd_folders
from parity import jit_quick, relative_error, to_nhwc
from vldm import convert
from vldm.data import cache as cache_lib
from vldm.models import lora as lora_lib
from vldm.recipes import stages
from vldm.train import checkpoint as checkpoint_lib
from vldm.train import config_lib
from vldm.train import lora as lora_train
from vldm.train import sharding as sharding_lib
from vldm.train import tasks as tasks_lib

diffusers = pytest.importorskip("diffusers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "video_ldm.py")
config_lib.ensure_importable(CONFIG)
RANK, ALPHA = 4, 8.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", r".*resnets\.\d+\.conv1")
OVERRIDES = {
    "total_steps": 4,
    "checkpoint_every": 2,
    "keep_checkpoints": 0,
    "log_every": 2,
    "ema_decay": 0.5,  # EMA of the adapters only
    "optim.lr": 1e-2,  # the adapters move visibly in 4 steps
    "tensorboard": False,
    "progress_bar": False,
    "lora.rank": RANK,
    "lora.alpha": ALPHA,
    "lora.targets": TARGETS,
    "mesh": (("data", 2), ("fsdp", 4)),
}


def load(sd, root, **overrides):
  arg = f"stage=image,pretrained={sd},data={root},root={root},runlocal=True"
  return config_lib.load_config(f"{CONFIG}:{arg}", {**OVERRIDES, **overrides})


def write_latent_cache(directory):
  """A latent cache of 16 captioned stills: moments of 32-px images at the tiny VAE's 16 × 16 × 4
  (made up from the pixels: what the adapters fit does not matter here)."""
  rng = np.random.default_rng(0)
  source = [
      {"image": rng.integers(0, 255, (32, 32, 3), np.uint8), "caption": f"a red circle {i}"}
      for i in range(16)
  ]

  def moments(pixels):
    pooled = pixels.reshape(len(pixels), 16, 2, 16, 2, 3).mean(axis=(2, 4))
    mean = np.concatenate([pooled, pooled[..., :1]], axis=-1).astype(np.float32)
    return {"latent_mean": mean, "latent_std": np.full_like(mean, 0.1)}

  cache_lib.build_latent_cache(
      source,
      os.path.join(directory, "train"),
      moments,
      lambda c: {},
      batch_size=8,
      kind="image",
      resolution=32,
  )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  base = tmp_path_factory.mktemp("lora_train")
  sd = sd_folders.write_sd_folder(str(base), "sd1")
  root = str(base / "runs")
  write_latent_cache(os.path.join(root, "image", "latents"))
  inputs = {"cache": str(base / "jax_cache")}
  with recipe_runs.shared_compilation_cache(inputs["cache"]):
    yield dict(sd=sd, root=root, inputs=inputs)


EIGHT_DEVICES = textwrap.dedent("""
    import json, shutil, sys
    import jax, numpy as np
    from flax import traverse_util
    from vldm.train import config_lib, trainer
    config_file, arg, fresh, resumed, out = sys.argv[1:6]
    config = config_lib.load_config(f"{config_file}:{arg}", json.loads(sys.argv[6]))
    assert jax.device_count() == 8
    flat = lambda tree: {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}
    state = trainer.train_and_evaluate(config, fresh)
    report = {"specs": {k: [str(v.sharding.spec), list(v.addressable_shards[0].data.shape)]
                        for k, v in flat(state.params).items()}}
    shutil.copytree(fresh, resumed)  # the same run, stopped after its step-2 checkpoint
    shutil.rmtree(f"{resumed}/checkpoints/4")
    again = trainer.train_and_evaluate(config, resumed)
    for name, s in (("fresh", state), ("resumed", again)):
      leaves = {"params/" + k: v for k, v in flat(s.params).items()}
      leaves.update({"ema/" + k: v for k, v in flat(s.ema_params).items()})
      leaves.update({"opt/" + jax.tree_util.keystr(p): v
                     for p, v in jax.tree_util.tree_leaves_with_path(s.opt_state)})
      np.savez(f"{out}/{name}.npz", **{k: np.asarray(v) for k, v in leaves.items()})
    print("REPORT" + json.dumps(report))
""")


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
  out = tmp_path_factory.mktemp("lora_runs")
  fresh, resumed = str(out / "fresh"), str(out / "resumed")
  arg = f"stage=image,pretrained={setup['sd']},data={setup['root']},root={setup['root']},runlocal"
  env = dict(
      os.environ,
      XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
      JAX_PLATFORMS="cpu",
      JAX_DEFAULT_MATMUL_PRECISION="highest",
      JAX_COMPILATION_CACHE_DIR=setup["inputs"]["cache"],
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      PYTHONPATH=REPO,
  )
  result = subprocess.run(
      [
          sys.executable,
          "-c",
          EIGHT_DEVICES,
          CONFIG,
          arg,
          fresh,
          resumed,
          str(out),
          json.dumps(OVERRIDES),
      ],
      env=env,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  report = json.loads(result.stdout.split("REPORT", 1)[1])
  runs = {name: dict(np.load(out / f"{name}.npz")) for name in ("fresh", "resumed")}
  return dict(fresh=fresh, out=str(out), report=report, runs=runs)


def test_only_adapters_train_and_resume_exactly(trained):
  fresh, resumed = trained["runs"]["fresh"], trained["runs"]["resumed"]
  assert fresh.keys() == resumed.keys()
  for key in fresh:  # a resumed run continues bit-exactly
    np.testing.assert_array_equal(resumed[key], fresh[key], err_msg=key)
  params = sorted(k for k in fresh if k.startswith("params/"))
  assert params and all(k.startswith("params/unet/") for k in params)
  assert all(k.endswith(("/lora_A/kernel", "/lora_B/kernel")) for k in params), params[:5]
  # Adam's moments exist for the adapters alone: 2 per adapter leaf (+ step counts).
  moments = [k for k in fresh if k.startswith("opt/") and fresh[k].ndim > 0]
  assert len(moments) == 2 * len(params)
  b = [k for k in params if k.endswith("lora_B/kernel")]
  assert all(np.abs(fresh[k]).max() > 0 for k in b)  # B left zero: the adapters learnt
  # The adapters follow the mesh rules: A of to_q [32, 4] shards its 32 inputs over fsdp = 4.
  spec = trained["report"]["specs"][
      "unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/lora_A/kernel"
  ]
  assert spec == ["P('fsdp', None)", [8, 4]]
  # The checkpoint holds the adapters only: no copy of the base UNet or text encoder.
  saved = checkpoint_lib.load_params(
      trained["fresh"], sharding_lib.make_mesh((("data", -1),)), use_ema=False
  )
  assert sorted("params/" + "/".join(k) for k in traverse_util.flatten_dict(saved)) == params


def test_base_stays_the_pretrained_weights(setup, trained):
  """The frozen base is the diffusers folder's weights bit for bit; merging changes exactly the
  targeted kernels, by (alpha / r)·A·B."""
  config = load(setup["sd"], setup["root"])
  task = tasks_lib.get_task(config)
  assert isinstance(task, lora_train.LoraTask) and task.scale == ALPHA / RANK
  frozen = task.init_frozen(None)
  _, unet = convert.load_diffusers(os.path.join(setup["sd"], "unet"))
  base = traverse_util.flatten_dict(jax.device_get(frozen[lora_train.BASE]["unet"]))
  for path, value in traverse_util.flatten_dict(unet).items():
    np.testing.assert_array_equal(base[path], value, err_msg="/".join(path))
  adapters = jax.device_get(
      checkpoint_lib.load_params(trained["fresh"], sharding_lib.make_mesh((("data", -1),)))
  )
  merged, _ = task.task_params(adapters, frozen)
  merged = traverse_util.flatten_dict(jax.device_get(merged["unet"]))
  targeted = {p + ("kernel",) for p in lora_lib.adapters_of(adapters["unet"])}
  assert len(targeted) == len(lora_lib.select(unet, TARGETS))
  for path, value in base.items():
    if path not in targeted:
      np.testing.assert_array_equal(merged[path], value, err_msg="/".join(path))
    else:
      assert not np.array_equal(merged[path], value), path


def test_exported_adapters_load_in_diffusers(setup, trained, tmp_path):
  out = str(tmp_path / "lora")
  recipe_runs.run("export", "--workdir", trained["fresh"], "--lora", out, inputs=setup["inputs"])
  assert os.listdir(out) == ["pytorch_lora_weights.safetensors"]
  # vldm with the adapters (EMA) merged, as `vldm.sample --workdir` samples the stage.
  task, params, _ = stages.restore(
      stages.saved_config(os.path.join(trained["fresh"], "checkpoints", "4")), trained["fresh"]
  )
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  t, context = np.array([10, 700]), rng.standard_normal((2, 5, 32)).astype(np.float32)
  unet = task.unet
  actual = jit_quick(lambda p, *a: unet.apply({"params": p}, *a))(
      params["unet"], to_nhwc(sample), t, context
  )
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(setup["sd"], safety_checker=None)
  with torch.no_grad():
    plain = pipe.unet(*map(torch.from_numpy, (sample, t, context))).sample.numpy()
    pipe.load_lora_weights(out)
    adapted = pipe.unet(*map(torch.from_numpy, (sample, t, context))).sample.numpy()
    pipe.fuse_lora()
    fused = pipe.unet(*map(torch.from_numpy, (sample, t, context))).sample.numpy()
  for name, expected in (("adapted", adapted), ("fused", fused)):
    err = relative_error(np.asarray(actual), to_nhwc(expected))
    print(f"trained vldm LoRA vs diffusers ({name}): relative error {err:.2e}")
    assert err < 1e-4
  assert relative_error(plain, adapted) > 1e-3  # the trained adapters change the output


def test_bad_lora_configs_are_explained(setup):
  with pytest.raises(
      tasks_lib.TaskInputError, match=r"lora.targets.*to_qq.*closest names: to_k, to_q"
  ):
    tasks_lib.get_task(load(setup["sd"], setup["root"], **{"lora.targets": ("to_qq",)})).modules()
  with pytest.raises(tasks_lib.TaskInputError, match=r"lora.components \['vae'\].*'unet'"):
    tasks_lib.get_task(load(setup["sd"], setup["root"], **{"lora.components": ("vae",)})).modules()
  with pytest.raises(tasks_lib.TaskInputError, match=r"lora.rank must be ≥ 1"):
    lora_train.settings(load(setup["sd"], setup["root"], **{"lora.rank": -2}))
