"""The shapes recipe's autoencoder stages: a KL autoencoder with a patch-GAN, then its temporal
decoder fine-tuned on clips.

Stage 'autoencoder' (`AutoencoderTask`): `AutoencoderKL` trained on frames with the LDM
(taming-transformers) recipe: reconstruction (L1 + L2; no LPIPS here) + β·KL + an adversarial hinge loss from a
PatchGAN discriminator that starts after `disc_start` steps, weighted adaptively by the ratio of
the reconstruction and adversarial gradient norms at the decoder's last layer. Generator and
discriminator live in one parameter tree, {'vae', 'discriminator'}, and one optimizer step updates
both: the loss is L_G(vae, sg(disc)) + L_D(sg(x̂), disc), so each part gets the gradient of its own
objective only (sg = stop_gradient).

Stage 'autoencoder_video' (`TemporalDecoderTask`): Video LDM's decoder fine-tuning against flicker.
`AutoencoderKLTemporalDecoder` takes the KL encoder frozen (`from_kl` transform) and the KL
decoder's layers as the spatial layers of its temporal decoder; the decoder then learns on 8-frame
clips to reconstruct jointly: the same reconstruction loss on the frames, plus L1 on their
temporal differences.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from vldm.models import autoencoder as autoencoder_lib
from vldm.models import inflate
from vldm.models import layers
from vldm.recipes import common
from vldm.train import tasks as tasks_lib


class PatchDiscriminator(nn.Module):
  """taming-transformers' NLayerDiscriminator (the pix2pix PatchGAN), GroupNorm for BatchNorm.

  images [B, H, W, 3] in [-1, 1] → logits [B, h, w, 1], one per overlapping patch:
  4×4 stride-2 convs (`num_layers` of them, channels doubling from `features`), one 4×4 stride-1
  conv, then a 4×4 stride-1 conv to one logit.
  """
  features: int = 32
  num_layers: int = 2
  norm_num_groups: int = 8
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.conv(self.features, 4, stride=2, padding=1, name="conv_in", **kw)(x)
    h = nn.leaky_relu(h, 0.2)
    for i in range(1, self.num_layers + 1):
      stride = 2 if i < self.num_layers else 1
      h = layers.conv(self.features * 2**i, 4, stride=stride, padding=1, use_bias=False,
                      name=f"convs_{i}", **kw)(h)
      h = layers.GroupNorm(self.norm_num_groups, 1e-5, name=f"norms_{i}", **kw)(h)
      h = nn.leaky_relu(h, 0.2)
    return layers.conv(1, 4, padding=1, name="conv_out", **kw)(h).astype(jnp.float32)


def reconstruction_loss(x, y, l2_weight: float):
  """L1 + l2_weight · L2, per pixel value. L1 alone learns the shapes' positions but averages
  their colors on these mostly black frames; the squared term makes color errors costly."""
  return jnp.mean(jnp.abs(x - y)) + l2_weight * jnp.mean(jnp.square(x - y))


def hinge_d_loss(logits_real, logits_fake):
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def _decoder_last_layer(vae: autoencoder_lib.AutoencoderKL) -> nn.Conv:
  return layers.conv(vae.out_channels, 3, name="conv_out", dtype=vae.dtype,
                     param_dtype=vae.param_dtype)


def adaptive_weight(rec_grad_out, adv_grad_out, features, kernel, bias, last_layer,
                    max_weight: float = 1e4):
  """taming's λ = ‖∇_W L_rec‖ / (‖∇_W L_adv‖ + 1e-4) at the decoder's last conv W, from the two
  losses' gradients with respect to the decoded images and the conv's input `features`."""
  _, vjp = jax.vjp(lambda w: last_layer.apply({"params": {"kernel": w, "bias": bias}}, features),
                   kernel)
  rec_norm = jnp.linalg.norm(vjp(rec_grad_out)[0])
  adv_norm = jnp.linalg.norm(vjp(adv_grad_out)[0])
  return jax.lax.stop_gradient(jnp.clip(rec_norm / (adv_norm + 1e-4), 0.0, max_weight))


class AutoencoderTask(tasks_lib.Task):
  """AutoencoderKL + PatchGAN on shapes frames (see the module docstring).

  config.autoencoder: vae (AutoencoderKL fields), discriminator (PatchDiscriminator fields),
  l2_weight, kl_weight (on the KL summed over latents, per pixel value), disc_weight, disc_start
  (step).
  """

  def __init__(self, config):
    super().__init__(config)
    c = config.autoencoder
    self.vae = autoencoder_lib.AutoencoderKL(**c.vae.to_dict())
    if self.vae.use_post_quant_conv:
      raise ValueError("autoencoder.vae.use_post_quant_conv must be False: the temporal decoder "
                       "stage has no post_quant_conv to take it over.")
    self.discriminator = PatchDiscriminator(**c.discriminator.to_dict())
    self.size = config.data.resolution

  def init_params(self, rng):
    image = jnp.zeros((1, self.size, self.size, 3))

    def init(key):
      vae_key, disc_key = jax.random.split(key)
      return {"vae": self.vae.init(vae_key, image)["params"],
              "discriminator": self.discriminator.init(disc_key, image)["params"]}

    return common.task_init(self, init, rng)

  def make_data(self, sharding, process_index, process_count):
    return common.make_data(self.config.data, sharding, process_index, process_count)

  def reconstruct(self, vae_params, images, rng):
    """(x̂, posterior, the last conv's input) for images [B, H, W, 3]."""
    posterior = self.vae.apply({"params": vae_params}, images, method="encode")
    latents = posterior.sample(rng)
    is_norm_out = lambda m, _: m.name == "conv_norm_out" and "decoder" in m.scope.path
    decoded, state = self.vae.apply({"params": vae_params}, latents, method="decode",
                                    capture_intermediates=is_norm_out)
    norm_out = jax.tree.leaves(state["intermediates"])[0]
    return decoded.astype(jnp.float32), posterior, nn.silu(norm_out)

  def loss_fn(self, params, frozen, batch, rng):
    c = self.config.autoencoder
    x = batch["image"]
    vae_params, disc_params = params["vae"], params["discriminator"]
    x_rec, posterior, features = self.reconstruct(vae_params, x, rng)
    rec_loss_of = lambda y: reconstruction_loss(x, y, c.l2_weight)
    rec_loss = rec_loss_of(x_rec)
    kl = jnp.mean(posterior.kl()) / x[0].size

    disc = lambda p, images: self.discriminator.apply({"params": p}, images)
    frozen_disc = jax.lax.stop_gradient(disc_params)
    g_loss_of = lambda y: -jnp.mean(disc(frozen_disc, y))
    g_loss = g_loss_of(x_rec)
    last = vae_params["decoder"]["conv_out"]
    weight = adaptive_weight(jax.grad(rec_loss_of)(x_rec), jax.grad(g_loss_of)(x_rec),
                             jax.lax.stop_gradient(features), last["kernel"], last["bias"],
                             _decoder_last_layer(self.vae)) * c.disc_weight
    started = (batch["step"][0] >= c.disc_start).astype(jnp.float32)

    logits_real = disc(disc_params, x)
    logits_fake = disc(disc_params, jax.lax.stop_gradient(x_rec))
    d_loss = hinge_d_loss(logits_real, logits_fake)
    loss = rec_loss + c.kl_weight * kl + started * (weight * g_loss + d_loss)
    return loss, dict(rec_loss=rec_loss, kl=kl, g_loss=g_loss, d_loss=d_loss, d_weight=weight,
                      disc_started=started, logits_real=jnp.mean(logits_real),
                      logits_fake=jnp.mean(logits_fake),
                      latent_std=jnp.std(posterior.mean))

  def sample_fn(self, params, frozen, rng):
    """Reconstructions of a few rendered frames: {'reconstruction': [originals | decoded]}."""
    from vldm.data import shapes  # pylint: disable=g-import-not-at-top
    images = jnp.stack([jnp.asarray(shapes.make_example("image", "validation", i,
                                                        size=self.size)["image"])
                        for i in range(8)]) / 127.5 - 1.0
    decoded = self.vae.apply({"params": params["vae"]}, images)
    grid = jnp.concatenate([images, decoded], axis=1)  # originals above reconstructions
    return {"reconstruction": jnp.clip(jnp.concatenate(list(grid), axis=1) / 2 + 0.5, 0, 1)}


def temporal_decoder(config) -> autoencoder_lib.AutoencoderKLTemporalDecoder:
  """The temporal-decoder VAE matching the KL autoencoder of `config.autoencoder.vae`."""
  vae = config.autoencoder.vae
  return autoencoder_lib.AutoencoderKLTemporalDecoder(
      block_out_channels=tuple(vae.block_out_channels), layers_per_block=vae.layers_per_block,
      latent_channels=vae.latent_channels, sample_size=vae.sample_size,
      scaling_factor=vae.scaling_factor)


def from_kl(source, target):
  """Temporal-decoder VAE parameters from a KL autoencoder stage's {'vae', 'discriminator'}.

  Encoder and quant_conv are copied; decoder layers go to their place in the temporal decoder
  (res blocks become `…/resnets_j/spatial_res_block`). The temporal layers start as the identity
  (each temporal res block's last conv zero, the final (3,1,1) conv the identity over frames), so
  fine-tuning starts from the KL decoder frame by frame, less the KL mid block's second res block
  and attention, which diffusers' temporal decoder (one layer per block) never applies.
  """
  kl = source["vae"]
  flat_target = traverse_util.flatten_dict(target)
  flat = {}
  for path, value in flat_target.items():
    if "temporal_res_block" in path and path[-2] == "conv2":
      value = jnp.zeros_like(value)
    elif path[-2:] == ("time_conv_out", "kernel"):  # (3, 1, 1, C, C): the middle tap is I
      value = jnp.zeros_like(value).at[1, 0, 0].set(jnp.eye(value.shape[-1], dtype=value.dtype))
    elif path[-2:] == ("time_conv_out", "bias"):
      value = jnp.zeros_like(value)
    flat[path] = value
  for path, value in traverse_util.flatten_dict(kl).items():
    dest = path if path[0] != "decoder" else inflate.video_path(path)
    if dest in flat_target and flat_target[dest].shape == value.shape:
      flat[dest] = jnp.asarray(value, flat_target[dest].dtype)
    elif path[0] != "decoder":
      raise tasks_lib.CheckpointMismatchError(
          f"from_kl: the KL encoder parameter {'/'.join(path)} {value.shape} has no place in the "
          "temporal-decoder VAE (are the two configs the same?).")
  return traverse_util.unflatten_dict(flat)


class TemporalDecoderTask(tasks_lib.Task):
  """Fine-tunes the temporal decoder on clips, encoder frozen (see the module docstring).

  config.autoencoder: vae (the KL stage's fields), l2_weight, temporal_weight (L1 on frame
  differences).
  """

  def __init__(self, config):
    super().__init__(config)
    self.vae = temporal_decoder(config)
    self.size, self.frames = config.data.resolution, config.data.frames

  def init_params(self, rng):
    video = jnp.zeros((1, self.frames, self.size, self.size, 3))
    return common.task_init(self, lambda key: self.vae.init(key, video)["params"], rng)

  def trainable_labels(self, params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: tasks_lib.TRAIN if k[0] == "decoder" else tasks_lib.FREEZE for k in flat})

  def init_transforms(self):
    return {"from_kl": from_kl}

  def make_data(self, sharding, process_index, process_count):
    return common.make_data(self.config.data, sharding, process_index, process_count)

  def loss_fn(self, params, frozen, batch, rng):
    video = batch["video"]
    b, f = video.shape[:2]
    posterior = self.vae.apply({"params": params}, video.reshape((b * f,) + video.shape[2:]),
                               method="encode")
    latents = posterior.sample(rng).reshape((b, f) + posterior.mean.shape[1:])
    decoded = self.vae.apply({"params": params}, latents, method="decode").astype(jnp.float32)
    rec_loss = reconstruction_loss(video, decoded, self.config.autoencoder.l2_weight)
    flicker = jnp.mean(jnp.abs(jnp.diff(video, axis=1) - jnp.diff(decoded, axis=1)))
    loss = rec_loss + self.config.autoencoder.temporal_weight * flicker
    return loss, dict(rec_loss=rec_loss, flicker=flicker)


def vae_for_diffusion(config, scaling_factor: Optional[float] = None):
  """The VAE the diffusion stages use (the temporal-decoder one), with their scaling factor."""
  vae = temporal_decoder(config)
  return vae if scaling_factor is None else vae.clone(scaling_factor=float(scaling_factor))
