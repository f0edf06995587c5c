"""Sampling pipelines: SVD image-to-video against diffusers' StableVideoDiffusionPipeline, the
text-to-video pipeline (video UNet from vldm components; image UNet per frame against diffusers'
StableDiffusionPipeline), compile caching and the errors for bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import sd_folders
from parity import perturb_, relative_error
from svd_folders import save_tiny_svd  # test_sample_cli imports it from here too
from vldm.models import autoencoder, clip, unet as unet_lib
from vldm.models import tokenizer as tokenizer_lib
from vldm.pipelines import (CascadePipeline, ImageToVideoPipeline, PipelineError, SamplerSettings,
                            TextToVideoPipeline, find_trained_stages, pipeline_from_workdir)
from vldm.pipelines.common import low_res_condition

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-3


def _image(height, width, seed):
  rng = np.random.default_rng(seed)
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------ SVD image-to-video
@pytest.fixture(scope="module")
def svd(tmp_path_factory):
  """The tiny SVD folder, diffusers' pipeline reloaded from it (a local path: no hub access), and
  vldm's."""
  folder = str(tmp_path_factory.mktemp("svd"))
  save_tiny_svd(folder)
  reference = diffusers.StableVideoDiffusionPipeline.from_pretrained(folder)
  reference.set_progress_bar_config(disable=True)
  return folder, reference, ImageToVideoPipeline.from_pretrained(folder)


SVD_CASES = {
    # frames, input image size, (height, width), steps, decode_chunk_size, fps, motion, noise_aug
    "f2_32x32": dict(frames=2, image=(40, 48), size=(32, 32), steps=3, chunk=None, fps=7,
                     motion=127, aug=0.02),
    "f3_48x32_chunked": dict(frames=3, image=(64, 40), size=(48, 32), steps=4, chunk=2, fps=11,
                             motion=60, aug=0.1),
}


# The chunked case (37 s on 2 cores) runs with -m slow; chunked decoding itself has its own parity
# test in test_autoencoder.
@pytest.mark.parametrize("case", [pytest.param(name, marks=pytest.mark.slow) if "chunked" in name
                                  else name for name in SVD_CASES])
def test_image_to_video_matches_diffusers(svd, case):
  folder, reference, pipe = svd
  c = SVD_CASES[case]
  height, width = c["size"]
  image = _image(*c["image"], seed=len(case))
  latent_shape = (1, c["frames"], 4, height // 2, width // 2)  # the tiny VAE downsamples by 2
  noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))
  # diffusers draws the augmentation noise first from its generator (the latents are given).
  image_noise = torch.randn((1, 3, height, width), generator=torch.Generator().manual_seed(2))
  kwargs = dict(height=height, width=width, num_frames=c["frames"], fps=c["fps"],
                motion_bucket_id=c["motion"], noise_aug_strength=c["aug"],
                decode_chunk_size=c["chunk"], min_guidance_scale=1.0, max_guidance_scale=3.0)
  expected = {
      output: reference(image, num_inference_steps=c["steps"], latents=noise,
                        generator=torch.Generator().manual_seed(2), output_type=kind,
                        **kwargs).frames
      for output, kind in (("frames", "np"), ("latents", "latent"))}
  ours = {output: pipe(image, num_steps=c["steps"], noise=noise.permute(0, 1, 3, 4, 2).numpy(),
                       image_noise=image_noise.permute(0, 2, 3, 1).numpy(), output=output,
                       **kwargs)
          for output in ("frames", "latents")}
  assert ours["frames"].shape == (1, c["frames"], height, width, 3)
  frames_error = relative_error(ours["frames"], expected["frames"])
  latents_error = relative_error(ours["latents"], expected["latents"].permute(0, 1, 3, 4, 2))
  print(f"{case}: frames {frames_error:.2e}, latents {latents_error:.2e}")
  assert frames_error <= TOLERANCE and latents_error <= TOLERANCE


def test_image_to_video_second_call_does_not_recompile(svd, monkeypatch):
  """Same shapes and static settings as the f2_32x32 parity case: its executables are reused."""
  _, _, pipe = svd
  image = _image(40, 48, seed=3)
  kwargs = dict(num_frames=2, height=32, width=32, num_steps=3, max_guidance_scale=2.0)
  first = pipe(image, rng=0, **kwargs)
  traces = pipe.trace_count
  again = pipe(image, rng=0, **kwargs)
  other = pipe(image, rng=1, **kwargs)
  assert pipe.trace_count == traces
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 1e-3
  assert first.shape == (1, 2, 32, 32, 3) and first.min() >= 0 and first.max() <= 1
  # A call without steps and guidance takes the pipeline's defaults: the same 3-step executable.
  assert (pipe.default_num_steps, pipe.default_max_guidance_scale) == (25, 3.0)  # diffusers'
  monkeypatch.setattr(pipe, "default_num_steps", 3)
  monkeypatch.setattr(pipe, "default_max_guidance_scale", 2.0)
  np.testing.assert_array_equal(pipe(image, rng=0, num_frames=2, height=32, width=32), first)
  assert pipe.trace_count == traces


