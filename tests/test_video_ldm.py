"""configs/video_ldm.py: Video LDM from tiny random Stable Diffusion folders on MP4 clips.

The folders are written by diffusers / transformers (SD 1.x style: ε, PNDM, pads with end-of-text;
SD 2.x style: v, DDIM, pads with "!"), the clips by imageio (different sizes, frame rates and
lengths, one unreadable, one too short). Training runs through `python -m vldm.train` in
subprocesses with 8 CPU devices and FSDP; sampling through `python -m vldm.sample`; export through
`python -m vldm.export`.
"""

import json
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import media
import recipe_runs
import sd_folders
from parity import relative_error
from vldm import convert
from vldm.models import inflate
from vldm.pipelines import folder as folder_lib
from vldm.recipes import common
from vldm.recipes import components as components_lib
from vldm.recipes import ldm
from vldm.recipes import stages
from vldm.train import checkpoint as checkpoint_lib
from vldm.train import config_lib
from vldm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "video_ldm.py")
config_lib.ensure_importable(CONFIG)
DEVICES = 8
FSDP = f"--config.mesh=(('data', -1), ('fsdp', {DEVICES}))"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """{'sd1', 'sd2': SD folders, 'videos': a video folder, 'cache': a JAX compilation cache}.

  The cache is this process's and the subprocesses': a program compiled once (a resumed run's
  step, the same pipeline rebuilt from an exported folder) comes back from disk."""
  base = tmp_path_factory.mktemp("video_ldm")
  out = {style: sd_folders.write_sd_folder(str(base), style) for style in sd_folders.STYLES}
  out["videos"] = media.write_video_folder(str(base / "videos"))["folder"]
  out["cache"] = str(base / "jax_cache")
  with recipe_runs.shared_compilation_cache(out["cache"]):
    yield out


def load(stage, pretrained, data, root="", **overrides):
  arg = f"stage={stage},pretrained={pretrained},data={data},root={root},runlocal=True"
  return config_lib.load_config(f"{CONFIG}:{arg}", overrides)


def train(stage, style, root, inputs, *extra):
  spec = f"{CONFIG}:stage={stage},pretrained={inputs[style]},data={inputs['videos']},root={root}"
  return recipe_runs.run(
      "train",
      "--config",
      spec + ",runlocal",
      "--workdir",
      os.path.join(root, stage),
      FSDP,
      "--config.checkpoint_every=2",
      "--config.keep_checkpoints=0",
      "--config.progress_bar=False",
      "--config.tensorboard=False",
      *extra,
      inputs=inputs,
      devices=DEVICES,
  )


def opt_state_paths(workdir, step):
  """The parameter paths the checkpoint's optimizer state has leaves for (tuples of names)."""
  manager = checkpoint_lib._manager(checkpoint_lib.checkpoint_dir(workdir), read_only=True)  # pylint: disable=protected-access
  try:
    metadata = manager.item_metadata(step)["opt_state"]
  finally:
    manager.close()
  leaves = jax.tree_util.tree_leaves_with_path(metadata)
  names = lambda path: tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return [p for p in map(names, (path for path, _ in leaves)) if "unet" in p or "text_encoder" in p]


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


# ------------------------------------------------------------------------------------ configs
def test_stages_batch_and_bad_arguments(inputs):
  video = load("video", inputs["sd1"], inputs["videos"], "/runs/x")
  assert video.ldm.train == "temporal" and not video.ldm.text_encoder.train
  assert video.init_from.transform == "inflate" and video.init_from.workdir is None  # no image run
  assert video.data.name == "video_folder" and video.data.kind == "video"
  up = load("upsampler", inputs["sd1"], inputs["videos"], "/runs/x")
  assert (
      up.init_from.workdir == "/runs/x/video"
      and up.ldm.upsampler.low_res_workdir == "/runs/x/video"
      and up.data.resolution == 2 * video.data.resolution
  )
  assert load("image", inputs["sd1"], inputs["videos"]).data.kind == "image"
  # One batch size: the data's follows the run's.
  assert load("video", inputs["sd1"], inputs["videos"], batch_size=16).data.batch_size == 16
  with pytest.raises(
      ValueError,
      match=r"Unknown stage 'vidoe'; .* \('image', 'video', 'upsampler', 'prediction', 'interpolation'\)",
  ):
    load("vidoe", inputs["sd1"], inputs["videos"])
  with pytest.raises(ValueError, match="needs data=DIR: a folder of videos with captions.csv"):
    config_lib.load_config(f"{CONFIG}:stage=video,pretrained={inputs['sd1']}")


