"""An SVD image-to-video pipeline written as a diffusers StableVideoDiffusionPipeline folder:
diffusers loads it and samples the same frames as vldm; vldm loads it back with its defaults and
micro-conditioning ranges; SVD's 'v_edm' sampler settings as a diffusers scheduler config."""

import dataclasses
import json
import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from parity import relative_error
from svd_folders import save_tiny_svd
from vldm.diffusion import samplers
from vldm.diffusion.parameterization import Denoiser
from vldm.pipelines import (
    ImageToVideoPipeline,
    PipelineError,
    SamplerSettings,
    pipeline_from_components,
)
from vldm.pipelines import folder as folder_lib
from vldm.pipelines import image_to_video

TOLERANCE = 1e-3
# Not diffusers' defaults, so that the comparison shows the folder carries them.
DEFAULTS = dict(
    default_num_steps=3,
    default_min_guidance_scale=1.0,
    default_max_guidance_scale=2.5,
    default_fps=6,
    default_motion_bucket_id=100,
    default_noise_aug_strength=0.05,
)
RANGES = {"fps": (4, 12), "motion_bucket_id": (50.0, 200.0)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(the trained-like pipeline: tiny SVD with perturbed UNet params, its exported folder)."""
  source = str(tmp_path_factory.mktemp("svd"))
  save_tiny_svd(source)
  pipe = ImageToVideoPipeline.from_pretrained(source)
  rng = np.random.default_rng(0)
  unet = jax.tree.map(
      lambda p: p + 1e-2 * rng.standard_normal(p.shape).astype(np.float32), pipe.params["unet"]
  )
  pipe = dataclasses.replace(
      pipe, params=dict(pipe.params, unet=unet), micro_conditioning_ranges=RANGES, **DEFAULTS
  )
  out = str(tmp_path_factory.mktemp("export"))
  assert folder_lib.save_pipeline(pipe, out) == out
  return pipe, out


def test_exported_folder_loads_in_diffusers_and_samples_the_same(exported, capfd):
  pipe, out = exported
  capfd.readouterr()
  reference = diffusers.StableVideoDiffusionPipeline.from_pretrained(out)
  log = capfd.readouterr().err.lower()
  for word in ("missing", "unexpected", "newly initialized", "not used", "not initialized"):
    assert word not in log, log
  reference.set_progress_bar_config(disable=True)
  index = json.loads(open(os.path.join(out, "model_index.json")).read())
  assert index["unet"] == ["diffusers", "UNetSpatioTemporalConditionModel"]
  assert index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
  assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
  assert reference.scheduler.config.timestep_type == "continuous"

  frames, height, width = 2, 32, 32
  rng = np.random.default_rng(1)
  image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
  noise = torch.randn(
      (1, frames, 4, height // 2, width // 2), generator=torch.Generator().manual_seed(1)
  )
  # diffusers draws the augmentation noise first from its generator (the latents are given).
  image_noise = torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(2))
  expected = reference(
      image,
      height=height,
      width=width,
      num_frames=frames,
      num_inference_steps=3,
      fps=6,
      motion_bucket_id=100,
      noise_aug_strength=0.05,
      min_guidance_scale=1.0,
      max_guidance_scale=2.5,
      latents=noise,
      generator=torch.Generator().manual_seed(2),
      output_type="np",
  ).frames
  # The pipeline's defaults stand for the values diffusers was given.
  ours = pipe(
      image,
      height=height,
      width=width,
      num_frames=frames,
      noise=noise.permute(0, 1, 3, 4, 2).numpy(),
      image_noise=image_noise.permute(0, 2, 3, 1).numpy(),
  )
  error = relative_error(ours, expected)
  print(f"frames relative error {error:.2e}")
  assert error <= TOLERANCE


def test_exported_folder_round_trips(exported, tmp_path):
  pipe, out = exported
  back = folder_lib.load_pipeline(out)
  assert isinstance(back, ImageToVideoPipeline)
  for name, value in DEFAULTS.items():
    assert getattr(back, name) == value, name
  assert back.micro_conditioning_ranges == {k: (float(a), float(b)) for k, (a, b) in RANGES.items()}
  assert (tuple(back.clip_mean), tuple(back.clip_std)) == (
      tuple(pipe.clip_mean),
      tuple(pipe.clip_std),
  )
  assert back.sampler == pipe.sampler and back.sampler.prediction_type == "v_edm"
  assert jax.tree.structure(back.params) == jax.tree.structure(pipe.params)
  for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(pipe.params)):
    np.testing.assert_array_equal(a, b)
  # The feature extractor config is what transformers writes for it.
  transformers = pytest.importorskip("transformers")
  transformers.CLIPImageProcessor(crop_size=224, size=224).save_pretrained(str(tmp_path))
  read = lambda f: json.loads(open(os.path.join(f, "preprocessor_config.json")).read())
  assert read(os.path.join(out, "feature_extractor")) == read(str(tmp_path))
  # A trained stage's components give the same pipeline.
  components = dict(
      unet=(pipe.unet, pipe.params["unet"]),
      vae=(pipe.vae, pipe.params["vae"]),
      image_encoder=(pipe.image_encoder, pipe.params["image_encoder"]),
      sampler=pipe.sampler,
      micro_conditioning_ranges=RANGES,
      **{k[len("default_") :]: v for k, v in DEFAULTS.items()},
  )
  staged = pipeline_from_components(components)
  assert isinstance(staged, ImageToVideoPipeline)
  assert (
      staged.default_fps == 6 and staged.micro_conditioning_ranges == back.micro_conditioning_ranges
  )
  with pytest.raises(PipelineError, match="unknown: guidance_scale"):
    pipeline_from_components(dict(components, guidance_scale=3.0))


def test_micro_conditioning_errors(exported):
  pipe, _ = exported
  image = np.zeros((32, 32, 3), np.uint8)
  with pytest.raises(
      ValueError,
      match=r"motion_bucket_id=255 is outside \[50, 200\]: the model "
      r"was trained on motion_bucket_id in that range",
  ):
    pipe(image, motion_bucket_id=255, rng=0)
  with pytest.raises(ValueError, match=r"fps=2 is outside \[4, 12\]"):
    pipe(image, fps=2, rng=0)
  unbounded = dataclasses.replace(pipe, micro_conditioning_ranges=None)
  for fps in (0, -3):
    with pytest.raises(ValueError, match=rf"fps must be > 0.*got {fps}"):
      unbounded(image, fps=fps, rng=0)
  with pytest.raises(ValueError, match=r"Unknown micro-conditioning name\(s\) \['fsp'\]"):
    dataclasses.replace(pipe, micro_conditioning_ranges={"fsp": (1, 2)})
  # A UNet that diffusers' class cannot describe cannot make a StableVideoDiffusionPipeline folder.
  other = dataclasses.replace(pipe, unet=pipe.unet.clone(eps_convention="uniform"))
  with pytest.raises(
      PipelineError,
      match=r"needs its UNet as a UNetSpatioTemporalConditionModel.*" r"eps_convention",
  ):
    folder_lib.save_pipeline(other, "/nonexistent/never-written")
  # time_ids: per-example values, numpy on the host, traceable.
  np.testing.assert_array_equal(
      image_to_video.time_ids(7, 127, 0.02, 2), np.float32([[6, 127, 0.02]] * 2)
  )
  traced = jax.jit(image_to_video.time_ids)(jnp.float32([7, 9]), 10.0, jnp.float32([0.0, 0.1]))
  np.testing.assert_array_equal(traced, np.float32([[6, 10, 0.0], [8, 10, 0.1]]))


def _network(x, t):
  return jnp.sin(x * 1.3 + t[:, None, None, None]) * 0.7


def test_v_edm_as_a_diffusers_scheduler():
  svd = SamplerSettings.from_scheduler_config(image_to_video.SVD_SCHEDULER_CONFIG)
  assert svd.prediction_type == "v_edm"
  config = samplers.to_scheduler_config(svd.sampler, svd.schedule, svd.options, "v_edm")
  for key, value in image_to_video.SVD_SCHEDULER_CONFIG.items():  # SVD's config comes back
    assert config[key] == value, key
  # A training stage's settings (v_edm, Euler's default discrete timesteps) are written with
  # continuous ones: 'v_edm' ignores the sampler's timesteps, diffusers' Euler needs them ¼ ln σ.
  trained = dataclasses.replace(svd, options=dict(svd.options, timestep_type="discrete"))
  config = samplers.to_scheduler_config(
      trained.sampler, trained.schedule, trained.options, trained.prediction_type
  )
  assert (config["prediction_type"], config["timestep_type"]) == ("v_prediction", "continuous")
  back = SamplerSettings.from_scheduler_config(json.loads(json.dumps(config)))
  assert (back.sampler, back.schedule, back.prediction_type) == ("euler", svd.schedule, "v_edm")
  noise = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4, 4)), jnp.float32)
  run = lambda s: np.asarray(
      jax.jit(
          lambda n: samplers.run(s.plan(4), Denoiser(_network, s.prediction_type, s.schedule), n)
      )(noise)
  )
  np.testing.assert_array_equal(run(back), run(trained))
  # The raw diffusers reading (v_prediction, continuous timesteps) is the same denoiser.
  name, schedule, options, prediction = samplers.from_scheduler_config(config)
  np.testing.assert_array_equal(
      run(SamplerSettings(name, schedule, options, prediction)), run(trained)
  )
  with pytest.raises(ValueError, match=r"'v_edm'.*only with sampler 'euler'.*Got sampler 'heun'"):
    samplers.to_scheduler_config("heun", svd.schedule, {}, "v_edm")
  with pytest.raises(ValueError, match="Unknown prediction_type for a diffusers scheduler 'edm'"):
    samplers.to_scheduler_config("euler", svd.schedule, {}, "edm")
