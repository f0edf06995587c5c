"""Video LDM stage hand-off: image UNet → video UNet, labels, transplant, gradients."""
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import parity
from parity import jit_quick, relative_error
from vldm.convert import ConversionError, save_diffusers
from vldm.models import inflate as inflate_lib
from vldm.models import layers, transformer
from vldm.models.unet import UNet
from vldm.models.unet_blocks import REMAT_POLICIES

B, F, SIZE, L, D = 2, 3, 8, 5, 24

# SD1-style (conv projections, 8 groups): the inflated UNet is a Video LDM text-to-video UNet.
IMAGE_UNET = UNet(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=D,
                  num_attention_heads=2, layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))




def _perturb(params, seed, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda x: x + scale * rng.standard_normal(x.shape).astype(np.float32), params)


@pytest.fixture(scope="module")
def setup():
  image_params = parity.random_params(IMAGE_UNET, 0)
  video = inflate_lib.video_config_from_image(IMAGE_UNET)
  video_params = inflate_lib.inflate(image_params, video, jax.random.key(2))
  rng = np.random.default_rng(0)
  return dict(
      image_params=image_params, video=video, video_params=video_params,
      forward=jit_quick(lambda params, *args: video.apply({"params": params}, *args)),
      sample=rng.standard_normal((B, F, SIZE, SIZE, 4)).astype(np.float32),
      timesteps=np.array([3.0, 700.0], np.float32),
      context=rng.standard_normal((B, L, D)).astype(np.float32))


def test_video_config(setup):
  video = setup["video"]
  assert video.temporal and video.reference_class == "UNetSpatioTemporalConditionModel"
  assert video.down_block_types == ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
  assert video.addition_time_embed_dim is None  # Video LDM: no micro-conditioning by default
  assert video.use_linear_projection is False and video.norm_num_groups == 8
  with pytest.raises(ValueError, match="Unknown temporal options.*block_out_channels"):
    inflate_lib.video_config_from_image(IMAGE_UNET, block_out_channels=(64, 64))
  with pytest.raises(ValueError, match="takes an image UNet"):
    inflate_lib.video_config_from_image(video)


def test_labels_mark_exactly_the_new_params(setup):
  video_params, image_params = setup["video_params"], setup["image_params"]
  labels = traverse_util.flatten_dict(inflate_lib.label_params(video_params))
  assert set(labels) == set(traverse_util.flatten_dict(video_params))
  from_image = {inflate_lib.video_path(p) for p in traverse_util.flatten_dict(image_params)}
  assert {p for p, label in labels.items() if label == "spatial"} == from_image
  temporal = {p for p, label in labels.items() if label == "temporal"}
  assert temporal and temporal == set(labels) - from_image
  names = {name for path in temporal for name in path}
  assert {"temporal_res_block", "time_mixer", "time_pos_embed",
          "temporal_transformer_blocks_0"} <= names
  # The spatial weights are the image UNet's, bit for bit; the temporal ones are initialised.
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         inflate_lib.spatial_params(video_params), image_params)
  assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(video_params))


