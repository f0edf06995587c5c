"""The analytic FLOP counter: published anchors, and agreement with real graphs (the traced jaxpr
exactly; XLA's compiled cost analysis for primitives exactly and for a whole UNet up to its
elementwise work)."""
import jax
import jax.numpy as jnp
import pytest

import vldm.convert  # noqa: F401  (registers the model formats)
from vldm.benchmark import flops
from vldm.convert import registry
from vldm.models import autoencoder, clip
from vldm.models.unet import UNet

SD15_CONFIG = dict(
    _class_name="UNet2DConditionModel", block_out_channels=[320, 640, 1280, 1280],
    attention_head_dim=8, cross_attention_dim=768, layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


def _close(value, anchor, tolerance=0.03):
  return abs(value / anchor - 1) <= tolerance


def _svd_unet(**options):
  return registry.format_for("UNetSpatioTemporalConditionModel").from_config(
      {"_class_name": "UNetSpatioTemporalConditionModel"}).clone(**options)


def test_sd15_unet_at_64x64():
  unet = registry.format_for("UNet2DConditionModel").from_config(SD15_CONFIG)
  count = flops.unet_flops(unet, 64, 64, context_length=77)
  print(f"SD 1.5 UNet 64×64: {count.total / 1e12:.4f} TFLOPs, {count.fractions()}")
  assert _close(count.total, 0.80e12)
  # The published split: conv 52 %, feed-forward 19 %, attention scores 15 %.
  assert abs(count.fractions()["conv"] - 0.52) < 0.02
  assert abs(count.fractions()["attention"] - 0.15) < 0.02
  assert abs(count.fractions("part")["spatial_feed_forward"] - 0.19) < 0.02


def test_svd_unet_at_14x72x128():
  count = flops.unet_flops(_svd_unet(), 72, 128, frames=14, context_length=1)
  print(f"SVD UNet 14×72×128: {count.total / 1e12:.3f} TFLOPs")
  assert _close(count.total, 44.8e12)
  guided = flops.unet_flops(_svd_unet(), 72, 128, batch=2, frames=14, context_length=1)
  assert _close(25 * guided.total, 2.24e15)  # 25 guided steps
  assert flops.training_flops(count).total == pytest.approx(3 * count.total)


def test_autoencoder_anchors():
  sd_vae = autoencoder.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
  decode = flops.autoencoder_flops(sd_vae, 512, 512)
  assert _close(decode.total, 2.52e12)
  assert decode.fractions()["conv"] > 0.97
  svd_vae = autoencoder.AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512),
                                                     layers_per_block=2)
  assert _close(flops.autoencoder_flops(svd_vae, 576, 1024, frames=14).total, 97e12)


def test_bad_sizes_and_kinds_are_named():
  unet = UNet(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  with pytest.raises(ValueError, match="divisible by 2"):
    flops.unet_flops(unet, 15, 16)
  with pytest.raises(ValueError, match="part must be"):
    flops.autoencoder_flops(autoencoder.AutoencoderKL(), 32, 32, part="middle")
  with pytest.raises(ValueError, match="Unknown FLOP kind"):
    flops.Flops().add("softmax", "x", 1.0)


# ---- agreement with the traced program -----------------------------------------------------


def _shapes(module, *args, method=None):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, method=method))