def test_bad_inputs_say_what_is_accepted(inputs, tmp_path):
  # A pretrained folder without a component, and one whose unet/ is of the wrong class.
  partial = str(tmp_path / "no_vae")
  shutil.copytree(inputs["sd1"], partial)
  shutil.rmtree(os.path.join(partial, "vae"))
  with pytest.raises(
      components_lib.ComponentError,
      match=r"has no vae/: ldm.pretrained must be a diffusers Stable Diffusion folder, with "
      r"unet/ \(a UNet2DConditionModel",
  ):
    ldm.LatentDiffusionTask(load("video", partial, inputs["videos"]))
  wrong = str(tmp_path / "wrong")
  shutil.copytree(inputs["sd1"], wrong)
  shutil.rmtree(os.path.join(wrong, "unet"))
  shutil.copytree(os.path.join(wrong, "vae"), os.path.join(wrong, "unet"))
  with pytest.raises(
      components_lib.ComponentError,
      match="holds a AutoencoderKL; the unet must " "be a UNet2DConditionModel",
  ):
    ldm.LatentDiffusionTask(load("video", wrong, inputs["videos"]))
  # A resolution the VAE (×2) and the UNet (×2) cannot divide.
  with pytest.raises(
      ValueError,
      match=r"data.resolution 30 cannot be divided .* multiple of 4 " r"\(the VAE downsamples by 2",
  ):
    ldm.LatentDiffusionTask(
        load("video", inputs["sd1"], inputs["videos"], **{"data.resolution": 30})
    )
  # A data folder without a captions file, and one with no readable video.
  empty = tmp_path / "no_captions"
  empty.mkdir()
  media.write_video(str(empty / "a.mp4"), media.make_clip(8, 32, 32), 8)
  task = ldm.LatentDiffusionTask(
      load("video", inputs["sd1"], str(empty), **{"data.data_dir": str(tmp_path / "tfds")})
  )
  with pytest.raises(ValueError, match="No captions file for the videos in .*: looked for"):
    task.make_data(None, 0, 1)
  unreadable = tmp_path / "unreadable"
  unreadable.mkdir()
  (unreadable / "a.mp4").write_bytes(b"not a video")
  media.write_captions(str(unreadable / "captions.csv"), [("a.mp4", "x")])
  task = ldm.LatentDiffusionTask(
      load("video", inputs["sd1"], str(unreadable), **{"data.data_dir": str(tmp_path / "tfds")})
  )
  with pytest.raises(
      ValueError,
      match=r"No video of split 'train' .* could be read: skipped per "
      r"reason \{'unreadable': 1\}",
  ):
    task.make_data(None, 0, 1)