def test_inflated_unet_equals_image_unet_per_frame(setup):
  video_params, run = setup["video_params"], setup["forward"]
  sample, timesteps, context = setup["sample"], setup["timesteps"], setup["context"]
  per_frame = jit_quick(lambda p, *a: IMAGE_UNET.apply({"params": p}, *a))(
      setup["image_params"], sample.reshape((B * F,) + sample.shape[2:]),
      np.repeat(timesteps, F), np.repeat(context, F, axis=0))
  per_frame = np.asarray(per_frame).reshape(sample.shape)
  images = run(video_params, sample, timesteps, context, None, jnp.ones((B, F)))
  err = relative_error(images, per_frame)
  print(f"inflated video UNet (image-only indicator) vs image UNet per frame: {err:.2e}")
  assert err <= 1e-5
  # With the indicator off, the (freshly initialised) temporal layers change the output ...
  clips = run(video_params, sample, timesteps, context, None, jnp.zeros((B, F)))
  assert relative_error(clips, per_frame) > 1e-2
  # ... of the flagged-off clip only, when the indicator is mixed.
  mixed = run(video_params, sample, timesteps, context, None, jnp.array([[1.0] * F, [0.0] * F]))
  np.testing.assert_allclose(mixed[0], images[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mixed[1], clips[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fixed_alpha_of_one_is_the_image_unet(setup):
  video = inflate_lib.video_config_from_image(IMAGE_UNET, merge_strategy="fixed", merge_factor=1.0)
  video_params = inflate_lib.inflate(setup["image_params"], video, jax.random.key(3))
  video_params = inflate_lib.transplant_temporal(  # temporal weights moved, but α = 1
      _perturb(video_params, 3), setup["image_params"])
  video_params = traverse_util.unflatten_dict({
      p: jnp.ones_like(v) if p[-1] == "mix_factor" else v
      for p, v in traverse_util.flatten_dict(video_params).items()})
  sample, timesteps, context = setup["sample"], setup["timesteps"], setup["context"]
  images = setup["forward"](setup["video_params"], sample, timesteps, context, None,
                            jnp.ones((B, F)))
  fixed = jit_quick(lambda p, *a: video.apply({"params": p}, *a))(video_params, sample, timesteps,
                                                             context)
  assert relative_error(fixed, images) <= 1e-5


def test_transplant_temporal(setup):
  video_params = setup["video_params"]
  personalised = _perturb(setup["image_params"], 7)
  moved = inflate_lib.transplant_temporal(video_params, personalised)
  jax.tree_util.tree_map(np.testing.assert_array_equal, inflate_lib.spatial_params(moved),
                         personalised)
  _, temporal_before = inflate_lib.split_params(video_params)
  _, temporal_after = inflate_lib.split_params(moved)
  jax.tree_util.tree_map(np.testing.assert_array_equal, temporal_after, temporal_before)
  other = IMAGE_UNET.clone(block_out_channels=(32, 32))
  with pytest.raises(ValueError, match="shape mismatches"):
    inflate_lib.transplant_temporal(video_params, parity.random_params(other, 0))
  with pytest.raises(ValueError, match="missing in the image params"):
    inflate_lib.transplant_temporal(video_params, {"conv_in": personalised["conv_in"]})


def test_sd1_video_unet_is_not_an_svd_checkpoint(setup, tmp_path):
  # (It saves as vldm's own VldmUNet; as SVD's class it cannot.)
  with pytest.raises(ConversionError, match="use_linear_projection=False"):
    save_diffusers(setup["video"], setup["video_params"], str(tmp_path),
                   class_name="UNetSpatioTemporalConditionModel")


@pytest.mark.slow  # ≈ 1 min on 2 cores: keeps the default suite under 15 min
def test_gradients_full_and_temporal_only(setup):
  video, video_params = setup["video"], setup["video_params"]
  sample, timesteps, context = setup["sample"], setup["timesteps"], setup["context"]
  target = np.random.default_rng(1).standard_normal(sample.shape).astype(np.float32)
  # A per-frame text context (B, F, L, D) and no indicator (default: all frames are video).
  per_frame_context = np.repeat(context[:, None], F, axis=1)

  def loss_fn(module, params):
    out = module.apply({"params": params}, sample, timesteps, per_frame_context)
    return jnp.mean((out - target) ** 2)

  full_step = jit_quick(jax.value_and_grad(lambda p: loss_fn(video, p)))
  start = time.perf_counter()
  compiled = full_step.lower(video_params).compile()
  compile_s = time.perf_counter() - start
  loss, grads = jax.block_until_ready(compiled(video_params))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(compiled(video_params))
  step_s = (time.perf_counter() - start) / 3
  print(f"tiny video UNet fwd+bwd, jit, CPU (B={B}, F={F}, {SIZE}x{SIZE}): compile {compile_s:.1f} s,"
        f" step {1e3 * step_s:.0f} ms")
  # The per-frame context equal over frames gives the shared-context output.
  shared = setup["forward"](video_params, sample, timesteps, context, None, jnp.zeros((B, F)))
  np.testing.assert_allclose(loss, np.mean((np.asarray(shared) - target) ** 2), rtol=1e-5)
  flat = traverse_util.flatten_dict(grads)
  assert all(np.isfinite(g).all() for g in flat.values())
  for temporal in (True, False):  # both the spatial and the temporal layers learn
    assert any(np.abs(g).max() > 0 for p, g in flat.items() if inflate_lib.is_temporal(p) == temporal)

  # Temporal only, under remat: no gradient is computed for the frozen spatial layers.
  remat = video.clone(remat_policy="save_conv_and_attention")
  spatial, temporal = inflate_lib.split_params(video_params)
  temporal_grads = jit_quick(jax.grad(
      lambda t: loss_fn(remat, inflate_lib.merge_params(spatial, t))))(temporal)
  _, expected = inflate_lib.split_params(grads)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         temporal_grads, expected)

  # Freezing through the labels: an optax step leaves every spatial weight as it was.
  optimizer = optax.multi_transform({"spatial": optax.set_to_zero(), "temporal": optax.adam(1e-2)},
                                    inflate_lib.label_params(video_params))
  updates, _ = optimizer.update(grads, optimizer.init(video_params), video_params)
  stepped = traverse_util.flatten_dict(optax.apply_updates(video_params, updates))
  for path, before in traverse_util.flatten_dict(video_params).items():
    assert np.array_equal(stepped[path], before) != inflate_lib.is_temporal(path), path


def test_every_remat_policy_differentiates(setup):
  sample, timesteps, context = setup["sample"][:, 0], setup["timesteps"], setup["context"]
  for policy in REMAT_POLICIES:
    module = IMAGE_UNET.clone(remat_policy=policy)
    loss = lambda p, m=module: jnp.mean(m.apply({"params": p}, sample, timesteps, context) ** 2)
    grads = jax.eval_shape(jax.grad(loss), setup["image_params"])  # traces the remat policies
    assert jax.tree_util.tree_structure(grads) == \
        jax.tree_util.tree_structure(setup["image_params"])


def test_text_motion_embedding_is_temporal_and_trilinear(setup, tmp_path):
  video = inflate_lib.video_config_from_image(IMAGE_UNET, text_motion_embedding=True)
  params = inflate_lib.inflate(setup["image_params"], video, jax.random.key(4))
  labels = traverse_util.flatten_dict(inflate_lib.label_params(params))
  motion = [p for p in labels if "text_motion_embed" in p]
  assert motion and all(labels[p] == "temporal" for p in motion)
  # Image-only frames skip the temporal path, embedding included: still the image UNet.
  sample, timesteps, context = setup["sample"], setup["timesteps"], setup["context"]
  forward = jit_quick(lambda p, *a: video.apply({"params": p}, *a))
  np.testing.assert_allclose(
      forward(params, sample, timesteps, context, None, jnp.ones((B, F))),
      setup["forward"](setup["video_params"], sample, timesteps, context, None, jnp.ones((B, F))),
      rtol=1e-5, atol=1e-5)
  with pytest.raises(ConversionError, match="text_motion_embedding"):
    save_diffusers(video.clone(use_linear_projection=True), params, str(tmp_path),
                   class_name="UNetSpatioTemporalConditionModel")
  with pytest.raises(ValueError, match="text_motion_embedding is an option of the video UNet"):
    IMAGE_UNET.clone(text_motion_embedding=True).check_config()


def test_text_motion_embedding_definition():
  """Σ W[i,j,d,c]·frame[f,i]·space[s,j]·text[b,d] + Σ V[i,d,c]·frame[f,i]·text[b,d], any size."""
  module = transformer.TextMotionEmbedding(6)
  text = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
  params = module.init(jax.random.key(0), text, 3, 4, 2)["params"]
  assert all(not np.asarray(v).any() for v in jax.tree_util.tree_leaves(params))  # zero at init
  params = _perturb(params, 5, scale=1.0)
  out = np.asarray(module.apply({"params": params}, text, 3, 4, 2))
  assert out.shape == (2, 3, 4 * 2, 6)
  frame = np.asarray(layers.timestep_embedding(jnp.arange(3), 8))
  rows, cols = np.meshgrid((np.arange(4) + 0.5) / 4, (np.arange(2) + 0.5) / 2, indexing="ij")
  angles = [np.pi * cols, np.pi * rows, 2 * np.pi * cols, 2 * np.pi * rows]
  space = np.stack([np.sin(a) for a in angles] + [np.cos(a) for a in angles], -1).reshape(8, 8)
  want = np.zeros_like(out)
  w, v = np.asarray(params["frame_space_text"]), np.asarray(params["frame_text"])
  for b, f, s in np.ndindex(2, 3, 8):
    want[b, f, s] = (np.einsum("i,j,d,ijdc->c", frame[f], space[s], text[b], w)
                     + np.einsum("i,d,idc->c", frame[f], text[b], v))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert np.abs(out[:, 0] - out[:, 1]).max() > 0.1 and np.abs(out[0] - out[1]).max() > 0.1
  # The same weights serve a 2× larger canvas (the hires stage).
  assert module.apply({"params": params}, text, 3, 8, 4).shape == (2, 3, 32, 6)