def _image_unet():
  return UNet(block_out_channels=(32, 48, 64), norm_num_groups=16, cross_attention_dim=24,
              num_attention_heads=(2, 3, 4), layers_per_block=(1, 2, 1),
              transformer_layers_per_block=(1, 2, 1), only_cross_attention=(False, True, False),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def _video_unet(**options):
  return UNet(block_out_channels=(32, 64, 64), num_attention_heads=(2, 4, 4),
              cross_attention_dim=24, in_channels=6, out_channels=3, layers_per_block=1,
              transformer_layers_per_block=(1, 2, 1), addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=24, temporal=True, use_linear_projection=True,
              eps_convention="svd",
              down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2
              + ("DownBlockSpatioTemporal",),
              up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 2,
              **options)


def _unet_case(unet, batch, frames, height, width, length, per_frame=False):
  video = (frames,) if unet.temporal else ()
  context = (batch, frames, length) if per_frame else (batch, length)
  args = (jnp.zeros((batch,) + video + (height, width, unet.in_channels)), jnp.zeros((batch,)),
          jnp.zeros(context + (unet.context_dim,)))
  if unet.num_time_ids:
    args += (jnp.zeros((batch, unet.num_time_ids)),)
  analytic = lambda exclude: flops.unet_flops(
      unet, height, width, batch=batch, frames=frames, context_length=length,
      per_frame_context=per_frame, exclude_padding=exclude)
  return unet, args, None, analytic


def _vae_case(vae, batch, frames, size, part):
  temporal = isinstance(vae, autoencoder.AutoencoderKLTemporalDecoder)
  images = jnp.zeros((batch, frames, size, size, 3) if temporal else (batch, size, size, 3))
  method = {"encode": "encode", "both": None}[part]
  if temporal and part == "encode":
    images = images.reshape((-1, size, size, 3))
  return vae, (images,), method, lambda exclude: flops.autoencoder_flops(
      vae, size, size, batch=batch, frames=frames, part=part, exclude_padding=exclude)


CLIP_TEXT = clip.CLIPTextModelWithProjection(
    vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=12, projection_dim=16)
CLIP_VISION = clip.CLIPVisionModelWithProjection(
    hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    image_size=16, patch_size=4, projection_dim=8)
MODELS = {
    "image_unet": lambda: _unet_case(_image_unet(), 2, 1, 16, 8, 5),
    "video_unet": lambda: _unet_case(_video_unet(temporal_conv_implementation="conv3d"),
                                     2, 3, 16, 8, 2),
    "video_unet_per_frame_context": lambda: _unet_case(_video_unet(), 1, 2, 8, 8, 3,
                                                       per_frame=True),
    "video_unet_text_motion": lambda: _unet_case(_video_unet(text_motion_embedding=True),
                                                 2, 3, 8, 8, 2),
    "vae": lambda: _vae_case(autoencoder.AutoencoderKL(block_out_channels=(32, 64),
                                                       norm_num_groups=8, layers_per_block=2),
                             2, 1, 16, "both"),
    "vae_no_attention": lambda: _vae_case(autoencoder.AutoencoderKL(
        block_out_channels=(32, 64, 64), norm_num_groups=8, mid_block_add_attention=False,
        use_quant_conv=False), 1, 1, 16, "both"),
    "temporal_vae": lambda: _vae_case(autoencoder.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), layers_per_block=2, temporal_conv_implementation="conv3d"),
        1, 3, 16, "both"),
    "temporal_vae_one_layer_encode": lambda: _vae_case(autoencoder.AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 64), layers_per_block=1), 2, 2, 16, "encode"),
    "clip_text": lambda: (CLIP_TEXT, (jnp.zeros((2, 12), jnp.int32),), None,
                          lambda exclude: flops.clip_text_flops(CLIP_TEXT, batch=2)),
    "clip_vision": lambda: (CLIP_VISION, (jnp.zeros((2, 16, 16, 3)),), None,
                            lambda exclude: flops.clip_vision_flops(CLIP_VISION, batch=2)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_analytic_count_equals_the_traced_program(name):
  module, args, method, analytic = MODELS[name]()
  variables = _shapes(module, *args, method=method)
  apply = lambda v, *a: module.apply(v, *a, method=method)
  for exclude in (False, True):
    traced = flops.jaxpr_flops(apply, variables, *args, exclude_padding=exclude)
    counted = analytic(exclude)
    assert counted.total == pytest.approx(traced.total, rel=1e-12), (exclude, counted, traced)
    # Batched products of two activations are attention in both counts.
    assert counted.by_kind["attention"] == pytest.approx(traced.by_kind["attention"], rel=1e-12)


# ---- agreement with XLA's cost analysis ----------------------------------------------------


@pytest.mark.parametrize("stride,pad", [(1, 1), (2, 1), (2, 0)])
def test_conv_count_equals_cost_analysis(stride, pad):
  x, k = jnp.ones((2, 9, 7, 5)), jnp.ones((3, 3, 5, 6))
  conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  counter = flops._Counter(exclude_padding=True)  # XLA counts only taps inside the input
  counter.conv("c", 2, 9, 7, 5, 6, 3, stride, pad)
  assert flops.compiled_flops(conv, x, k) == counter.flops.total


def test_dense_and_attention_counts_equal_cost_analysis():
  counter = flops._Counter()
  counter.dense("d", 6, 10, 12)
  assert flops.compiled_flops(lambda a, w: a @ w, jnp.ones((6, 10)), jnp.ones((10, 12))) \
      == counter.flops.total
  q, k = jnp.ones((3, 11, 2, 4)), jnp.ones((3, 13, 2, 4))
  counter = flops._Counter()
  counter.attention("a", 3, 11, 13, 8)
  scores_and_values = lambda q, k, v: jnp.einsum(
      "bnst,btnh->bsnh", jnp.einsum("bsnh,btnh->bnst", q, k), v)
  assert flops.compiled_flops(scores_and_values, q, k, k) == counter.flops.total


def test_unet_count_against_cost_analysis():
  """XLA's count of a compiled UNet = conv/matmul/attention (the analytic count, padding taps
  excluded as XLA does) + elementwise work (norms, activations, softmax), a few percent here."""
  unet, args, _, analytic = MODELS["image_unet"]()
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), _shapes(unet, *args))
  compiled = jax.jit(unet.apply).lower(variables, *args).compile(
      {"xla_backend_optimization_level": 0})  # the count is made before code generation
  xla = flops.compiled_flops(None, compiled=compiled)
  counted = analytic(True).total
  print(f"analytic {counted:.4g} / XLA cost analysis {xla:.4g} = {counted / xla:.3f}")
  assert 0.85 < counted / xla < 1.0
