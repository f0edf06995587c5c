"""A tiny random Stable Video Diffusion folder written by diffusers / transformers, for the
image-to-video parity and export tests.

`save_tiny_svd(folder)` writes a diffusers StableVideoDiffusionPipeline folder (unet/ vae/
image_encoder/ feature_extractor/ scheduler/) with perturbed random weights and SVD's scheduler
(`SVD_SCHEDULER`, as stabilityai/stable-video-diffusion-img2vid's).
"""

import diffusers
import torch
import transformers

from parity import perturb_

SVD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)


def save_tiny_svd(folder: str) -> None:
  """A tiny perturbed StableVideoDiffusionPipeline, saved as a diffusers folder."""
  torch.manual_seed(0)
  unet = diffusers.UNetSpatioTemporalConditionModel(
      block_out_channels=(32, 64),
      layers_per_block=1,
      sample_size=16,
      in_channels=8,
      out_channels=4,
      down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
      up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
      cross_attention_dim=32,
      num_attention_heads=(2, 4),
      projection_class_embeddings_input_dim=96,
      addition_time_embed_dim=32,
      num_frames=3,
  )
  vae = diffusers.AutoencoderKLTemporalDecoder(
      block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4
  )
  # image_size 224: diffusers resizes PIL input for CLIP to 224 whatever the encoder's config.
  encoder = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(
          hidden_size=32,
          projection_dim=32,
          num_hidden_layers=2,
          num_attention_heads=4,
          image_size=224,
          intermediate_size=37,
          patch_size=32,
      )
  )
  for seed, model in enumerate((unet, vae, encoder)):
    perturb_(model, seed)
  diffusers.StableVideoDiffusionPipeline(
      vae=vae,
      image_encoder=encoder,
      unet=unet,
      scheduler=diffusers.EulerDiscreteScheduler(**SVD_SCHEDULER),
      feature_extractor=transformers.CLIPImageProcessor(crop_size=224, size=224),
  ).save_pretrained(folder)