# ----------------------------------------------------------------------------------- models
@pytest.mark.parametrize("style", sd_folders.STYLES)
def test_inflated_unet_starts_as_the_pretrained_image_unet(inputs, style):
  """Step 0 of the video stage: the SD UNet frame by frame, exactly; components from the folder."""
  config = load("video", inputs[style], inputs["videos"])
  task = ldm.LatentDiffusionTask(config)
  assert task.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction"}[style]
  assert task.tokenizer.pad_id == {"sd1": task.tokenizer.eos_id, "sd2": 0}[style]
  image_unet, image_params = convert.load_diffusers(os.path.join(inputs[style], "unet"))
  target = task.init_params(jax.random.key(0))
  source = task.pretrained_params()
  params = ldm.inflate_transform({**target, **source}, target)
  frames = config.data.frames
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, frames, 8, 8, 4)), jnp.float32)
  t = jnp.asarray([10.0, 700.0])
  context = jnp.asarray(rng.standard_normal((2, 5, 32)), jnp.float32)
  video = task.unet.apply({"params": params["unet"]}, x, t, context)
  per_frame = image_unet.apply(
      {"params": image_params},
      x.reshape((-1,) + x.shape[2:]),
      jnp.repeat(t, frames),
      jnp.repeat(context, frames, axis=0),
  )
  np.testing.assert_array_equal(np.asarray(video).reshape(per_frame.shape), per_frame)
  # Only temporal layers train; the text encoder and every spatial layer are frozen.
  labels = flat(task.trainable_labels(params))
  assert all((v == "train") == inflate.is_temporal(k.split("/")) for k, v in labels.items())


# --------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def video_run(inputs, tmp_path_factory):
  """The video stage from the SD 2.x-style folder: 3 steps on 8 devices, checkpoints 2 and 3."""
  root = str(tmp_path_factory.mktemp("runs"))
  train("video", "sd2", root, inputs)
  return root


def test_video_stage_trains_only_temporal_layers_and_resumes_exactly(video_run, inputs):
  workdir = os.path.join(video_run, "video")
  final = common.load_stage_params(workdir)
  image_params = convert.load_diffusers(os.path.join(inputs["sd2"], "unet"))[1]
  text_params = convert.load_diffusers(os.path.join(inputs["sd2"], "text_encoder"))[1]
  # Spatial layers and the text encoder bit-identical to the folder's; temporal layers moved.
  _, temporal = inflate.split_params(final["unet"])
  assert flat(inflate.spatial_params(final["unet"])).keys() == flat(image_params).keys()
  for key, value in flat(inflate.spatial_params(final["unet"])).items():
    np.testing.assert_array_equal(value, flat(image_params)[key], err_msg=key)
  for key, value in flat(final["text_encoder"]).items():
    np.testing.assert_array_equal(value, flat(text_params)[key], err_msg=key)
  assert any(np.abs(v).max() > 0 for k, v in flat(temporal).items() if "to_out_0" in k)
  # Optimizer state only for the temporal layers.
  paths = opt_state_paths(workdir, 3)
  assert paths and all(inflate.is_temporal(p) for p in paths), paths[:5]
  # A crash after step 2's checkpoint: step 3 again from it gives the same parameters.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  train("video", "sd2", video_run, inputs)
  resumed = common.load_stage_params(workdir)
  for key, value in flat(resumed).items():
    np.testing.assert_allclose(value, flat(final)[key], rtol=0, atol=1e-6, err_msg=key)


@pytest.mark.slow  # ≈ 1 min: the video stage's compile again, with adapters
def test_motion_lora_trains_the_temporal_attention_alone(video_run, inputs, tmp_path):
  """A motion LoRA (SVD's camera-motion LoRAs): adapters on the temporal attention projections of
  the trained video stage, 3 steps on 8 devices; only they train, and they export for diffusers."""
  root = str(tmp_path / "motion_lora")
  targets = r"(r'.*temporal_transformer_blocks\.\d+\.attn[12]\.to_(q|k|v|out\.0)',)"
  train(
      "video", "sd2", root, inputs, "--config.lora.rank=4", f"--config.lora.targets={targets}",
      f"--config.init_from.workdir={os.path.join(video_run, 'video')}",
      "--config.init_from.transform=as_is",  # the video stage's weights as they are: the base
  )  # fmt: skip
  workdir = os.path.join(root, "video")
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  adapters = flat(checkpoint_lib.load_params(workdir, mesh, use_ema=False))
  assert adapters and all("temporal_transformer_blocks" in k for k in adapters), list(adapters)[:4]
  assert all(k.endswith(("lora_A/kernel", "lora_B/kernel")) for k in adapters)
  assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_B/kernel"))
  out = str(tmp_path / "exported")
  recipe_runs.run("export", "--workdir", workdir, "--lora", out, inputs=inputs)
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  keys = list(load_file(os.path.join(out, "pytorch_lora_weights.safetensors")))
  assert len(keys) == len(adapters) and all(".temporal_transformer_blocks." in k for k in keys)
  assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), keys[:4]


