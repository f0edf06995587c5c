"""The data part of a config: `config.data = data_config(...)` (an ml_collections.ConfigDict).

Keys (all overridable from the command line, `--config.data.resolution=64`):
  name            'shapes' | 'video_folder' | 'latent_cache' | 'ucf101' | 'moving_mnist' |
                  'bair_robot_pushing_small' (a TFDS config may follow: 'ucf101/ucf101_1_256')
  kind            'video' (clips) or 'image' (stills; from a video source, one random frame)
  data_dir        TFDS data dir; None: TFDS's default (~/tensorflow_datasets or $TFDS_DATA_DIR)
  resolution      side of the frames the pipeline yields (resize shorter side + crop)
  frames          frames per clip
  frame_stride    source frames between clip frames; with max_frame_stride > frame_stride the
                  stride is drawn per clip from [frame_stride, max_frame_stride] (fps follows)
  random_crop     crop at a random position instead of the centre
  caption_dropout probability of an empty caption (classifier-free guidance)
  max_captions    1 (default): each clip's first caption; > 1: one of its first max_captions
                  captions (a video folder's 'captions'), drawn per example and epoch by
  caption_weights a dict captioner name -> weight >= 0 (e.g. {'a': 0.8, 'b': 0.2}; on the
                  command line --config.data.caption_weights="{'a': 0.8, 'b': 0.2}"): a caption's
                  chance is proportional to its captioner's weight, captioners not named weigh
                  0, and a clip whose every caption weighs 0 (or {}) draws uniformly. A latent
                  cache encodes every candidate and must be rebuilt to change either key.
  clip_start_prob > 0: a clip starts its stored video with this probability (else anywhere) and
                  batches carry 'clip_start' (a prediction stage trains its unconditional
                  branch, a long video's first chunk, on those clips only)
  batch_size      global batch size; seed, shuffle: the stream's order
  num_workers, prefetch: threads and batches built ahead
  train_split, eval_split: split names (moving_mnist only has 'test')
  shapes:         num_train_examples, num_validation_examples, source_resolution (build size,
                  default resolution), tempos (frame-rate multiples, default (1.0,): tempo k
                  films the motion at k x the frame rate, speeds / k and fps 8k; several: each
                  clip takes one, e.g. (4.0, 16.0) for interpolation training), path_frames (> 0:
                  the stored clips are whole motions of that many frames, and training clips are
                  windows of them: long videos for a prediction stage)
  video_folder:   folder, captions (CSV/JSONL, relative to folder; default captions.csv, else
                  captions.jsonl), min_frames (default: one clip span), max_frames (frames per
                  stored clip; longer videos give several), source_resolution,
                  target_fps (take every round(file fps / target_fps)-th frame; None: every
                  frame), clips_per_video (at most this many clips per video, spread over it;
                  0: all)
  latent_cache:   cache_dir (holds one cache per split: cache_dir/<split>)
  standard:       caption_template (default per dataset, e.g. "a video of {label}")
"""

import ml_collections
from ml_collections import config_dict

from vldm.data import pipeline as pipeline_lib
from vldm.data import shapes
from vldm.data import shapes_tfds

NAMES = (
    "shapes",
    "video_folder",
    "latent_cache",
    "ucf101",
    "moving_mnist",
    "bair_robot_pushing_small",
)


