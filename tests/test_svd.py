"""configs/svd.py: Stable Video Diffusion's stages and image-to-video fine-tune on MP4 clips.

The folders are written by diffusers / transformers (a tiny SVD pipeline: UNetSpatioTemporal-
ConditionModel, AutoencoderKLTemporalDecoder, CLIPVisionModelWithProjection, CLIPImageProcessor,
EulerDiscreteScheduler; a tiny SD 2.x pipeline for the stages before image-to-video), the clips by
imageio (tests/media.py: four readable clips, one unreadable, one too short).
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
from PIL import Image
from flax import traverse_util

import media
import recipe_runs
import sd_folders
import svd_folders
from parity import relative_error
from vldm.data import sources
from vldm.data import video_folder
from vldm.models import clip as clip_lib
from vldm.pipelines import folder as folder_lib
from vldm.recipes import common
from vldm.recipes import components as components_lib
from vldm.recipes import image_to_video
from vldm.recipes import ldm
from vldm.recipes import stages
from vldm.train import config_lib
from vldm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "svd.py")
config_lib.ensure_importable(CONFIG)
DEVICES = 8
FSDP = f"--config.mesh=(('data', -1), ('fsdp', {DEVICES}))"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """{'svd': an SVD folder, 'sd2': an SD 2.x folder, 'videos': a video folder, 'cache': a JAX
  compilation cache shared with the subprocesses}."""
  base = tmp_path_factory.mktemp("svd")
  out = {"svd": str(base / "svd"), "sd2": sd_folders.write_sd_folder(str(base), "sd2")}
  svd_folders.save_tiny_svd(out["svd"])
  out["videos"] = media.write_video_folder(str(base / "videos"))["folder"]
  out["cache"] = str(base / "jax_cache")
  with recipe_runs.shared_compilation_cache(out["cache"]):
    yield out


def load(stage, pretrained, data, root="", **overrides):
  arg = f"stage={stage},pretrained={pretrained},data={data},root={root},runlocal=True"
  return config_lib.load_config(f"{CONFIG}:{arg}", overrides)


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def first_frames(height, width, count=1, seed=0):
  return np.stack([media.make_clip(1, height, width, seed + i)[0] for i in range(count)])


# ------------------------------------------------------------------------ image-to-video training
@pytest.fixture(scope="module")
def i2v_run(inputs, tmp_path_factory):
  """stage=i2v from the SVD folder: 3 steps through `python -m vldm.train` on 8 devices with FSDP,
  checkpoints at 2 and 3."""
  root = str(tmp_path_factory.mktemp("runs"))
  workdir = os.path.join(root, "i2v")
  spec = f"{CONFIG}:stage=i2v,pretrained={inputs['svd']},data={inputs['videos']},root={root}"
  args = (
      "train",
      "--config",
      spec + ",runlocal,resolution=16",
      "--workdir",
      workdir,
      FSDP,
      "--config.checkpoint_every=2",
      "--config.keep_checkpoints=0",
      "--config.progress_bar=False",
      "--config.tensorboard=False",
  )
  recipe_runs.run(*args, inputs=inputs, devices=DEVICES)
  return dict(root=root, workdir=workdir, args=args)


@pytest.mark.slow  # ≈ 2 min: 8-device i2v fine-tune, resume, export; the default suite's budget
def test_i2v_from_svd_trains_resumes_exactly_and_exports_for_diffusers(i2v_run, inputs, tmp_path):
  workdir = i2v_run["workdir"]
  final = common.load_stage_params(workdir)
  assert set(final) == {"unet"}
  pretrained = components_lib.pretrained_params(load("i2v", inputs["svd"], inputs["videos"]))
  moved = [
      k for k, v in flat(final["unet"]).items() if np.abs(v - flat(pretrained["unet"])[k]).max()
  ]
  assert moved and any("temporal" in k for k in moved) and any("spatial" in k for k in moved)
  # A crash after step 2's checkpoint: step 3 again from it gives the same parameters.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  recipe_runs.run(*i2v_run["args"], inputs=inputs, devices=DEVICES)
  resumed = common.load_stage_params(workdir)
  for key, value in flat(resumed).items():
    np.testing.assert_allclose(value, flat(final)[key], rtol=0, atol=1e-6, err_msg=key)

  # The export is a StableVideoDiffusionPipeline folder; diffusers returns vldm's frames.
  folder = stages.export(workdir, str(tmp_path / "export"))
  with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
    index = json.load(f)
  assert index["_class_name"] == "StableVideoDiffusionPipeline"
  assert index["unet"] == ["diffusers", "UNetSpatioTemporalConditionModel"]
  ours = stages.pipeline_from_workdir(workdir)
  reference = diffusers.StableVideoDiffusionPipeline.from_pretrained(folder)
  reference.set_progress_bar_config(disable=True)
  image = Image.fromarray(first_frames(16, 16)[0])
  noise = torch.randn((1, 4, 4, 8, 8), generator=torch.Generator().manual_seed(1))
  image_noise = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(2))
  kwargs = dict(
      height=16,
      width=16,
      num_frames=4,
      fps=7,
      motion_bucket_id=100,
      noise_aug_strength=0.02,
      min_guidance_scale=1.0,
      max_guidance_scale=2.5,
  )
  expected = reference(
      image,
      num_inference_steps=3,
      latents=noise,
      generator=torch.Generator().manual_seed(2),
      output_type="np",
      **kwargs,
  ).frames
  actual = ours(
      image,
      num_steps=3,
      noise=noise.permute(0, 1, 3, 4, 2).numpy(),
      image_noise=image_noise.permute(0, 2, 3, 1).numpy(),
      **kwargs,
  )
  error = relative_error(actual, np.asarray(expected))
  print(f"exported i2v vs diffusers: {error:.2e}")
  assert error <= 1e-3
  # The motion bucket the stage trained on steers what it samples.
  still = ours(image, num_steps=3, rng=0, **dict(kwargs, motion_bucket_id=0))
  lively = ours(image, num_steps=3, rng=0, **dict(kwargs, motion_bucket_id=255))
  assert np.abs(still - lively).max() > 1e-4
  # What the stage trained on bounds what it samples: an fps outside fps_range is an error.
  with pytest.raises(ValueError, match="fps"):
    ours(image, num_steps=1, fps=100, rng=0)
  # The folder `python -m vldm.sample --pretrained EXPORT --image …` reads (tests/test_sample_cli.py
  # runs that command on an SVD folder) gives the same frames.
  exported = folder_lib.load_pipeline(folder)
  again = exported(
      image,
      num_steps=3,
      noise=noise.permute(0, 1, 3, 4, 2).numpy(),
      image_noise=image_noise.permute(0, 2, 3, 1).numpy(),
      **kwargs,
  )
  np.testing.assert_allclose(again, actual, rtol=0, atol=1e-5)


def test_i2v_loss_is_the_svd_equations(inputs):
  """One batch's per-example loss against the EDM / SVD equations written out here, for given σ,
  noise, conditioning noise and dropout draws."""
  config = load("i2v", inputs["svd"], inputs["videos"], **{"data.resolution": 16})
  task = image_to_video.ImageToVideoTask(config)
  assert task.prediction_type == "v_edm"
  params = task.pretrained_params()
  frozen = task.init_frozen(None)
  rng = np.random.default_rng(0)
  batch_size, frames = 4, config.data.frames
  video = rng.uniform(-1, 1, (batch_size, frames, 16, 16, 3)).astype(np.float32)
  batch = {
      "video": jnp.asarray(video),
      "fps": jnp.asarray([4.0, 8.0, 12.5, 90.0]),  # 90 is clamped to fps_range's 60
      "motion": jnp.asarray([0.0, 0.3, 0.5, 2.0]),  # 2.0 × 255 is clamped to bucket 255
  }
  x0 = np.asarray(jax.jit(task.latents)(frozen, batch, jax.random.key(3))["latent"])
  sigma = np.asarray([0.05, 0.7, 3.0, 40.0], np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  draws = dict(
      cond_sigma=jnp.asarray([0.02, 0.05, 0.1, 0.01]),
      cond_noise=jnp.asarray(rng.standard_normal((batch_size, 16, 16, 3)), jnp.float32),
      dropout=jnp.asarray([0.05, 0.15, 0.25, 0.9]),  # p = 0.1: embedding, both, latents, none
  )
  loss_fn = jax.jit(lambda *a: task.conditioned_loss(*a[:6], sigma=a[6], noise=a[7])[0])
  loss = loss_fn(params, frozen, batch, jnp.asarray(x0), draws, jax.random.key(0), sigma, noise)

  # The same from the equations.
  first = video[:, 0]
  pixels = clip_lib.preprocess_for_clip(jnp.asarray(first), task.image_encoder.image_size)
  embedding = np.asarray(
      jax.jit(task.image_encoder.apply)({"params": frozen["image_encoder"]}, pixels)
  )
  embedding = embedding[:, None] * np.asarray([0, 0, 1, 1], np.float32)[:, None, None]
  noised = first + np.asarray(draws["cond_sigma"])[:, None, None, None] * np.asarray(
      draws["cond_noise"]
  )
  encode = jax.jit(lambda p, x: task.vae.apply({"params": p}, x, method="encode").mean)
  image_latents = np.asarray(encode(frozen["vae"], jnp.asarray(noised)))
  image_latents = image_latents * np.asarray([1, 0, 0, 1], np.float32)[:, None, None, None]
  image_latents = np.repeat(image_latents[:, None], frames, axis=1)
  time_ids = np.stack(
      [
          np.asarray([3.0, 7.0, 11.5, 59.0]),
          np.asarray([0.0, 76.0, 128.0, 255.0]),
          np.asarray(draws["cond_sigma"]),
      ],
      axis=-1,
  )
  s = sigma[:, None, None, None, None]
  c_skip, c_out, c_in = 1 / (s**2 + 1), -s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1)
  x = x0 + s * noise
  out = jax.jit(task.unet.apply)(
      {"params": params["unet"]},
      jnp.concatenate([c_in * x, image_latents], axis=-1),
      0.25 * np.log(sigma),
      jnp.asarray(embedding),
      jnp.asarray(time_ids, jnp.float32),
  )
  denoised = c_skip * x + c_out * np.asarray(out)
  weight = (sigma**2 + 1) / sigma**2  # EDM's λ(σ) with σ_data = 1
  expected = weight * np.mean((denoised - x0) ** 2, axis=(1, 2, 3, 4))
  np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-6, atol=0)


# --------------------------------------------------------------------- the stages, end to end
@pytest.mark.slow  # ≈ 3 min on 2 cores (four stages compile and train): keeps the suite < 15 min
def test_image_video_hires_i2v_end_to_end(inputs, tmp_path):
  """image → video → hires → i2v in runlocal mode through init_from, each 2 steps on one device;
  the image-to-video model samples, and its motion conditioning changes what it samples."""
  root = str(tmp_path / "runs")
  encoders = {}
  for stage in ("image", "video", "hires", "i2v"):
    config = load(
        stage,
        inputs["sd2"],
        inputs["videos"],
        root,
        total_steps=2,
        progress_bar=False,
        tensorboard=False,
    )
    expected_source = {"image": None, "video": "image", "hires": "video", "i2v": "hires"}[stage]
    assert config.init_from.workdir == (
        os.path.join(root, expected_source) if expected_source else None
    ), stage
    trainer.train_and_evaluate(config, os.path.join(root, stage))
    encoders[stage] = config
  hires = common.load_stage_params(os.path.join(root, "hires"))
  i2v = common.load_stage_params(os.path.join(root, "i2v"))
  assert i2v["unet"]["conv_in"]["kernel"].shape[-2] == 8  # noisy + conditioning-frame latents
  assert hires["unet"]["conv_in"]["kernel"].shape[-2] == 4
  assert encoders["hires"].data.resolution == 2 * encoders["video"].data.resolution
  pipe = stages.pipeline_from_workdir(os.path.join(root, "i2v"))
  image = first_frames(32, 32, count=2)
  slow = pipe(image, num_steps=2, motion_bucket_id=10, rng=0)
  fast = pipe(image, num_steps=2, motion_bucket_id=200, rng=0)
  assert slow.shape == (2, 4, 32, 32, 3)
  assert np.abs(slow - fast).max() > 1e-4


# ------------------------------------------------------------------------------- bad input
def test_bad_input_says_what_is_accepted(inputs, tmp_path):
  # An SVD folder without its scheduler, an SD folder for i2v without an image encoder.
  partial = str(tmp_path / "svd_without_scheduler")
  shutil.copytree(inputs["svd"], partial)
  shutil.rmtree(os.path.join(partial, "scheduler"))
  with pytest.raises(
      components_lib.ComponentError,
      match=r"has no scheduler/: ldm.pretrained must be a diffusers Stable Video "
      r"Diffusion .* image_encoder/ \(a transformers "
      r"CLIPVisionModelWithProjection",
  ):
    image_to_video.ImageToVideoTask(load("i2v", partial, inputs["videos"]))
  with pytest.raises(ValueError, match=r"needs image_encoder=DIR .* has no image_encoder/"):
    config_lib.load_config(f"{CONFIG}:stage=i2v,pretrained={inputs['sd2']},data={inputs['videos']}")
  # A latent cache cannot serve image-to-video (its frame is noised in pixel space each step).
  with pytest.raises(components_lib.ComponentError, match="latent_cache_dir is not used"):
    image_to_video.ImageToVideoTask(
        load("i2v", inputs["svd"], inputs["videos"], **{"ldm.latent_cache_dir": "/tmp/x"})
    )
  # Clips shorter than the stage's frames are skipped and counted.
  config = load(
      "i2v",
      inputs["svd"],
      inputs["videos"],
      **{"data.resolution": 16, "data.data_dir": str(tmp_path / "tfds")},
  )
  task = image_to_video.ImageToVideoTask(config)
  data = task.make_data(None, 0, 1)
  batch = next(data)
  assert batch["video"].shape == (8, 4, 16, 16, 3) and batch["motion"].shape == (8,)
  skipped = video_folder.skipped_files(sources.make_builder(config.data))
  assert skipped["too_short"] == [media.TOO_SHORT] and skipped["unreadable"] == [media.UNREADABLE]
  # The micro-conditioning clamps (documented in configs/svd.py): fps into fps_range, the motion
  # bucket into [0, 255].
  ids = ldm.added_time_ids(
      config, {"fps": jnp.asarray([0.5, 200.0]), "motion": jnp.asarray([-1.0, 5.0])}, 2
  )
  np.testing.assert_allclose(np.asarray(ids), [[0.0, 0.0, 0.0], [59.0, 255.0, 0.0]])