@pytest.mark.slow  # ≈ 25 s: the default suite's budget (export formats: tests/test_export_formats.py)
def test_video_stage_samples_and_exports(video_run, inputs, tmp_path):
  workdir = os.path.join(video_run, "video")
  out = str(tmp_path / "samples")
  recipe_runs.run(
      "sample",
      "--workdir",
      workdir,
      "--prompt",
      "a red circle",
      "--num_samples",
      "2",
      "--out",
      out,
      inputs=inputs,
  )
  records = json.load(open(os.path.join(out, "samples.json")))
  assert [r["seed"] for r in records] == [0, 1] and os.path.isfile(os.path.join(out, "1.mp4"))
  folder = str(tmp_path / "export")
  recipe_runs.run("export", "--workdir", workdir, "--out", folder, inputs=inputs)
  index = json.load(open(os.path.join(folder, "model_index.json")))
  assert index["unet"] == ["vldm", "VldmUNet"] and index["text_encoder"][1] == "CLIPTextModel"
  assert index["vldm"] == {"num_steps": 2, "guidance_scale": 7.5}
  # The temporal layers alone, as a motion module.
  temporal = convert.load_temporal_layers(os.path.join(folder, folder_lib.TEMPORAL_LAYERS))
  trained = stages.pipeline_from_workdir(workdir)
  assert flat(temporal).keys() == flat(inflate.split_params(trained.params["unet"])[1]).keys()
  exported = folder_lib.load_pipeline(folder)
  expected = trained(["a red circle", "a"], rng=3)
  actual = exported(["a red circle", "a"], rng=3)
  assert expected.shape == (2, 4, 32, 32, 3)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # ≈ 2 min on 2 cores: keeps the default suite under 15 min
def test_upsampler_stage_trains_samples_and_exports(video_run, inputs, tmp_path):
  """The latent upsampler from the video stage: a cascade that samples and exports (the same
  code paths as `python -m vldm.sample` / `vldm.export`, in this process)."""
  train("upsampler", "sd2", video_run, inputs)
  workdir = os.path.join(video_run, "upsampler")
  folder = stages.export(workdir, str(tmp_path / "export"))
  assert os.path.isfile(os.path.join(folder, folder_lib.UPSAMPLER, "unet", "config.json"))
  trained = stages.pipeline_from_workdir(workdir)
  exported = folder_lib.load_pipeline(folder)
  expected = trained(["a red circle"], rng=5)
  assert expected.shape == (1, 4, 64, 64, 3)
  np.testing.assert_allclose(exported(["a red circle"], rng=5), expected, rtol=0, atol=1e-5)


@pytest.mark.slow  # ≈ 30 s: trains an image stage to export it; the default suite's budget
def test_image_stage_exports_a_stable_diffusion_folder(inputs, tmp_path):
  """The image stage fine-tunes the SD UNet (here on this process's one device); its export
  loads in diffusers and matches."""
  root = str(tmp_path / "runs")
  config = load(
      "image",
      inputs["sd1"],
      inputs["videos"],
      root,
      total_steps=2,
      progress_bar=False,
      tensorboard=False,
  )
  trainer.train_and_evaluate(config, os.path.join(root, "image"))
  folder = stages.export(os.path.join(root, "image"), str(tmp_path / "export"))
  params = common.load_stage_params(os.path.join(root, "image"))
  module = convert.load_diffusers(os.path.join(folder, "unet"))[0]
  reference = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 5, 32)).astype(np.float32)
  t = np.asarray([3.0, 600.0], np.float32)
  ours = module.apply({"params": params["unet"]}, x, t, context)
  with torch.no_grad():
    theirs = (
        reference(
            torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(context)
        )
        .sample.permute(0, 2, 3, 1)
        .numpy()
    )
  assert relative_error(ours, theirs) <= 1e-4
  index = json.load(open(os.path.join(folder, "model_index.json")))
  assert index["_class_name"] == "StableDiffusionPipeline"