def data_config(name="shapes", kind="video", resolution=32, frames=8, **overrides):
  """A data ConfigDict with every key set; `overrides` replace defaults by key."""
  c = ml_collections.ConfigDict()
  c.name = name
  c.kind = kind
  c.data_dir = config_dict.placeholder(str)
  c.resolution = resolution
  c.frames = frames
  c.frame_stride = 1
  c.max_frame_stride = 0
  c.random_crop = False
  c.caption_dropout = 0.1
  c.clip_start_prob = 0.0
  c.max_captions = 1
  c.caption_weights = {}
  c.batch_size = 32
  c.seed = 0
  c.shuffle = True
  c.num_workers = 4
  c.prefetch = 4
  c.train_split = "train"
  c.eval_split = "validation"
  c.num_train_examples = shapes_tfds.DEFAULT_NUM_TRAIN
  c.num_validation_examples = shapes_tfds.DEFAULT_NUM_VALIDATION
  c.source_resolution = config_dict.placeholder(int)
  c.tempos = shapes.DEFAULT_TEMPOS
  c.path_frames = 0
  c.folder = config_dict.placeholder(str)
  c.captions = "captions.csv"
  c.min_frames = config_dict.placeholder(int)
  c.max_frames = 64
  c.target_fps = config_dict.placeholder(float)
  c.clips_per_video = 8
  c.cache_dir = config_dict.placeholder(str)
  c.caption_template = config_dict.placeholder(str)
  for key, value in overrides.items():
    if key not in c:
      raise ValueError(f"Unknown data config key {key!r}; known: {sorted(c.keys())}.")
    c[key] = value
  validate(c)
  return c


def validate(c):
  """Raises ValueError naming the bad key and what is accepted."""
  base = c.name.split("/")[0]
  if base not in NAMES:
    raise ValueError(f"data.name {c.name!r} unknown; expected one of {NAMES}.")
  if c.kind not in ("video", "image"):
    raise ValueError(f"data.kind must be 'video' or 'image', got {c.kind!r}.")
  if c.resolution < 1 or c.frames < 1 or c.frame_stride < 1 or c.batch_size < 1:
    raise ValueError("data.resolution, frames, frame_stride and batch_size must be >= 1.")
  if not 0 <= c.caption_dropout <= 1:
    raise ValueError(f"data.caption_dropout must be in [0, 1], got {c.caption_dropout}.")
  if not 0 <= c.get("clip_start_prob", 0.0) <= 1:
    raise ValueError(f"data.clip_start_prob must be in [0, 1], got {c.clip_start_prob}.")
  max_captions = c.get("max_captions", 1)
  if isinstance(max_captions, bool) or not isinstance(max_captions, int) or max_captions < 1:
    raise ValueError(f"data.max_captions must be an integer >= 1, got {max_captions!r}.")
  pipeline_lib.check_caption_weights(c.get("caption_weights"), "data.caption_weights")
  if c.max_frame_stride and c.max_frame_stride < c.frame_stride:
    raise ValueError(
        f"data.max_frame_stride ({c.max_frame_stride}) < frame_stride "
        f"({c.frame_stride}); use 0 for a fixed stride."
    )
  _validate_tempos(c, base)
  if base == "video_folder" and not c.folder:
    raise ValueError("data.name='video_folder' needs data.folder (and data.captions).")
  if base == "latent_cache" and not c.cache_dir:
    raise ValueError("data.name='latent_cache' needs data.cache_dir.")


def _validate_tempos(c, base):
  """Tempos are positive numbers, and only the shapes videos have them."""
  tempos = c.get("tempos", shapes.DEFAULT_TEMPOS)
  try:
    tempos = shapes.check_tempos(tempos)
  except ValueError as e:
    raise ValueError(
        f"data.tempos must be a non-empty tuple of numbers > 0, e.g. (1.0,), (2.5,) "
        f"or (4.0, 16.0); got {tempos!r}."
    ) from e
  # A latent cache keeps the config of the shapes data it was built from.
  if tempos != shapes.DEFAULT_TEMPOS and (
      base not in ("shapes", "latent_cache") or c.kind != "video"
  ):
    raise ValueError(
        f"data.tempos={tempos} only applies to name='shapes' with kind='video' (got "
        f"name={c.name!r}, kind={c.kind!r}); use (1.0,)."
    )


def frame_strides(c):
  """The strides a clip may use."""
  return tuple(range(c.frame_stride, max(c.frame_stride, c.max_frame_stride) + 1))