def test_image_to_video_bad_input(svd):
  folder, _, pipe = svd
  with pytest.raises(ValueError, match=r"Unknown sampler 'eulr'.*'euler'.*'dpmpp_2m'"):
    pipe.with_sampler("eulr")
  # The tiny VAE and UNet each downsample by 2: sizes must be multiples of 4.
  with pytest.raises(ValueError, match=r"height must be a positive multiple of 4.*height=30"):
    pipe(_image(30, 32, seed=0), rng=0)
  with pytest.raises(ValueError, match="multiple of 4"):
    pipe(_image(32, 32, seed=0), width=34, rng=0)
  with pytest.raises(ValueError, match=r"noise must have shape \(1, 2, 16, 16, 4\)"):
    pipe(_image(32, 32, seed=0), num_frames=2, noise=np.zeros((1, 3, 16, 16, 4)),
         image_noise=np.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="Pass rng"):
    pipe(_image(32, 32, seed=0))
  broken = os.path.join(os.path.dirname(folder), "svd_without_image_encoder")
  shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("image_encoder"))
  with pytest.raises(PipelineError, match=r"has no image_encoder/ component subfolder.*"
                                          r"image_encoder/ \(CLIPVisionModelWithProjection\)"):
    ImageToVideoPipeline.from_pretrained(broken)
  with pytest.raises(PipelineError, match="is not a folder"):
    ImageToVideoPipeline.from_pretrained(os.path.join(broken, "nowhere"))


# ------------------------------------------------------------------------------ text-to-video
def _random_params(module, *args, seed=0):
  """Random parameters of the init shapes, drawn with numpy: no init compile (norm scales ≈ 1)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  draw = lambda path, s: (float(path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape)
                          ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def t2v(tmp_path_factory):
  return tiny_text_to_video(str(tmp_path_factory.mktemp("clip_tokenizer")))


def tiny_text_to_video(folder: str) -> TextToVideoPipeline:
  """Tiny random vldm components: a video UNet with 3 added time ids, the per-frame SD VAE, a CLIP
  text encoder and a CLIP BPE tokenizer written to folder."""
  vocab_size = sd_folders.write_clip_vocab(folder)
  tokenizer = tokenizer_lib.CLIPBPETokenizer(folder, max_length=12)
  text_encoder = clip.CLIPTextModel(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=12, bos_token_id=tokenizer.bos_id,
      eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
  unet = unet_lib.UNet(
      temporal=True, in_channels=4, out_channels=4, block_out_channels=(32, 64),
      down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
      mid_block_type="UNetMidBlockSpatioTemporal",
      up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
      layers_per_block=1, num_attention_heads=(2, 4), cross_attention_dim=32,
      use_linear_projection=True, eps_convention="svd", addition_time_embed_dim=8,
      projection_class_embeddings_input_dim=24, num_frames=3, sample_size=8)
  vae = autoencoder.AutoencoderKL(block_out_channels=(32, 32), layers_per_block=1,
                                  latent_channels=4)
  components = dict(
      unet=(unet, _random_params(unet, *unet.example_inputs(1, 2))),
      vae=(vae, _random_params(vae, np.zeros((1, 16, 16, 3), np.float32))),
      text_encoder=(text_encoder, _random_params(text_encoder, np.zeros((1, 12), np.int32))),
      tokenizer=tokenizer)
  settings = SamplerSettings("euler", options=dict(timestep_spacing="trailing"))  # or a dict
  return TextToVideoPipeline.from_components(sampler=settings, **components)


def test_text_to_video_shapes_determinism_and_guidance(t2v):
  prompts = ["a red circle", "a circle"]
  kwargs = dict(num_frames=3, num_steps=3, decode_chunk_size=2)  # 16×16 from sample_size 8
  frames = t2v(prompts, rng=0, guidance_scale=4.0, **kwargs)
  assert frames.shape == (2, 3, 16, 16, 3) and frames.dtype == np.float32
  assert frames.min() >= 0 and frames.max() <= 1 and frames.std() > 1e-3
  traces = t2v.trace_count
  np.testing.assert_array_equal(frames, t2v(prompts, rng=0, guidance_scale=4.0, **kwargs))
  assert t2v.trace_count == traces  # cached: same shapes, same static settings
  assert np.abs(frames - t2v(prompts, rng=1, guidance_scale=4.0, **kwargs)).max() > 1e-3
  unguided = t2v(prompts, rng=0, guidance_scale=1.0, **kwargs)
  assert np.abs(frames - unguided).max() > 1e-3
  # The prompt matters: one noise (both keys are 5), two prompts, two different clips.
  per_key = jax.vmap(jax.random.key)(np.array([5, 5], np.uint32))
  same_noise = t2v(prompts, rng=per_key, guidance_scale=4.0, **kwargs)
  assert np.abs(same_noise[0] - same_noise[1]).max() > 1e-3
  # Video-to-video through the video UNet: the clips set the size; strength changes the result.
  start = np.random.default_rng(2).uniform(size=frames.shape).astype(np.float32)
  v2v = lambda strength: t2v(prompts, rng=0, guidance_scale=4.0, video=start, strength=strength,
                             num_steps=4, decode_chunk_size=2)
  light, heavy = v2v(0.25), v2v(1.0)
  assert light.shape == heavy.shape == start.shape and np.isfinite(light).all()
  assert np.abs(light - heavy).max() > 1e-3


SPLIT_CALL = dict(prompts=["a red circle", "a circle", "", "a blue square"], rng=0,
                  guidance_scale=4.0, num_frames=3, num_steps=3, decode_chunk_size=2)
TWO_DEVICES = textwrap.dedent("""
    import sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_pipelines import SPLIT_CALL, tiny_text_to_video
    from vldm import devices
    devices.split_cpu_into_devices(2)  # as the demo does, before jax's first computation
    assert jax.device_count() == 2
    assert len(devices.split_batch(np.zeros((4, 1)))[0].sharding.device_set) == 2
    assert len(devices.replicate(np.zeros((3,))).sharding.device_set) == 2
    np.save(sys.argv[3], tiny_text_to_video(sys.argv[2])(**SPLIT_CALL))
