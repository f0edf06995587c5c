"""Published architectures as vldm module fields: Stable Diffusion 1.5 / 2.1, Stable Video
Diffusion.

The fields are what `vldm.convert` maps each published config.json to, so a preset builds the
same module as the folder would, without the folder: compile-only checks (`python -m vldm.train
--compile_only`) and benchmarks need the real shapes, not the weights.

  UNET       vldm `UNet` fields (image UNets; SVD's is the spatio-temporal one)
  VAE        `AutoencoderKL` (SD) or `AutoencoderKLTemporalDecoder` (SVD) fields, `kind` included
  TEXT       `CLIPTextModel` fields (the tokenizer's ids in TOKENIZER)
  IMAGE      `CLIPVisionModelWithProjection` fields (SVD's image encoder, projection_dim included)
  SCHEDULE   the scheduler's β schedule and the prediction type
"""

from __future__ import annotations

# runwayml/stable-diffusion-v1-5 unet/config.json: its `attention_head_dim` 8 is the head count.
SD15_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    num_attention_heads=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    use_linear_projection=False,
    only_cross_attention=False,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1.0,
    upcast_attention=False,
    sample_size=64,
)
# stabilityai/stable-diffusion-2-1 unet/config.json: 64-wide heads (5, 10, 20, 20), linear
# projections, OpenCLIP-H's 1024-wide context.
SD21_UNET = dict(
    SD15_UNET,
    num_attention_heads=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
    sample_size=96,
)
# SD's KL autoencoder (vae/config.json of both SD 1.5 and 2.1).
SD_VAE = dict(
    kind="kl",
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=0.18215,
    sample_size=512,
)
# CLIP ViT-L/14's text tower (SD 1.5) and OpenCLIP ViT-H/14's (SD 2.1, penultimate layer: 23).
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
SD21_TEXT = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
# CLIP's BPE ids (tokenizer/): 77 positions; SD 1.5 pads with end-of-text, SD 2.1 with "!".
SD15_TOKENIZER = dict(vocab_size=49408, max_length=77, bos_id=49406, eos_id=49407, pad_id=49407)
SD21_TOKENIZER = dict(SD15_TOKENIZER, pad_id=0)
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)

# stabilityai/stable-video-diffusion-img2vid unet/config.json (UNetSpatioTemporalConditionModel,
# with `vldm.convert.unet`'s fixed SVD wiring).
SVD_UNET = dict(
    temporal=True,
    in_channels=8,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
    mid_block_type="UNetMidBlockSpatioTemporal",
    up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
    layers_per_block=2,
    transformer_layers_per_block=1,
    num_attention_heads=(5, 10, 20, 20),
    cross_attention_dim=1024,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768,
    use_linear_projection=True,
    norm_num_groups=32,
    eps_convention="svd",
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1.0,
    only_cross_attention=False,
    merge_strategy="learned_with_images",
    num_frames=14,
)
# SVD's vae/config.json (AutoencoderKLTemporalDecoder).
SVD_VAE = dict(
    kind="temporal_decoder",
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
# SVD's image_encoder/config.json (CLIP ViT-H/14, CLIPVisionModelWithProjection).
SVD_IMAGE = dict(
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1024,
    num_hidden_layers=32,
    num_attention_heads=16,
    patch_size=14,
    image_size=224,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
# SVD's scheduler: EDM σ (v-prediction with EDM preconditioning) over SD's β schedule.
SVD_SCHEDULE = SD_SCHEDULE

PRESETS = {
    "sd15": dict(
        unet=SD15_UNET,
        vae=SD_VAE,
        text_encoder=SD15_TEXT,
        tokenizer=SD15_TOKENIZER,
        schedule=SD_SCHEDULE,
        prediction_type="epsilon",
    ),
    "sd21": dict(
        unet=SD21_UNET,
        vae=SD_VAE,
        text_encoder=SD21_TEXT,
        tokenizer=SD21_TOKENIZER,
        schedule=SD_SCHEDULE,
        prediction_type="v_prediction",
    ),
    "svd": dict(
        unet=SVD_UNET,
        vae=SVD_VAE,
        image_encoder=SVD_IMAGE,
        schedule=SVD_SCHEDULE,
        prediction_type="v_edm",
    ),
}


def get(name: str) -> dict:
  """The preset's components (module fields by component name)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown architecture preset {name!r}; vldm has {sorted(PRESETS)}.")
  return PRESETS[name]
