"""The shapes recipe: stage configs, the tasks' parts, and the whole recipe at runlocal size."""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import media
import recipe_runs
from test_curate import write_tiny_clip
from vldm import demo
from vldm import video_io
from vldm.data import pipeline as pipeline_lib
from vldm.data import shapes as shapes_data
from vldm.models import inflate
from vldm.pipelines import CascadePipeline
from vldm.pipelines import workdir as workdir_lib
from vldm.recipes import autoencoder as autoencoder_recipe
from vldm.recipes import common
from vldm.recipes import ldm
from vldm.recipes import stages
from vldm.train import config_lib
from vldm.train import metrics as metrics_lib
from vldm.train import tasks as tasks_lib
from vldm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = os.path.join(REPO, "configs", "shapes.py")
config_lib.ensure_importable(SHAPES)
from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def load(stage, root="", runlocal=True):
  return config_lib.load_config(f"{SHAPES}:stage={stage},root={root},runlocal={runlocal}")


@pytest.fixture(autouse=True)
def rbg_keys():
  """The recipe's random-number implementation, restored afterwards for the other tests."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


def test_stage_configs_are_wired():
  for stage in shapes_config.STAGES:
    for runlocal in (True, False):
      config = load(stage, "/runs/x", runlocal)
      assert config.task == shapes_config.TASKS[stage]
      if stage in shapes_config.INIT_FROM:
        source, transform = shapes_config.INIT_FROM[stage]
        assert config.init_from.workdir == f"/runs/x/{source}"
        assert config.init_from.transform == transform
      else:
        assert config.init_from.workdir is None
      assert config.data.data_dir == "/runs/x/data"
      if stage in ("image", "video", "hires"):
        assert config.ldm.vae.workdir == "/runs/x/autoencoder_video"
  full = {s: load(s, runlocal=False) for s in shapes_config.STAGES}
  assert full["video"].data.resolution == 32 and full["video"].data.frames == 8
  assert full["hires"].data.resolution == 64 and full["hires"].ldm.train == "all"
  # Video: spatial layers frozen; the text encoder learns the direction words (image captions
  # have none) and the temporal transformers get the text-dependent motion embedding.
  assert full["video"].ldm.train == "temporal" and full["video"].ldm.text_encoder.train
  assert full["video"].ldm.temporal.text_motion_embedding
  assert not full["hires"].ldm.text_encoder.train
  assert full["image"].ldm.text_encoder.train and full["image"].data.caption_dropout > 0
  # One batch size: --config.batch_size sets the data's too.
  assert config_lib.load_config(f"{SHAPES}:stage=video", {"batch_size": 6}).data.batch_size == 6
  with pytest.raises(ValueError, match="Unknown stage 'vidoe'"):
    load("vidoe")


def test_host_init_follows_flax_defaults():
  abstract = {
      "dense": {
          "kernel": jax.ShapeDtypeStruct((400, 300), jnp.float32),
          "bias": jax.ShapeDtypeStruct((300,), jnp.float32),
      },
      "norm": {"scale": jax.ShapeDtypeStruct((8,), jnp.float32)},
      "embed": {"embedding": jax.ShapeDtypeStruct((50, 64), jnp.float32)},
      "time_mixer": {"mix_factor": jax.ShapeDtypeStruct((1,), jnp.float32)},
  }
  params = common.host_init(abstract, seed=3, constants={"mix_factor": 0.5})
  np.testing.assert_allclose(np.std(params["dense"]["kernel"]), 1 / np.sqrt(400), rtol=0.02)
  assert np.abs(params["dense"]["kernel"]).max() <= 2 / 0.8796 / np.sqrt(400) + 1e-6
  np.testing.assert_allclose(np.std(params["embed"]["embedding"]), 1 / 8, rtol=0.05)
  assert (params["dense"]["bias"] == 0).all() and (params["norm"]["scale"] == 1).all()
  assert params["time_mixer"]["mix_factor"][0] == 0.5
  again = common.host_init(abstract, seed=3)
  np.testing.assert_array_equal(again["dense"]["kernel"], params["dense"]["kernel"])


def test_captioned_data_tokenizes_counts_steps_and_resumes():
  source = [dict(image=np.full((8, 8, 3), i, np.uint8), caption=f"a red circle") for i in range(8)]
  make = lambda: common.CaptionedData(
      pipeline_lib.Pipeline(
          source,
          global_batch_size=2,
          kind="image",
          caption_dropout=0.5,
          seed=1,
          num_workers=1,
          prefetch=1,
      ),
      common.shapes_tokenizer(),
  )
  data = make()
  batches = [next(data) for _ in range(6)]
  assert set(batches[0]) == {"image", "input_ids", "step", "fps"}  # fps: micro-conditioning
  assert [int(b["step"][0]) for b in batches] == list(range(6))  # over two epochs
  tokenizer = common.shapes_tokenizer()
  ids = np.concatenate([b["input_ids"] for b in batches])
  full, empty = tokenizer(["a red circle"])[0], tokenizer([""])[0]
  assert all((row == full).all() or (row == empty).all() for row in ids)
  assert any((row == empty).all() for row in ids)  # caption dropout for guidance
  resumed = make()
  fresh = make()
  for _ in range(3):
    next(fresh)
  resumed.set_state(fresh.get_state())
  np.testing.assert_array_equal(next(resumed)["image"], batches[3]["image"])
  assert int(next(resumed)["step"][0]) == 4
  assert (
      len(common.all_prompts()) == 72 and tokenizer.vocab_size == 19
  )  # 15 words + pad, bos, unk, eos


def test_adversarial_and_reconstruction_gradients_are_separated():
  config = load("autoencoder")
  task = autoencoder_recipe.AutoencoderTask(config)
  params = task.init_params(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32),
      "step": jnp.full((2,), config.autoencoder.disc_start, jnp.int32),
  }
  loss_fn = lambda p: task.loss_fn(p, {}, batch, jax.random.key(1))

  @jax.jit
  def gradients(p):
    total = jax.grad(lambda q: loss_fn(q)[0])(p)
    critic = jax.grad(lambda q: loss_fn(q)[1]["d_loss"])(p)
    return total, critic, loss_fn(p)[1]

  total, critic, metrics = gradients(params)
  norm = lambda tree: float(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))
  assert norm(critic["vae"]) == 0  # the critic's loss never moves the autoencoder
  assert norm(critic["discriminator"]) > 0 and norm(total["vae"]) > 0
  # The critic's whole gradient is its own loss's: the generator terms do not reach it.
  for a, b in zip(
      jax.tree.leaves(total["discriminator"]), jax.tree.leaves(critic["discriminator"])
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  assert metrics["disc_started"] == 1 and 0 < metrics["d_weight"] < 1e4
  assert metrics["g_loss"] != 0


def test_temporal_decoder_starts_frame_by_frame_with_the_kl_encoder():
  config = load("autoencoder_video")
  kl = autoencoder_recipe.AutoencoderTask(load("autoencoder"))
  kl_params = kl.init_params(jax.random.key(0))
  task = autoencoder_recipe.TemporalDecoderTask(config)
  target = task.init_params(jax.random.key(1))
  params = autoencoder_recipe.from_kl(kl_params, target)
  flat_kl = traverse_util.flatten_dict(kl_params["vae"])
  for path, value in traverse_util.flatten_dict(params).items():
    if path[0] != "decoder":
      np.testing.assert_array_equal(value, flat_kl[path])
  labels = traverse_util.flatten_dict(task.trainable_labels(params))
  assert {k[0] for k, v in labels.items() if v == tasks_lib.TRAIN} == {"decoder"}
  latents = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4, 4, 4)), jnp.float32)
  decode = jax.jit(lambda p, z: task.vae.apply({"params": p}, z, method="decode"))
  clip = decode(params, latents)
  frames = jnp.concatenate([decode(params, latents[:, i : i + 1]) for i in range(3)], axis=1)
  np.testing.assert_allclose(clip, frames, atol=1e-5)  # the temporal layers start as identity


def test_inflation_starts_from_the_image_model_and_freezes_the_spatial_layers():
  image_task = ldm.LatentDiffusionTask(load("image"))
  video_task = ldm.LatentDiffusionTask(load("video"))
  image_params = image_task.init_params(jax.random.key(0))
  video_params = ldm.inflate_transform(image_params, video_task.init_params(jax.random.key(1)))
  labels = traverse_util.flatten_dict(video_task.trainable_labels(video_params))
  trained = {k for k, v in labels.items() if v == tasks_lib.TRAIN}
  # The UNet's temporal layers and the text encoder (it learns the direction words here).
  assert {k for k in trained if k[0] == "unet"} == {
      k for k in labels if k[0] == "unet" and inflate.is_temporal(k)
  }
  assert {k for k in trained if k[0] != "unet"} == {k for k in labels if k[0] == "text_encoder"}
  assert all(
      v == tasks_lib.TRAIN
      for v in traverse_util.flatten_dict(image_task.trainable_labels(image_params)).values()
  )
  rng = np.random.default_rng(0)
  clip = jnp.asarray(rng.normal(size=(2, 3, 4, 4, 4)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2, 8, 32)), jnp.float32)
  t = jnp.asarray([10.0, 500.0])
  video = video_task.unet.apply({"params": video_params["unet"]}, clip, t, context)
  frames = image_task.unet.apply(
      {"params": image_params["unet"]},
      clip.reshape(6, 4, 4, 4),
      jnp.repeat(t, 3),
      jnp.repeat(context, 3, axis=0),
  )
  np.testing.assert_allclose(video, frames.reshape(video.shape), atol=1e-4)


def cache_and_render(stage, tmp_path, num_examples):
  """(task, vae_params, cached, rendered): a stage's first batch from a latent cache built with a
  random VAE, and the same batch rendered."""
  config = load(stage)
  config.data.data_dir = str(tmp_path / "data")
  config.data.num_train_examples = num_examples
  task = ldm.LatentDiffusionTask(config)
  vae_params = common.host_init(
      jax.eval_shape(
          lambda: task.vae.init(jax.random.key(0), jnp.zeros((1, 2, 8, 8, 3)))["params"]
      ),
      0,
  )
  cache_dir = str(tmp_path / "latents")
  ldm.build_latent_cache(task, config.data, cache_dir, vae_params, 0, 1)
  config.data.name, config.data.cache_dir = "latent_cache", cache_dir
  cached = next(common.make_data(config.data, None, 0, 1, task.tokenizer))
  config.data.name = "shapes"
  return task, vae_params, cached, next(common.make_data(config.data, None, 0, 1, task.tokenizer))


def test_latent_cache_holds_the_vae_posterior_and_feeds_the_same_loss(tmp_path):
  task, vae_params, cached, pixels = cache_and_render("video", tmp_path, 6)
  assert set(cached) == {"latent_mean", "latent_std", "input_ids", "step", "fps"}
  np.testing.assert_array_equal(cached["input_ids"], pixels["input_ids"])
  posterior = task.vae.apply(
      {"params": vae_params}, pixels["video"].reshape(-1, 8, 8, 3), method="encode"
  )
  np.testing.assert_allclose(
      cached["latent_mean"].reshape(posterior.mean.shape), posterior.mean, atol=1e-5
  )
  # The loss draws the same posterior sample from the moments as from the pixels.
  frozen = {"vae": vae_params, "scale": np.float32(0.7)}
  key = jax.random.key(3)
  np.testing.assert_allclose(
      task.latents(frozen, cached, key)["latent"],
      task.latents(frozen, pixels, key)["latent"],
      atol=1e-5,
  )


def test_upsampler_cache_holds_the_low_resolution_posterior(tmp_path):
  task, vae_params, cached, rendered = cache_and_render("hires", tmp_path, 4)
  clips = rendered["video"]  # 16 px
  assert cached["latent_mean"].shape[2:4] == (8, 8) and cached["low_res_mean"].shape[2:4] == (4, 4)
  # The base stage's resolution: the clip area-downsampled ×2, then encoded.
  low = clips.reshape(2, 8, 8, 2, 8, 2, 3).mean(axis=(3, 5)).reshape(-1, 8, 8, 3)
  posterior = task.vae.apply({"params": vae_params}, low, method="encode")
  np.testing.assert_allclose(
      cached["low_res_mean"].reshape(posterior.mean.shape), posterior.mean, atol=1e-5
  )
  np.testing.assert_allclose(
      cached["low_res_std"].reshape(posterior.std.shape), posterior.std, atol=1e-5
  )


def test_upsampler_starts_as_the_video_model_and_checks_its_channels():
  video_task = ldm.LatentDiffusionTask(load("video"))
  up_task = ldm.LatentDiffusionTask(load("hires"))
  video_params = video_task.init_params(jax.random.key(0))
  up_params = ldm.widen_input_transform(video_params, up_task.init_params(jax.random.key(1)))
  assert up_task.unet.in_channels == 8 and up_task.base_unet.in_channels == 4
  # Every parameter is the video model's; the input conv's conditioning channels weigh zero, so
  # the upsampler's output starts as the video model's whatever the conditioning.
  video_flat = traverse_util.flatten_dict(video_params)
  up_flat = traverse_util.flatten_dict(up_params)
  assert set(video_flat) == set(up_flat)
  kernel = ("unet", "conv_in", "kernel")
  for key in video_flat:
    if key != kernel:
      np.testing.assert_array_equal(up_flat[key], video_flat[key])
  np.testing.assert_array_equal(up_flat[kernel][..., :4, :], video_flat[kernel])
  assert up_flat[kernel].shape[-2] == 8 and not np.any(up_flat[kernel][..., 4:, :])
  assert all(
      v == tasks_lib.TRAIN
      for v in traverse_util.flatten_dict(up_task.trainable_labels(up_params)["unet"]).values()
  )
  with pytest.raises(tasks_lib.CheckpointMismatchError, match="widen_input"):
    ldm.widen_input_transform(up_params, video_params)
  config = load("hires")
  config.ldm.unet.model.in_channels = 4
  with pytest.raises(ValueError, match="latent upsampler .* needs 2 × the VAE's 4 latent channels"):
    ldm.LatentDiffusionTask(config)


def test_upsampler_windows_keep_latents_and_low_res_latents_aligned():
  low = jax.random.normal(jax.random.key(0), (8, 2, 6, 6, 4))  # [B, F, h, w, C]
  upsample = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
  windows, low_windows = ldm.random_windows(upsample(low), low, 4, 2, jax.random.key(1))
  assert windows.shape == (8, 2, 4, 4, 4) and low_windows.shape == (8, 2, 2, 2, 4)
  np.testing.assert_array_equal(windows, upsample(low_windows))  # the same window, at ×2
  offsets = set()
  for example, window in zip(np.asarray(low), np.asarray(low_windows)):
    found = [
        (y, x)
        for y in range(5)
        for x in range(5)
        if np.array_equal(example[:, y : y + 2, x : x + 2], window)
    ]
    assert len(found) == 1
    offsets.add(found[0])
  assert len(offsets) > 1  # each example draws its own window

  config = load("hires")  # runlocal: 8 × 8 latents, windows on the ×2 grid
  for crop in (3, 10):
    config.ldm.upsampler.train_crop = crop
    message = f"train_crop is {crop}; .* ≤ the latent size 8 divisible by 2"
    with pytest.raises(ValueError, match=message):
      ldm.LatentDiffusionTask(config)
  config.ldm.upsampler.train_crop = 4
  assert ldm.LatentDiffusionTask(config).train_crop == 4


def test_recipe_end_to_end_at_runlocal_size(tmp_path):
  root = str(tmp_path / "run")
  summaries = demo.run(root, runlocal=True, num_samples=1, batch_size=72)
  assert set(summaries) == {"hires"} and summaries["hires"]["overall"]["clips"] == 72
  report = open(os.path.join(root, "report.md")).read()
  assert "| held-out | 12 |" in report and "| seen | 60 |" in report
  for stage in shapes_config.BASE_STAGES:  # the long-video stages only with --long
    assert f"| {stage} | 3 × 2 |" in report
  samples = os.path.join(root, "samples")
  entries = json.load(open(os.path.join(samples, "samples.json")))
  assert len(entries) == 72 and len({e["prompt"] for e in entries}) == 72
  for entry in entries[:3]:
    assert os.path.getsize(os.path.join(samples, entry["file"])) > 0
    assert os.path.getsize(os.path.join(samples, entry["mp4"])) > 0
  grid = video_io.read_frames(os.path.join(samples, "grid.gif"))
  picture = video_io.read_frames(os.path.join(samples, "grid.png"))[0]
  height = grid.shape[1]
  assert picture.shape == (2 * height + 8,) + grid.shape[2:]  # first frame, white gap, last
  assert picture[height : height + 8].min() >= 240  # white, to the palette
  for part, frame in ((picture[:height], grid[0]), (picture[height + 8 :], grid[-1])):
    assert np.abs(part.astype(float) - frame).mean() < 20  # both palette-quantized
  timings = json.load(open(os.path.join(root, "timings.json")))
  assert set(timings) == set(shapes_config.BASE_STAGES)
  for stage in ("image", "video", "hires"):  # the diffusion stages trained on cached latents
    assert os.path.exists(os.path.join(root, stage, "latents", "train", "index.p0.json"))

  # A second run finds every stage finished and trains nothing.
  assert demo.train_stages(root, runlocal=True) == timings

  # `python -m vldm.evaluate --workdir`: the newest stage samples a clip for each real clip's
  # caption; CLIPSIM (a tiny CLIP) and the oracle judge them (FVD and FID with full-size networks:
  # tests/test_evaluate_cli.py, -m slow).
  real, out = shapes_clip_folder(str(tmp_path / "real"), 4), str(tmp_path / "eval" / "eval.json")
  write_tiny_clip(str(tmp_path / "clip"))
  recipe_runs.run(
      "evaluate", "--workdir", root, "--real", real, "--metrics", "clipsim,oracle",
      "--clip", str(tmp_path / "clip"), "--num_clips", "4", "--num_frames", "8", "--out", out,
      inputs={"cache": str(tmp_path / "jax_cache")},
  )  # fmt: skip
  result = json.load(open(out))
  assert -1 <= result["clipsim"] <= 1 and 0 <= result["oracle_all"] <= 1
  assert result["counts"]["generated_clips"] == 4 and result["protocol"]["num_frames"] == 8
  samples = json.load(open(os.path.join(tmp_path, "eval", "eval_generated", "samples.json")))
  assert [s["prompt"] for s in samples] == json.load(open(os.path.join(real, "prompts.json")))

  # `python -m vldm.sample --workdir` can rebuild the newest stage from its saved config.
  stage = workdir_lib.find_trained_stages(root)[0]
  assert stage.name == "hires"
  pipe = stages.pipeline_from_workdir(root)
  # hires is a latent upsampler: the video stage samples, hires upsamples ×2.
  assert isinstance(pipe, CascadePipeline) and pipe.upsampler.low_res_factor == 2
  assert pipe.base.unet.in_channels == 4 and pipe.upsampler.unet.in_channels == 8
  assert pipe.upsampler.unet.temporal and pipe.upsampler.vae.scaling_factor > 0
  assert pipe.default_size() == (16, 16)  # the hires stage's size, not the base's
  # Its sampler settings are the stage's own (what the demo's report judged), not flag defaults.
  sampler = load("video").ldm.sampler
  assert (pipe.default_num_steps, pipe.default_guidance_scale) == (
      sampler.num_steps,
      sampler.guidance_scale,
  )
  assert pipe.base.sampler.sampler == sampler.name == "ddim"

  # A stage the demo trained resumes under plain `python -m vldm.train` (the process default
  # PRNG is threefry there): its key follows the stage's config.prng_impl.
  jax.config.update("jax_default_prng_impl", "threefry2x32")
  # It also evaluates while training (config.eval): the shapes oracle on fixed prompts, logged.
  prompts = ("a red circle moving left", "a blue square moving up")
  config = config_lib.load_config(
      f"{SHAPES}:stage=video,root={root},runlocal=True",
      {"total_steps": 4, "eval_every": 4, "eval.metrics": "oracle", "eval.prompts": prompts},
  )
  state = trainer.train_and_evaluate(config, os.path.join(root, "video"))
  assert int(state.step) == 4
  logged = [r for r in metrics_lib.read_metrics(os.path.join(root, "video")) if r["step"] == 4]
  evaluation = {k: v for r in logged for k, v in r.items() if k.startswith("eval/")}
  assert set(evaluation) >= {"eval/oracle_all", "eval/oracle_color", "eval/oracle_consistency"}
  assert all(0 <= v <= 1 for v in evaluation.values())


def shapes_clip_folder(folder, n, frames=8, size=16):
  """n validation clips of the shapes dataset as MP4s with a captions file (and prompts.json)."""
  os.makedirs(folder)
  rows = []
  for i in range(n):
    example = shapes_data.make_example("video", "validation", i, frames=frames, size=size)
    media.write_video(os.path.join(folder, f"{i}.mp4"), example["video"], 8)
    rows.append({"file": f"{i}.mp4", "caption": example["caption"]})
  with open(os.path.join(folder, "captions.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(folder, "prompts.json"), "w") as f:
    json.dump([r["caption"] for r in rows], f)
  return folder


def tmp_path_of(root):
  return pathlib.Path(root).parent


@pytest.mark.slow  # ≈ 3 min: the demo's stages, then the long-video ones
def test_long_video_stages_at_runlocal_size(tmp_path):
  long_stages(str(tmp_path / "run"))


def long_stages(root):
  """`--long` at runlocal size (the demo's own stages first): the prediction and interpolation
  stages, their report, sampling long clips from the workdir, and an exact resume of the
  prediction stage."""
  summaries = demo.run(root, runlocal=True, num_samples=1, batch_size=72, long=True, long_frames=14)
  assert summaries["long"]["overall"]["n"] == 72 and summaries["interpolation"]["n"] == 72
  report = open(os.path.join(root, "report.md")).read()
  assert "## Long videos" in report and "## Interpolation (T → 4T)" in report
  for stage in shapes_config.STAGES:
    assert f"| {stage} | 3 × 2 |" in report
  for name in ("strip.png", "interpolation.png", "summary.json"):
    assert os.path.getsize(os.path.join(root, "long", name)) > 0
  # The newest text-to-video stage still samples by default; the long pipeline has them all.
  assert isinstance(stages.pipeline_from_workdir(root), CascadePipeline)
  pipe = stages.long_video_from_workdir(root)
  assert pipe.first_chunk == "prediction" and pipe.context_frames == 2
  assert pipe.prediction.unet.in_channels == 11 and pipe.interpolation.unet.num_frames == 9
  frames = pipe(["a red circle moving left"], num_frames=14, interpolate=4, rng=0)
  assert frames.shape == (1, 53, 16, 16, 3)  # 8 + 6 key frames ×4, upsampled to 16 px
  # A workdir without the long-video stages (the video stage's own) says which one is missing.
  video_only = stages.long_video_from_workdir(os.path.join(root, "video"))
  with pytest.raises(ValueError, match="need a prediction stage"):
    video_only.check(9, 1)
  with pytest.raises(ValueError, match="needs an interpolation stage"):
    video_only.check(8, 4)
  out = str(tmp_path_of(root) / "long_clips")
  result = recipe_runs.run(
      "sample",
      "--workdir",
      os.path.join(root, "video"),
      "--prompt",
      "a red circle moving left",
      "--num_frames",
      "20",
      "--out",
      out,
      inputs={"cache": str(tmp_path_of(root) / "cache")},
      check=False,
  )
  assert result.returncode and "need a prediction stage" in result.stderr, result.stderr[-2000:]
  # A crash after step 2's checkpoint: step 3 again from it gives the same parameters.
  workdir = os.path.join(root, "prediction_resume")
  config = config_lib.load_config(
      f"{SHAPES}:stage=prediction,root={root},runlocal=True",
      {"checkpoint_every": 1, "keep_checkpoints": 5},
  )
  trainer.train_and_evaluate(config, workdir)
  final = common.load_stage_params(workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  trainer.train_and_evaluate(config, workdir)
  resumed = common.load_stage_params(workdir)
  flat = traverse_util.flatten_dict
  assert flat(final).keys() == flat(resumed).keys()
  for key, value in flat(resumed).items():
    np.testing.assert_allclose(value, flat(final)[key], rtol=0, atol=1e-6, err_msg=str(key))