""")


def test_text_to_video_splits_the_batch_over_devices(t2v, tmp_path):
  """On two devices (here the host's CPU split as the demo splits it) each samples half the batch;
  the clips are those of one device."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
             PYTHONPATH=REPO)
  out = str(tmp_path / "frames.npy")
  subprocess.run([sys.executable, "-c", TWO_DEVICES, os.path.dirname(__file__),
                  str(tmp_path / "tokenizer"), out], env=env, check=True, timeout=600)
  np.testing.assert_allclose(np.load(out), t2v(**SPLIT_CALL), atol=1e-5, rtol=0)


def test_cascade_upsamples_the_base_latents(t2v, monkeypatch):
  """Video LDM's cascade: the base samples 8-px latents, the upsampler (its UNet taking them as 4
  more input channels) samples the 16-px clip conditioned on them."""
  unet = t2v.unet.clone(in_channels=8)
  components = dict(unet=(unet, _random_params(unet, *unet.example_inputs(1, 2))),
                    vae=(t2v.vae, t2v.params["vae"]),
                    text_encoder=(t2v.text_encoder, t2v.params["text_encoder"]),
                    tokenizer=t2v.tokenizer, sampler=t2v.sampler)
  upsampler = TextToVideoPipeline.from_components(low_res_factor=2, low_res_noise_level=100,
                                                  **components)
  cascade = CascadePipeline(base=t2v, upsampler=upsampler, upsampler_num_steps=2)
  prompts = ["a red circle", "a circle"]
  frames = cascade(prompts, num_frames=3, num_steps=2, guidance_scale=2.0, rng=0)
  assert frames.shape == (2, 3, 16, 16, 3) and np.isfinite(frames).all()
  np.testing.assert_array_equal(frames, cascade(prompts, num_frames=3, num_steps=2,
                                                guidance_scale=2.0, rng=0))
  # The upsampler's conditioning: the low-res latents, noise-augmented, ×2 nearest.
  low = np.random.default_rng(0).normal(size=(2, 3, 4, 4, 4)).astype(np.float32)
  noise = np.random.default_rng(1).normal(size=low.shape).astype(np.float32)
  condition = np.asarray(low_res_condition(low, noise, 0.81, 2))
  np.testing.assert_allclose(condition[:, :, ::2, 1::2], 0.9 * low + np.sqrt(0.19) * noise,
                             rtol=1e-5, atol=1e-6)
  up = lambda latents: upsampler(prompts, low_res_latents=latents, num_steps=2,
                                 guidance_scale=1.0, rng=0)  # compiled by the cascade's call
  upsampled = up(low)
  assert upsampled.shape == frames.shape and np.abs(upsampled - up(2 * low)).max() > 1e-3
  with pytest.raises(ValueError, match="pass low_res_latents"):
    upsampler(prompts, num_steps=2, rng=0)
  with pytest.raises(ValueError, match=r"height=32 disagrees with the low_res_latents' 16"):
    upsampler(prompts, low_res_latents=low, height=32, num_steps=2, rng=0)
  with pytest.raises(ValueError, match="low_res_latents is for a latent upsampler"):
    t2v(prompts, low_res_latents=low, num_steps=2, rng=0)
  with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
    cascade(prompts, height=12, width=16, rng=0)
  with pytest.raises(PipelineError, match="takes 2 × the VAE's 4 latent channels"):
    TextToVideoPipeline.from_components(**dict(components, unet=(t2v.unet, t2v.params["unet"])),
                                        low_res_factor=2)
  with pytest.raises(PipelineError, match="upsampler must be a latent upsampler"):
    CascadePipeline(base=t2v, upsampler=t2v)
  # Without num_steps and guidance_scale the base runs its own defaults.
  monkeypatch.setattr(t2v, "default_num_steps", 2)
  monkeypatch.setattr(t2v, "default_guidance_scale", 2.0)
  assert (cascade.default_num_steps, cascade.default_guidance_scale) == (2, 2.0)
  traces = cascade.trace_count
  np.testing.assert_array_equal(cascade(prompts, num_frames=3, rng=0), frames)
  assert cascade.trace_count == traces


