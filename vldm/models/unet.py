"""The denoising UNet: image (Stable Diffusion) and video (Video LDM / SVD / AnimateDiff /
ModelScope).

One module, `UNet`. With `temporal=False` it is diffusers' UNet2DConditionModel. With
`temporal=True` it is a video UNet whose temporal layers `temporal_kind` picks:
- 'alignment' (Video LDM, SVD): every res block and transformer gets temporal alignment layers
  ((3,1,1) convolutions and attention over frames, each blended with the spatial path by a learned
  α), weights named like diffusers' UNetSpatioTemporalConditionModel
  (`resnets.j.spatial_res_block.*`, `attentions.j.temporal_transformer_blocks.*`, ...);
- 'motion_module' (AnimateDiff): the image UNet's layers unchanged, with a motion module
  (`temporal_layers.MotionModule`) after each res block (+ transformer), added to it, named like
  diffusers' UNetMotionModel (`down_blocks.i.motion_modules.j.*`);
- 'modelscope' (ModelScope / ZeroScope text-to-video): the image UNet's layers (linear
  projections) with, added to them, temporal convolutions after each res block
  (`temporal_layers.TemporalConvLayer`, `…temp_convs.j.*`), a temporal transformer after each
  transformer (`…temp_attentions.j.*`) and one after conv_in (`transformer_in`), named like
  diffusers' UNet3DConditionModel.
The spatial layers are the same modules in all, so an image UNet's weights drop into a video UNet
(see `vldm.models.inflate`).

Calls (NHWC):
  image: `(sample[B,H,W,C], timesteps[B], encoder_hidden_states[B,L,D]) -> [B,H,W,Cout]`
  video: `(sample[B,F,H,W,C], timesteps[B], encoder_hidden_states[B,L,D] or [B,F,L,D],
           added_time_ids[B,N] (when addition_time_embed_dim is set), image_only_indicator[B,F]
           (default zeros)) -> [B,F,H,W,Cout]`
Timesteps are what diffusers receives (a scalar broadcasts to [B]).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import re

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from vldm.models import layers
from vldm.models import temporal_layers
from vldm.models import unet_blocks

Dtype = layers.Dtype
IntOrTuple = Union[int, Sequence[int]]

# Block types by kind; either family's names are accepted, `temporal` decides the layers.
DOWN_BLOCK_TYPES = {
    "CrossAttnDownBlock2D": True, "DownBlock2D": False,  # True: with cross-attention
    "CrossAttnDownBlockSpatioTemporal": True, "DownBlockSpatioTemporal": False,
    "CrossAttnDownBlockMotion": True, "DownBlockMotion": False,
    "CrossAttnDownBlock3D": True, "DownBlock3D": False,
}
UP_BLOCK_TYPES = {
    "CrossAttnUpBlock2D": True, "UpBlock2D": False,
    "CrossAttnUpBlockSpatioTemporal": True, "UpBlockSpatioTemporal": False,
    "CrossAttnUpBlockMotion": True, "UpBlockMotion": False,
    "CrossAttnUpBlock3D": True, "UpBlock3D": False,
}
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlockSpatioTemporal",
                   "UNetMidBlockCrossAttnMotion", "UNetMidBlock3DCrossAttn")
# UNet2DConditionModel block names → UNetSpatioTemporalConditionModel's.
SPATIO_TEMPORAL_BLOCK_NAMES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlockSpatioTemporal",
    "DownBlock2D": "DownBlockSpatioTemporal",
    "UNetMidBlock2DCrossAttn": "UNetMidBlockSpatioTemporal",
    "UpBlock2D": "UpBlockSpatioTemporal",
    "CrossAttnUpBlock2D": "CrossAttnUpBlockSpatioTemporal",
}
# UNet2DConditionModel block names → UNetMotionModel's.
MOTION_BLOCK_NAMES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlockMotion",
    "DownBlock2D": "DownBlockMotion",
    "UNetMidBlock2DCrossAttn": "UNetMidBlockCrossAttnMotion",
    "UpBlock2D": "UpBlockMotion",
    "CrossAttnUpBlock2D": "CrossAttnUpBlockMotion",
}
# UNet2DConditionModel block names → UNet3DConditionModel's (ModelScope).
MODELSCOPE_BLOCK_NAMES = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
    "DownBlock2D": "DownBlock3D",
    "UNetMidBlock2DCrossAttn": "UNetMidBlock3DCrossAttn",
    "UpBlock2D": "UpBlock3D",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock3D",
}
_IMAGE_BLOCK_NAMES = {v: k for names in (SPATIO_TEMPORAL_BLOCK_NAMES, MOTION_BLOCK_NAMES,
                                         MODELSCOPE_BLOCK_NAMES)
                      for k, v in names.items()}
EPS_CONVENTIONS = ("uniform", "svd")
# What a video UNet's temporal layers are: Video LDM's alignment layers (SVD's layout) or
# AnimateDiff's motion modules, or ModelScope's temporal convolutions and transformers.
TEMPORAL_KINDS = ("alignment", "motion_module", "modelscope")
# ModelScope's `transformer_in` has 8 heads (diffusers hard-codes them) of the UNet's head width.
MODELSCOPE_TRANSFORMER_IN_HEADS = 8


def block_names(temporal: bool, temporal_kind: str = "alignment") -> dict:
  """UNet2DConditionModel block names → the names of the UNet family these options build."""
  if not temporal:
    return {}
  return {"motion_module": MOTION_BLOCK_NAMES,
          "modelscope": MODELSCOPE_BLOCK_NAMES}.get(temporal_kind, SPATIO_TEMPORAL_BLOCK_NAMES)


def block_type_for(name: str, temporal: bool, temporal_kind: str = "alignment") -> str:
  """`name` (a block type of any family) in the family these options build."""
  image_name = _IMAGE_BLOCK_NAMES.get(name, name)
  return block_names(temporal, temporal_kind).get(image_name, image_name)

# Res-block epsilons as diffusers' UNetSpatioTemporalConditionModel wires them (it hard-codes them
# per block type rather than reading a config value).
SVD_EPS = {"down": 1e-5, "cross_attn_down": 1e-6, "mid": 1e-5, "up": 1e-6, "out": 1e-5}

# The output layers of the temporal branches and of the frame position embedding: with these zero
# a temporal block passes its input through (positions included), so an inflated video UNet starts
# as its image UNet, frame by frame (Video LDM). The text motion embedding is zero at init anyway.
# AnimateDiff's motion modules start as the identity the same way: their proj_out at zero (as the
# original AnimateDiff initialises them); ModelScope's temporal layers too (diffusers zeroes the
# last temporal convolution).
TEMPORAL_OUTPUTS = re.compile(
    r"(temporal_res_block/conv2|temporal_transformer_blocks_\d+/(ff_in|ff)/net_2|"
    r"temporal_transformer_blocks_\d+/attn[12]/to_out_0|time_pos_embed/linear_2|"
    r"motion_modules_\d+/proj_out|temp_convs_\d+/conv4_3|temp_attentions_\d+/proj_out|"
    r"transformer_in/proj_out)/")


def zero_temporal_outputs(params):
  """`params` with every `TEMPORAL_OUTPUTS` leaf zero (the rest unchanged). Traceable."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict(
      {k: jnp.zeros_like(v) if TEMPORAL_OUTPUTS.search("/".join(k)) else v
       for k, v in flat.items()})