def test_compute_settings_reach_the_unet(inputs):
  """The run's dtype, remat policy and attention implementation are the UNet's; a bf16 step with
  rematerialisation and joint image + video batches gives a finite loss."""
  config = load(
      "video",
      inputs["sd1"],
      inputs["videos"],
      dtype="bfloat16",
      remat_policy="full",
      attention_implementation="xla",
      **{"ldm.train": "all", "ldm.joint_image_fraction": 0.5},
  )
  task = ldm.LatentDiffusionTask(config)
  assert task.unet.dtype == jnp.bfloat16 and task.unet.remat_policy == "full"
  assert task.unet.attention_implementation == "xla" and task.unet.temporal
  assert task.unet.sample_size == config.data.resolution // 2  # the stage's size, not SD's
  target = task.init_params(jax.random.key(0))
  params = ldm.inflate_transform({**target, **task.pretrained_params()}, target)
  frozen = task.init_frozen(None)
  assert frozen["scale"] == np.float32(0.18215)  # the VAE config's scaling_factor
  rng = np.random.default_rng(0)
  batch = {
      "video": jnp.asarray(rng.uniform(-1, 1, (2, 4, 32, 32, 3)), jnp.float32),
      "input_ids": jnp.asarray(task.tokenizer(["a red circle", ""])),
  }
  loss, metrics = jax.jit(task.loss_fn)(params, frozen, batch, jax.random.key(1))
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics["mse"]))
  # The frozen VAE attends with the run's implementation, and encoding the 8 frames 3 at a time
  # (the last chunk padded) gives the posterior of encoding them at once.
  assert task.vae.attention_implementation == "xla"
  whole = task.posterior(frozen["vae"], batch["video"])
  task.config.ldm.encode_chunk_size = 3
  chunked = task.posterior(frozen["vae"], batch["video"])
  for a, b in zip(chunked, whole):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Half of each batch goes through as stills: the image-only indicator of the first half.
  np.testing.assert_array_equal(task._image_only_indicator(2), [[1] * 4, [0] * 4])  # pylint: disable=protected-access


@pytest.mark.slow  # ≈ 1 min: curation of the video folder, then 3 video-stage steps on its clips
def test_video_stage_trains_on_a_curated_clip_list(inputs, tmp_path):
  out = str(tmp_path / "curated")
  recipe_runs.run(
      "curate", "--input", inputs["videos"], "--out", out, "--config.min_frames=4", inputs=inputs
  )
  clip_list = os.path.join(out, "clips.jsonl")
  with open(clip_list, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert any(r["kept"] for r in rows) and not all(r["kept"] for r in rows)
  root = str(tmp_path / "runs")
  spec = f"{CONFIG}:stage=video,pretrained={inputs['sd2']},data={clip_list},root={root},runlocal"
  recipe_runs.run(
      "train",
      "--config",
      spec,
      "--workdir",
      os.path.join(root, "video"),
      "--config.batch_size=2",  # the kept clips of the tiny folder: fewer than the default 8
      "--config.progress_bar=False",
      "--config.tensorboard=False",
      inputs=inputs,
  )
  with open(os.path.join(root, "video", "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(line).get("step") for line in f]
  assert max(s for s in steps if s is not None) == 3