def test_text_to_video_defaults_belong_to_the_pipeline(t2v, monkeypatch):
  """Without num_steps and guidance_scale a call runs the pipeline's default_num_steps and
  default_guidance_scale (a trained stage's settings); given ones win."""
  prompts = ["a red circle", "a circle"]
  kwargs = dict(num_frames=3, decode_chunk_size=2)
  expected = t2v(prompts, rng=0, num_steps=3, guidance_scale=4.0, **kwargs)
  traces = t2v.trace_count
  monkeypatch.setattr(t2v, "default_num_steps", 3)
  monkeypatch.setattr(t2v, "default_guidance_scale", 4.0)
  np.testing.assert_array_equal(t2v(prompts, rng=0, **kwargs), expected)
  assert t2v.trace_count == traces  # the 3-step executable: no other step count was compiled
  assert np.abs(t2v(prompts, rng=0, guidance_scale=1.0, **kwargs) - expected).max() > 1e-3
  built = TextToVideoPipeline.from_components(
      unet=(t2v.unet, t2v.params["unet"]), vae=(t2v.vae, t2v.params["vae"]),
      text_encoder=(t2v.text_encoder, t2v.params["text_encoder"]), tokenizer=t2v.tokenizer,
      default_num_steps=3)  # as pipelines.pipeline_from_components passes a stage's settings
  assert (built.default_num_steps, built.default_guidance_scale) == (3, 7.5)


def test_text_to_video_bad_input(t2v):
  with pytest.raises(ValueError, match="multiple of 4"):
    t2v(["a red circle"], height=18, width=16, rng=0)
  with pytest.raises(ValueError, match=r"Unknown sampler 'ddim2'; accepted: \('ddpm', 'ddim'"):
    t2v.with_sampler("ddim2")
  with pytest.raises(ValueError, match=r"time_ids has 2 entries; this UNet takes 3"):
    t2v(["a red circle"], time_ids=(1.0, 2.0), rng=0)
  unet, params = t2v.unet, t2v.params
  with pytest.raises(PipelineError, match="image-to-video UNet"):
    TextToVideoPipeline.from_components(
        unet=(unet.clone(in_channels=8), params["unet"]), vae=(t2v.vae, params["vae"]),
        text_encoder=(t2v.text_encoder, params["text_encoder"]), tokenizer=t2v.tokenizer)