def _per_level(value, levels: int, name: str) -> tuple:
  if isinstance(value, (int, float, bool)):
    return (value,) * levels
  value = tuple(value)
  if len(value) != levels:
    raise ValueError(f"{name} has {len(value)} entries for {levels} levels: {value}.")
  if any(isinstance(v, (list, tuple)) for v in value):
    raise ValueError(f"{name} must be one value or one value per level (nested per-layer lists "
                     f"are not supported), got {value}.")
  return value


def broadcast_timesteps(timesteps, batch: int):
  """Timesteps as diffusers takes them (a scalar or [B]) → [B]."""
  timesteps = jnp.asarray(timesteps)
  if timesteps.ndim == 0:
    return jnp.broadcast_to(timesteps, (batch,))
  if timesteps.shape != (batch,):
    raise ValueError(f"timesteps must be a scalar or ({batch},), got shape {timesteps.shape}.")
  return timesteps


class UNet(nn.Module):
  """Conditional UNet; fields follow the diffusers config keys.

  `num_attention_heads` is the number of heads per level. (UNet2DConditionModel's config calls
  this `attention_head_dim`; the converter maps it.) Heads have width channels // heads.
  `eps_convention`: 'uniform' = every res block and conv_norm_out use `norm_eps` (SD);
  'svd' = the per-block values of diffusers' SVD UNet (`SVD_EPS`).
  Video fields: `temporal`, `merge_factor` / `merge_strategy` (the α blenders),
  `temporal_conv_implementation`, and the added-time-ids micro-conditioning
  (`addition_time_embed_dim`: sinusoidal width per id, None = off;
  `projection_class_embeddings_input_dim` = number of ids × that width).
  `text_motion_embedding` (vldm's, off in diffusers' configs): each temporal transformer's frame
  position embedding gets a text-dependent (frame, x, y) term (`transformer.TextMotionEmbedding`).
  `temporal_kind` (see the module docstring); for 'motion_module', AnimateDiff's options as
  UNetMotionModel names them: `motion_num_attention_heads` and
  `temporal_transformer_layers_per_block` per level (up blocks use their level's),
  `motion_max_seq_length` (the most frames a clip may have), `use_motion_mid_block` and
  `temporal_transformer_layers_per_mid_block`. Their GroupNorms use `norm_num_groups`.
  For 'modelscope' the temporal transformers have the spatial ones' heads (`num_attention_heads`,
  which must divide the channels), `transformer_in` 8 heads of level 0's head width.
  `remat_policy`: one of `unet_blocks.REMAT_POLICIES`, applied to each res block and transformer.
  """
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                     "CrossAttnDownBlock2D", "DownBlock2D")
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                   "CrossAttnUpBlock2D")
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: IntOrTuple = 2
  transformer_layers_per_block: IntOrTuple = 1
  num_attention_heads: IntOrTuple = 8
  cross_attention_dim: IntOrTuple = 1280
  only_cross_attention: Union[bool, Sequence[bool]] = False
  use_linear_projection: bool = False
  upcast_attention: bool = False  # kept for the reference config: softmax is always float32 here
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  eps_convention: str = "uniform"
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  sample_size: Optional[Union[int, Sequence[int]]] = None  # the reference config's, for pipelines
  # Video.
  temporal: bool = False
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  merge_factor: float = 0.5
  merge_strategy: str = "learned_with_images"
  temporal_conv_implementation: str = "shifted_matmul"
  text_motion_embedding: bool = False
  temporal_kind: str = "alignment"
  motion_num_attention_heads: IntOrTuple = 8
  motion_max_seq_length: int = 32
  temporal_transformer_layers_per_block: IntOrTuple = 1
  temporal_transformer_layers_per_mid_block: int = 1
  use_motion_mid_block: bool = True
  # Initialise the temporal branches' output layers at zero (`TEMPORAL_OUTPUTS`): the video UNet
  # then starts as its image UNet, as Video LDM inserts temporal layers.
  zero_init_temporal_outputs: bool = False
  num_frames: int = 25  # the reference config's nominal clip length; any length runs
  # Computation.
  attention_implementation: Optional[str] = None
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def init(self, rngs, *args, **kwargs):  # pylint: disable=arguments-differ
    variables = super().init(rngs, *args, **kwargs)
    if self.temporal and self.zero_init_temporal_outputs:
      variables = dict(variables, params=zero_temporal_outputs(variables["params"]))
    return variables

  @property
  def reference_class(self) -> str:
    if not self.temporal:
      return "UNet2DConditionModel"
    return {"motion_module": "UNetMotionModel", "modelscope": "UNet3DConditionModel"}.get(
        self.temporal_kind, "UNetSpatioTemporalConditionModel")

  @property
  def has_motion_modules(self) -> bool:
    """Whether this is an AnimateDiff video UNet (temporal_kind='motion_module')."""
    return self.temporal and self.temporal_kind == "motion_module"

  @property
  def is_modelscope(self) -> bool:
    """Whether this is a ModelScope video UNet (temporal_kind='modelscope')."""
    return self.temporal and self.temporal_kind == "modelscope"

  @property
  def num_levels(self) -> int:
    return len(self.block_out_channels)

  def per_level(self, name: str) -> tuple:
    """A per-level option (`num_attention_heads`, `layers_per_block`, ...), one value per level."""
    return _per_level(getattr(self, name), self.num_levels, name)

  @property
  def context_dim(self) -> int:
    """The width of encoder_hidden_states (one for all levels)."""
    dims = set(self.per_level("cross_attention_dim"))
    if len(dims) != 1:
      raise ValueError(f"All levels must share one cross_attention_dim (there is one "
                       f"encoder_hidden_states), got {self.cross_attention_dim}.")
    return dims.pop()

  @property
  def num_time_ids(self) -> int:
    """How many added time ids the config expects (0 when micro-conditioning is off)."""
    if self.addition_time_embed_dim is None:
      return 0
    if (self.projection_class_embeddings_input_dim is None
        or self.projection_class_embeddings_input_dim % self.addition_time_embed_dim):
      raise ValueError(f"projection_class_embeddings_input_dim "
                       f"({self.projection_class_embeddings_input_dim}) must be a multiple of "
                       f"addition_time_embed_dim ({self.addition_time_embed_dim}).")
    return self.projection_class_embeddings_input_dim // self.addition_time_embed_dim

  def check_config(self) -> None:
    """Raises ValueError naming any option this UNet cannot build."""
    levels = self.num_levels
    unknown = [t for t in self.down_block_types if t not in DOWN_BLOCK_TYPES]
    unknown += [t for t in self.up_block_types if t not in UP_BLOCK_TYPES]
    if self.mid_block_type not in MID_BLOCK_TYPES:
      unknown.append(self.mid_block_type)
    if unknown:
      raise ValueError(f"Unsupported block types {unknown}; supported: down "
                       f"{sorted(DOWN_BLOCK_TYPES)}, mid {list(MID_BLOCK_TYPES)}, up "
                       f"{sorted(UP_BLOCK_TYPES)}.")
    if not len(self.down_block_types) == len(self.up_block_types) == levels:
      raise ValueError(f"down_block_types ({len(self.down_block_types)}), up_block_types "
                       f"({len(self.up_block_types)}) and block_out_channels ({levels}) must have "
                       f"one entry per level.")
    if self.eps_convention not in EPS_CONVENTIONS:
      raise ValueError(f"Unknown eps_convention {self.eps_convention!r}; accepted: "
                       f"{EPS_CONVENTIONS}.")
    for name in ("layers_per_block", "transformer_layers_per_block", "num_attention_heads",
                 "only_cross_attention"):
      self.per_level(name)
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must be multiples of "
                         f"norm_num_groups ({self.norm_num_groups}).")
    alignment = self.temporal and self.temporal_kind == "alignment"
    for c, heads in zip(self.block_out_channels, self.per_level("num_attention_heads")):
      if heads < 1 or c < heads:
        raise ValueError(f"{c} channels cannot be split into {heads} attention heads.")
      # Alignment: its frame position embedding is added at width c. ModelScope: diffusers builds
      # heads of width c // heads that fill the channels.
      if (alignment or self.is_modelscope) and c % heads:
        raise ValueError(f"The video UNet needs channels divisible by the number of heads: {c} "
                         f"channels, {heads} heads.")
    if self.temporal_kind not in TEMPORAL_KINDS:
      raise ValueError(f"Unknown temporal_kind {self.temporal_kind!r}; accepted: {TEMPORAL_KINDS}.")
    if self.has_motion_modules:
      self._check_motion_modules()
    elif self.is_modelscope:
      if self.text_motion_embedding:
        raise ValueError("text_motion_embedding belongs to the temporal alignment layers "
                         "(temporal_kind='alignment'), not to ModelScope's.")
    elif self.temporal_kind != "alignment":
      raise ValueError(f"temporal_kind={self.temporal_kind!r} is an option of the video UNet "
                       "(temporal=True).")
    if (alignment or self.is_modelscope) and (
        self.temporal_conv_implementation not in layers.TEMPORAL_CONV_IMPLEMENTATIONS):
      raise ValueError(f"Unknown temporal_conv_implementation "
                       f"{self.temporal_conv_implementation!r}; accepted: "
                       f"{layers.TEMPORAL_CONV_IMPLEMENTATIONS}.")
    if alignment:
      if self.mid_block_scale_factor != 1:
        raise ValueError("The video UNet's res blocks have no output scale: "
                         f"mid_block_scale_factor must be 1, got {self.mid_block_scale_factor}.")
      if self.merge_strategy not in layers.MERGE_STRATEGIES:
        raise ValueError(f"Unknown merge_strategy {self.merge_strategy!r}; accepted: "
                         f"{layers.MERGE_STRATEGIES}.")
    elif self.text_motion_embedding:
      raise ValueError("text_motion_embedding is an option of the video UNet (temporal=True).")
    unet_blocks.check_remat_policy(self.remat_policy)
    _ = self.context_dim, self.num_time_ids

  def _check_motion_modules(self) -> None:
    if self.text_motion_embedding:
      raise ValueError("text_motion_embedding belongs to the temporal alignment layers "
                       "(temporal_kind='alignment'), not to motion modules.")
    self.per_level("temporal_transformer_layers_per_block")
    for c, heads in zip(self.block_out_channels, self.per_level("motion_num_attention_heads")):
      if heads < 1 or c < heads:
        raise ValueError(f"{c} channels cannot be split into {heads} motion-module heads.")
      if (c // heads * heads) % 2:  # the sinusoidal frame positions have sin/cos pairs
        raise ValueError(f"A motion module's width (heads × head width = {c // heads * heads} for "
                         f"{c} channels, {heads} heads) must be even.")
    if self.motion_max_seq_length < 1:
      raise ValueError(f"motion_max_seq_length must be ≥ 1; got {self.motion_max_seq_length}.")

  def example_inputs(self, batch: int = 1, frames: int = 1) -> tuple:
    """The smallest inputs this UNet accepts (zeros), positional, for `init` / `eval_shape`."""
    size = 2 ** (self.num_levels - 1)
    frame_axis = (frames,) if self.temporal else ()
    inputs = (jnp.zeros((batch,) + frame_axis + (size, size, self.in_channels), jnp.float32),
              jnp.zeros((batch,), jnp.float32),
              jnp.zeros((batch, 1, self.context_dim), jnp.float32))
    if self.num_time_ids:
      inputs += (jnp.zeros((batch, self.num_time_ids), jnp.float32),)
    return inputs

  def _eps(self, where: str) -> float:
    return self.norm_eps if self.eps_convention == "uniform" else SVD_EPS[where]

  def _options(self) -> unet_blocks.BlockOptions:
    return unet_blocks.BlockOptions(
        # Motion modules and ModelScope's layers come beside the image layers, which stay as they
        # are.
        temporal=self.temporal and self.temporal_kind == "alignment",
        norm_num_groups=self.norm_num_groups,
        use_linear_projection=self.use_linear_projection, merge_factor=self.merge_factor,
        merge_strategy=self.merge_strategy,
        temporal_conv_implementation=self.temporal_conv_implementation,
        text_motion_embedding=self.text_motion_embedding,
        motion_max_seq_length=self.motion_max_seq_length, modelscope=self.is_modelscope,
        attention_implementation=self.attention_implementation, remat_policy=self.remat_policy,
        dtype=self.dtype, param_dtype=self.param_dtype)

  def _check_inputs(self, sample, encoder_hidden_states, added_time_ids, image_only_indicator):
    rank = 5 if self.temporal else 4
    layout = "(B, F, H, W, C)" if self.temporal else "(B, H, W, C)"
    kind = "video" if self.temporal else "image"
    if sample.ndim != rank:
      raise ValueError(f"The {kind} UNet takes sample {layout}, got shape {sample.shape}.")
    if sample.shape[-1] != self.in_channels:
      raise ValueError(f"sample has {sample.shape[-1]} channels; this UNet takes in_channels = "
                       f"{self.in_channels} (channels last).")
    factor = 2 ** (self.num_levels - 1)
    height, width = sample.shape[-3:-1]
    if height % factor or width % factor:
      raise ValueError(f"Height and width ({height}, {width}) must be divisible by {factor} "
                       f"(2**(levels-1) for {self.num_levels} levels).")
    batch, frames = sample.shape[0], (sample.shape[1] if self.temporal else 1)
    if frames < 1:
      raise ValueError(f"sample has no frames: shape {sample.shape}.")
    if self.has_motion_modules and frames > self.motion_max_seq_length:
      raise ValueError(f"sample has {frames} frames; this UNet's motion modules have frame "
                       f"positions for at most {self.motion_max_seq_length} "
                       f"(motion_max_seq_length).")
    if encoder_hidden_states.shape[-1] != self.context_dim:
      raise ValueError(f"encoder_hidden_states has width {encoder_hidden_states.shape[-1]}; this "
                       f"UNet takes cross_attention_dim = {self.context_dim}.")
    per_frame = self.temporal and encoder_hidden_states.ndim == 4
    want = (batch, frames) if per_frame else (batch,)
    if encoder_hidden_states.ndim != len(want) + 2 or encoder_hidden_states.shape[:len(want)] != want:
      accepted = "(B, L, D) or (B, F, L, D)" if self.temporal else "(B, L, D)"
      raise ValueError(f"encoder_hidden_states must be {accepted} with B = {batch}"
                       f"{f', F = {frames}' if self.temporal else ''}, got shape "
                       f"{encoder_hidden_states.shape}.")
    if self.num_time_ids:
      if added_time_ids is None:
        raise ValueError(f"This UNet is conditioned on added_time_ids ({self.num_time_ids} per "
                         f"sample, e.g. [fps, motion_bucket_id, noise_aug_strength]): pass "
                         f"added_time_ids of shape ({batch}, {self.num_time_ids}).")
      if added_time_ids.shape != (batch, self.num_time_ids):
        raise ValueError(f"added_time_ids must be ({batch}, {self.num_time_ids}), got "
                         f"{added_time_ids.shape}.")
    elif added_time_ids is not None:
      raise ValueError("This UNet has no added-time-ids conditioning (addition_time_embed_dim is "
                       "None): do not pass added_time_ids.")
    if image_only_indicator is not None:
      if not self.temporal:
        raise ValueError("image_only_indicator is for the video UNet (temporal=True).")
      if image_only_indicator.shape != (batch, frames):
        raise ValueError(f"image_only_indicator must be (B, F) = ({batch}, {frames}), got "
                         f"{image_only_indicator.shape}.")

  @nn.compact
  def __call__(self, sample, timesteps, encoder_hidden_states, added_time_ids=None,
               image_only_indicator=None):
    self.check_config()
    self._check_inputs(sample, encoder_hidden_states, added_time_ids, image_only_indicator)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = self.num_levels
    channels = tuple(self.block_out_channels)
    heads = self.per_level("num_attention_heads")
    num_layers = self.per_level("layers_per_block")
    transformer_layers = self.per_level("transformer_layers_per_block")
    only_cross = self.per_level("only_cross_attention")
    options = self._options()
    # Motion modules per level (None: none), and in the mid block.
    motion_heads, motion_layers = (None,) * levels, (1,) * levels
    if self.has_motion_modules:
      motion_heads = self.per_level("motion_num_attention_heads")
      motion_layers = self.per_level("temporal_transformer_layers_per_block")
    mid_motion_heads = motion_heads[-1] if self.use_motion_mid_block else None

    batch = sample.shape[0]
    frames = sample.shape[1] if self.temporal else 1
    context = encoder_hidden_states.astype(self.dtype)
    if self.temporal:
      sample = sample.reshape((batch * frames,) + sample.shape[2:])
      if context.ndim == 4:  # one context per frame
        context = context.reshape((batch * frames,) + context.shape[2:])
      if image_only_indicator is None:
        image_only_indicator = jnp.zeros((batch, frames), self.dtype)
    if self.center_input_sample:
      sample = 2 * sample - 1.0

    # Time embedding (+ micro-conditioning), one per sample, repeated per frame.
    embed = lambda t, dim: layers.timestep_embedding(
        t, dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    temb = embed(broadcast_timesteps(timesteps, batch), channels[0]).astype(self.dtype)
    temb = layers.TimestepEmbedding(4 * channels[0], name="time_embedding", **kw)(temb)
    if self.num_time_ids:
      ids = embed(jnp.asarray(added_time_ids).reshape(-1), self.addition_time_embed_dim)
      ids = ids.reshape(batch, -1).astype(self.dtype)
      temb = temb + layers.TimestepEmbedding(4 * channels[0], name="add_embedding", **kw)(ids)
    if self.temporal:
      temb = jnp.repeat(temb, frames, axis=0)

    h = layers.conv(channels[0], 3, name="conv_in", **kw)(sample.astype(self.dtype))
    if self.is_modelscope:
      h = unet_blocks.maybe_remat(temporal_layers.MotionModule, self.remat_policy)(
          MODELSCOPE_TRANSFORMER_IN_HEADS, norm_num_groups=self.norm_num_groups,
          attention_head_dim=channels[0] // heads[0], frame_positions=False,
          attention_implementation=self.attention_implementation, name="transformer_in",
          **kw)(h, image_only_indicator)
    skips = [h]
    for i, block_type in enumerate(self.down_block_types):
      attention = DOWN_BLOCK_TYPES[block_type]
      h, res = unet_blocks.DownBlock(
          channels[i], num_layers[i], self._eps("cross_attn_down" if attention else "down"),
          num_attention_heads=heads[i] if attention else None,
          transformer_layers=transformer_layers[i], only_cross_attention=only_cross[i],
          add_downsample=i < levels - 1, downsample_padding=self.downsample_padding,
          motion_num_attention_heads=motion_heads[i], motion_layers=motion_layers[i],
          options=options, name=f"down_blocks_{i}")(h, temb, context, image_only_indicator)
      skips += res

    h = unet_blocks.MidBlock(self._eps("mid"), heads[-1], transformer_layers[-1],
                             output_scale_factor=self.mid_block_scale_factor,
                             motion_num_attention_heads=mid_motion_heads,
                             motion_layers=self.temporal_transformer_layers_per_mid_block,
                             options=options, name="mid_block")(h, temb, context,
                                                                image_only_indicator)

    for i, block_type in enumerate(self.up_block_types):
      level = levels - 1 - i
      n = num_layers[level] + 1
      res, skips = skips[-n:], skips[:-n]
      attention = UP_BLOCK_TYPES[block_type]
      h = unet_blocks.UpBlock(
          channels[level], n, self._eps("up"),
          num_attention_heads=heads[level] if attention else None,
          transformer_layers=transformer_layers[level], only_cross_attention=only_cross[level],
          add_upsample=i < levels - 1, motion_num_attention_heads=motion_heads[level],
          motion_layers=motion_layers[level], options=options,
          name=f"up_blocks_{i}")(h, res, temb, context, image_only_indicator)

    h = layers.GroupNorm(self.norm_num_groups, self._eps("out"), name="conv_norm_out", **kw)(h)
    h = layers.conv(self.out_channels, 3, name="conv_out", **kw)(nn.silu(h))
    if self.temporal:
      h = h.reshape((batch, frames) + h.shape[1:])
    return h
