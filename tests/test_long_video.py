"""Video LDM's long-video models: masked-frame conditioning, prediction rollout, interpolation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vldm.diffusion import frame_conditioning as frames_lib
from vldm.diffusion import guidance
from vldm.diffusion import losses
from vldm.pipelines import LongVideoPipeline
from vldm.pipelines import PipelineError
from vldm.pipelines import TextToVideoPipeline
from vldm.pipelines import workdir as workdir_lib
from vldm.recipes import components as components_lib
from vldm.recipes import ldm
from vldm.train import config_lib

SHAPES = "configs/shapes.py"
config_lib.ensure_importable(SHAPES)


def load(stage):
  return config_lib.load_config(f"{SHAPES}:stage={stage},runlocal=True")


def _random_tree(shapes, seed):
  """Random parameters of the given shapes, drawn with numpy (norm scales ≈ 1, no init compile)."""
  rng = np.random.default_rng(seed)
  draw = lambda path, s: (
      float(path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape)
  ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def tasks():
  """The runlocal shapes video, prediction and interpolation tasks, with random weights: the
  conditioned models widened from the video model (their new input channels at zero, then
  perturbed so that the condition matters)."""
  out = {}
  video = ldm.LatentDiffusionTask(load("video"))
  shapes = jax.eval_shape(video.init_params, jax.random.key(0))
  video_params = _random_tree(shapes, 0)
  frozen = {
      "vae": _random_tree(components_lib.abstract_vae_params(video.vae), 1),
      "scale": np.float32(1.0),
  }
  out["video"] = (video, video_params)
  for i, stage in enumerate(("prediction", "interpolation")):
    task = ldm.LatentDiffusionTask(load(stage))
    target = jax.eval_shape(task.init_params, jax.random.key(0))
    widened = ldm.widen_input_transform(
        video_params, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
    )
    out[f"{stage}_step0"] = (task, widened)
    params = jax.tree.map(np.asarray, widened)
    kernel = params["unet"]["conv_in"]["kernel"].copy()
    kernel[..., 4:, :] = 0.1 * np.random.default_rng(2 + i).standard_normal(
        kernel[..., 4:, :].shape
    )
    params["unet"]["conv_in"]["kernel"] = kernel
    out[stage] = (task, params)
  out["frozen"] = frozen
  return out


def _pipeline(tasks, stage) -> TextToVideoPipeline:
  task, params = tasks[stage]
  return workdir_lib.pipeline_from_components(task.components(params, tasks["frozen"]))


# ---------------------------------------------------------------------------------- mechanism
def test_masks_and_condition_layout():
  np.testing.assert_array_equal(frames_lib.prediction_mask(8, 2), [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(frames_lib.prediction_mask(8, 0), np.zeros(8))
  np.testing.assert_array_equal(frames_lib.interpolation_mask(9), [1, 0, 0, 0, 1, 0, 0, 0, 1])
  assert frames_lib.conditioned_in_channels(4) == 11 and frames_lib.condition_channels(4) == 7
  given = jax.random.normal(jax.random.key(0), (2, 9, 3, 3, 4))
  mask = jnp.stack([frames_lib.interpolation_mask(9), jnp.zeros(9)])
  condition = frames_lib.build_condition(
      given, mask, jnp.asarray([0.05, 0.2]), jnp.asarray([0.0, 1.0])
  )
  assert condition.shape == (2, 9, 3, 3, 7)
  # [m · z̃ | m | level | regime], channels last
  np.testing.assert_array_equal(condition[0, 4, ..., :4], given[0, 4])
  np.testing.assert_array_equal(condition[0, 1, ..., :4], 0)
  np.testing.assert_array_equal(condition[1, ..., :4], 0)  # nothing given: no latents either
  np.testing.assert_array_equal(condition[..., 4], mask[:, :, None, None] * np.ones((1, 1, 3, 3)))
  np.testing.assert_allclose(condition[0, ..., 5], 0.05)
  np.testing.assert_allclose(condition[1, ..., 5], 0.2)
  np.testing.assert_array_equal(condition[0, ..., 6], 0)
  np.testing.assert_array_equal(condition[1, ..., 6], 1)
  # Training masks: the first S ∈ {0, 1, 2} frames, or the key frames (dropped with uncond_prob).
  masks = np.asarray(frames_lib.sample_masks(jax.random.key(1), "prediction", 512, 8))
  counts = masks.sum(axis=1)
  assert set(counts) == {0, 1, 2}
  for m, s in zip(masks, counts):
    np.testing.assert_array_equal(m, frames_lib.prediction_mask(8, int(s)))
  assert abs(np.mean(counts == 0) - 0.2) < 0.06
  # The unconditional branch learns from clips that start videos only.
  starts = np.arange(512) % 2 == 0
  masks = np.asarray(
      frames_lib.sample_masks(jax.random.key(3), "prediction", 512, 8, unconditional_allowed=starts)
  )
  counts = masks.sum(axis=1)
  assert np.all(counts[~starts] > 0) and abs(np.mean(counts[starts] == 0) - 0.2) < 0.08
  masks = np.asarray(
      frames_lib.sample_masks(jax.random.key(2), "interpolation", 512, 9, uncond_prob=0.25)
  )
  dropped = masks.sum(axis=1) == 0
  assert abs(dropped.mean() - 0.25) < 0.06
  np.testing.assert_array_equal(
      masks[~dropped], np.tile(frames_lib.interpolation_mask(9), ((~dropped).sum(), 1))
  )


def test_rollout_and_window_arithmetic():
  for f, n in ((8, 0), (8, 1), (8, 4), (14, 3)):
    assert frames_lib.rollout_length(f, 2, n) == f + n * (f - 2)
    assert frames_lib.chunks_for(frames_lib.rollout_length(f, 2, n), f, 2) == n
  assert frames_lib.chunks_for(33, 8, 2) == 5  # 8 + 4·6 = 32 < 33 ≤ 38
  assert frames_lib.interpolated_length(8, 4) == 29
  assert frames_lib.interpolation_windows(8, 3) == [0, 2, 4, 5]  # the last moved back
  assert frames_lib.interpolation_windows(7, 3) == [0, 2, 4]
  assert frames_lib.interpolation_windows(2, 3) == [0]


def test_bad_masks_and_modes():
  with pytest.raises(ValueError, match="k·stride \\+ 1 frames"):
    frames_lib.interpolation_mask(8, 4)
  with pytest.raises(ValueError, match="num_context must be in"):
    frames_lib.prediction_mask(8, 8)
  with pytest.raises(ValueError, match="accepted: \\('prediction', 'interpolation'\\)"):
    frames_lib.check_mode("extrapolation")
  config = load("interpolation")
  config.data.frames = 8
  with pytest.raises(ValueError, match="k·stride \\+ 1 frames"):
    ldm.LatentDiffusionTask(config)
  config = load("prediction")
  config.ldm.unet.model.in_channels = 8
  with pytest.raises(ValueError, match="prediction model .* = 11"):
    ldm.LatentDiffusionTask(config)


def test_conditioned_model_starts_as_its_base_exactly(tasks):
  video, video_params = tasks["video"]
  for stage in ("prediction", "interpolation"):
    task, params = tasks[f"{stage}_step0"]
    frames = task.frames
    x = jax.random.normal(jax.random.key(0), (2, frames, 4, 4, 4))
    condition = jax.random.normal(jax.random.key(1), (2, frames, 4, 4, 7))
    context = jax.random.normal(jax.random.key(2), (2, 8, video.text_encoder.hidden_size))
    t = jnp.asarray([10, 700])
    base = video.unet.apply({"params": video_params["unet"]}, x, t, context)
    conditioned = task.unet.apply(
        {"params": params["unet"]}, jnp.concatenate([x, condition], -1), t, context
    )
    np.testing.assert_array_equal(conditioned, base)


def test_loss_counts_the_generated_frames_only(tasks, monkeypatch):
  per_frame = jnp.arange(16, dtype=jnp.float32).reshape(2, 8)
  mask = jnp.asarray([frames_lib.prediction_mask(8, 2), frames_lib.prediction_mask(8, 0)])
  np.testing.assert_allclose(
      frames_lib.generated_frames_loss(per_frame, mask),
      [np.mean(np.arange(2, 8)), np.mean(np.arange(8, 16))],
  )
  # In the task: whatever the loss of the given frames, the step's loss is the same.
  task, params = tasks["prediction"]
  batch = {
      "latent_mean": jax.random.normal(jax.random.key(0), (2, 8, 4, 4, 4)),
      "latent_std": jnp.full((2, 8, 4, 4, 4), 0.1),
      "input_ids": task.tokenizer(["a red circle moving left"] * 2),
      "fps": jnp.full((2,), 20.0),
      "step": jnp.zeros((2,), jnp.int32),
  }
  monkeypatch.setattr(frames_lib, "sample_masks", lambda *a, **k: mask)
  real = losses.diffusion_loss

  def loss_with(given_value):
    def patched(*args, **kwargs):
      loss, aux = real(*args, **kwargs)
      assert loss.shape == (2, 8)  # per frame
      return jnp.where(mask > 0, given_value, loss), aux

    monkeypatch.setattr(losses, "diffusion_loss", patched)
    return task.loss_fn(params, tasks["frozen"], batch, jax.random.key(5))[0]

  np.testing.assert_array_equal(loss_with(0.0), loss_with(1e6))


def test_context_guidance_at_scale_one_is_the_conditional_branch():
  network = lambda x, t, cond: x * cond["a"][:, None] + cond["b"][:, None]
  cond = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([0.5, -1.0])}
  text_uncond = {"a": jnp.asarray([0.0, 1.0]), "b": jnp.asarray([0.0, 0.0])}
  context_uncond = {"a": jnp.asarray([3.0, 1.0]), "b": jnp.asarray([1.0, 2.0])}
  x, t = jnp.asarray([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros((2,))
  expected = network(x, t, cond)
  for scale in (1, jnp.float32(1.0)):
    out = guidance.context_guidance(network, cond, text_uncond, context_uncond, scale, scale)
    np.testing.assert_allclose(out(x, t), expected, rtol=1e-6)
  # Context scale 1: classifier-free guidance on the conditional model.
  cfg = guidance.classifier_free_guidance(network, cond, text_uncond, 3.0)(x, t)
  out = guidance.context_guidance(network, cond, text_uncond, context_uncond, 3.0, 1)(x, t)
  np.testing.assert_allclose(out, cfg, rtol=1e-6)
  # Text scale 1: Video LDM's f(z) + s (f(z; c_S) − f(z)).
  uncond_out = network(x, t, context_uncond)
  out = guidance.context_guidance(network, cond, text_uncond, context_uncond, 1, 2.0)(x, t)
  np.testing.assert_allclose(out, uncond_out + 2.0 * (expected - uncond_out), rtol=1e-6)


def test_context_guidance_in_the_pipeline(tasks):
  pipe = _pipeline(tasks, "prediction")
  assert pipe.frame_conditioning == "prediction" and pipe.unet.in_channels == 11
  given = np.asarray(jax.random.normal(jax.random.key(0), (1, 8, 4, 4, 4)))
  mask = frames_lib.prediction_mask(8, 2)
  kwargs = dict(
      given_latents=given, given_mask=mask, rng=3, num_steps=2, guidance_scale=1.0, output="latents"
  )
  plain = pipe(["a red circle moving left"], **kwargs)
  same = pipe(["a red circle moving left"], context_scale=1.0, **kwargs)
  guided = pipe(["a red circle moving left"], context_scale=3.0, **kwargs)
  np.testing.assert_array_equal(plain, same)
  assert np.abs(guided - plain).max() > 1e-3
  with pytest.raises(ValueError, match="pass given_latents"):
    pipe(["a red circle moving left"], rng=0)


# ------------------------------------------------------------------------------- long videos
def test_rollout_length_and_context(tasks, monkeypatch):
  prediction = _pipeline(tasks, "prediction")
  pipe = LongVideoPipeline(first=_pipeline(tasks, "video"), prediction=prediction)
  calls = []
  real = TextToVideoPipeline.__call__

  def spy(self, prompts, **kwargs):
    out = real(self, prompts, **kwargs)
    calls.append(
        (
            self.frame_conditioning,
            kwargs.get("given_latents"),
            kwargs.get("given_mask"),
            np.asarray(out),
        )
    )
    return out

  monkeypatch.setattr(TextToVideoPipeline, "__call__", spy)
  f = 8
  latents = pipe(
      ["a red circle moving left"], num_frames=f + 3 * (f - 2), rng=0, num_steps=2, output="latents"
  )
  assert latents.shape[:2] == (1, frames_lib.rollout_length(f, 2, 3))
  assert [c[0] for c in calls] == [None, "prediction", "prediction", "prediction"]
  # Each chunk is given the last two frames generated before it, in latent space.
  generated = calls[0][3]
  for _, given, mask, out in calls[1:]:
    np.testing.assert_array_equal(given[:, :2], generated[:, -2:])
    np.testing.assert_array_equal(mask, frames_lib.prediction_mask(f, 2))
    generated = np.concatenate([generated, out[:, 2:]], axis=1)
  np.testing.assert_array_equal(latents, generated)
  # A clip of N frames that is no whole number of chunks is cut to N.
  assert pipe.output_frames(13) == 13
  assert (
      pipe(["a red circle moving left"], num_frames=13, rng=0, num_steps=2, output="latents").shape[
          1
      ]
      == 13
  )


def test_interpolation_keeps_the_key_frames_bit_exact(tasks):
  pipe = LongVideoPipeline(
      first=_pipeline(tasks, "video"), interpolation=_pipeline(tasks, "interpolation")
  )
  keys = np.asarray(jax.random.normal(jax.random.key(0), (2, 6, 4, 4, 4)))
  out = pipe.interpolate(
      ["a red circle moving left", "a blue square moving up"],
      keys,
      jax.vmap(jax.random.key)(jnp.arange(2)),
      num_steps=2,
  )
  assert out.shape[:2] == (2, frames_lib.interpolated_length(6, 4))
  np.testing.assert_array_equal(out[:, ::4], keys)
  assert np.all(np.isfinite(out)) and np.abs(out[:, 1::4] - keys[:, :-1]).max() > 1e-3
  # ×16: two passes (regimes 0 and 1), the key frames still exact.
  frames = pipe(
      ["a red circle moving left"],
      num_frames=3,
      interpolate=16,
      rng=1,
      num_steps=2,
      output="latents",
  )
  assert frames.shape[1] == frames_lib.interpolated_length(3, 16) == 33
  clip = pipe(["a red circle moving left"], num_frames=3, interpolate=4, rng=1, num_steps=2)
  assert clip.shape == (1, 9, 8, 8, 3) and 0 <= clip.min() and clip.max() <= 1


def test_long_video_bad_input(tasks):
  video = _pipeline(tasks, "video")
  pipe = LongVideoPipeline(first=video)
  with pytest.raises(ValueError, match="longer clips need a prediction stage"):
    pipe(["a red circle moving left"], num_frames=9, rng=0)
  with pytest.raises(ValueError, match="needs an interpolation stage"):
    pipe(["a red circle moving left"], num_frames=8, interpolate=4, rng=0)
  with pytest.raises(ValueError, match="interpolate must be one of"):
    pipe.check(8, 3)
  with pytest.raises(PipelineError, match="frame_conditioning='prediction'"):
    LongVideoPipeline(first=video, prediction=video)
  with pytest.raises(PipelineError, match="needs a first chunk"):
    LongVideoPipeline(first=None)


def test_video_ldm_long_stages_configure_from_published_shapes():
  """configs/video_ldm.py's prediction and interpolation stages, on SD 1.5's architecture: the
  input conv widened by the condition, 17-frame interpolation clips at 4× the video fps."""
  config_lib.ensure_importable("configs/video_ldm.py")
  from configs import video_ldm  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  video = video_ldm.get_config("stage=video,preset=sd15")
  for stage, frames, train in (
      ("prediction", 16, "temporal_and_input"),
      ("interpolation", 17, "all"),
  ):
    config = video_ldm.get_config(f"stage={stage},preset=sd15")
    task = ldm.LatentDiffusionTask(config)
    assert task.unet.in_channels == 11 and task.frames == frames == task.unet.num_frames
    assert config.ldm.train == train and config.init_from.transform == "widen_input"
    assert task.frame_conditioning["mode"] == stage
    assert config.data.target_fps == video.data.target_fps * (4 if stage == "interpolation" else 1)
    assert task.step_flops(1) > 0