def test_text_to_video_per_frame_matches_stable_diffusion(tmp_path):
  """An image UNet folder (SD layout) samples every frame as SD samples an image: the frames equal
  diffusers' StableDiffusionPipeline images for the same noise, with guidance, DDIM."""
  torch.manual_seed(0)
  tokenizer_dir = str(tmp_path / "vocab")
  vocab_size = sd_folders.write_clip_vocab(tokenizer_dir)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=12)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=12, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
  unet = diffusers.UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
      out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
      attention_head_dim=2, norm_num_groups=32)
  vae = diffusers.AutoencoderKL(block_out_channels=[32, 32], down_block_types=[
      "DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4,
      layers_per_block=1)
  for seed, model in enumerate((unet, vae, text_encoder)):
    perturb_(model, seed)
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", clip_sample=False,
                                      set_alpha_to_one=False, steps_offset=1)
  reference = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  reference.set_progress_bar_config(disable=True)
  folder = str(tmp_path / "sd")
  reference.save_pretrained(folder)
  frames, steps, scale = 3, 4, 5.0
  noise = torch.randn((frames, 4, 8, 8), generator=torch.Generator().manual_seed(0))
  expected = reference("a red circle", num_images_per_prompt=frames, latents=noise, height=16,
                       width=16, num_inference_steps=steps, guidance_scale=scale,
                       output_type="np").images
  pipe = TextToVideoPipeline.from_pretrained(folder)
  assert not pipe.unet.temporal and pipe.sampler.sampler == "ddim"
  actual = pipe("a red circle", num_frames=frames, height=16, width=16, num_steps=steps,
                guidance_scale=scale, noise=noise.permute(0, 2, 3, 1).numpy()[None])
  error = relative_error(actual[0], expected)
  print(f"per-frame text-to-video vs StableDiffusionPipeline: {error:.2e}")
  assert error <= TOLERANCE

  # Video-to-video (SDEdit) = StableDiffusionImg2ImgPipeline on every frame. diffusers encodes with
  # a posterior *sample*: a VAE whose posterior std is e^-15 makes that the mode vldm takes.
  with torch.no_grad():
    logvar = slice(vae.config.latent_channels, None)
    vae.quant_conv.weight[logvar] = 0
    vae.quant_conv.bias[logvar] = -100.0  # clamped to -30 by DiagonalGaussianDistribution
  img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
  img2img.set_progress_bar_config(disable=True)
  img2img.save_pretrained(folder)
  video = np.random.default_rng(1).uniform(size=(frames, 16, 16, 3)).astype(np.float32)
  steps, strength = 6, 0.5
  generator = torch.Generator().manual_seed(3)
  expected = img2img("a red circle", image=video, strength=strength, num_inference_steps=steps,
                     guidance_scale=scale, num_images_per_prompt=frames, generator=generator,
                     output_type="np").images
  draws = torch.Generator().manual_seed(3)
  torch.randn((frames, 4, 8, 8), generator=draws)  # the posterior sample's draw
  noise = torch.randn((frames, 4, 8, 8), generator=draws).permute(0, 2, 3, 1).numpy()[None]
  pipe = TextToVideoPipeline.from_pretrained(folder)
  actual = pipe("a red circle", video=video[None], strength=strength, num_steps=steps,
                guidance_scale=scale, noise=noise)
  error = relative_error(actual[0], expected)
  print(f"per-frame video-to-video vs StableDiffusionImg2ImgPipeline: {error:.2e}")
  assert error <= TOLERANCE
  with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
    pipe("a red circle", video=video[None], strength=0.1, num_steps=steps, noise=noise)
  with pytest.raises(ValueError, match=r"video must be clips \[B=2, F, H, W, 3\]"):
    pipe(["a", "b"], video=video[None], num_steps=steps, rng=0)
  with pytest.raises(ValueError, match="height=32 disagrees with the video's 16"):
    pipe("a red circle", video=video[None], height=32, num_steps=steps, rng=0)


# ----------------------------------------------------------------------------------- workdir
def test_pipeline_from_workdir_errors(tmp_path):
  from vldm.recipes import stages as recipe_stages  # pylint: disable=g-import-not-at-top
  with pytest.raises(PipelineError, match=r"holds no trained stage: looked for .*checkpoints/<step>"
                                          r" and .*<stage>/checkpoints/<step>"):
    pipeline_from_workdir(str(tmp_path), restore=lambda stage: {})
  (tmp_path / "video" / "checkpoints" / "40").mkdir(parents=True)
  (tmp_path / "video" / "checkpoints" / "50.orbax-checkpoint-tmp-1").mkdir()
  stages = find_trained_stages(str(tmp_path))
  assert [(s.name, s.step) for s in stages] == [("video", 40)]
  with pytest.raises(PipelineError, match=r"Found the trained stage 'video'.*step 40"):
    recipe_stages.pipeline_from_workdir(str(tmp_path))  # the recipes' restorer
  with pytest.raises(PipelineError, match="missing: vae, text_encoder, tokenizer"):
    pipeline_from_workdir(str(tmp_path), restore=lambda stage: {"unet": None})
