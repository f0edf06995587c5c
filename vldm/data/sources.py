"""From a data config (`vldm.data.config.data_config`) to a source and a Pipeline."""

import logging
import os

from vldm.data import cache as cache_lib
from vldm.data import config as config_lib
from vldm.data import pipeline as pipeline_lib

log = logging.getLogger(__name__)


def prepare(builder):
  """Builds a TFDS dataset (array_record, for random access) unless it is already there.

  Several hosts may race to build into one shared data_dir; the loser's failure is harmless
  when the winner's copy is complete.
  """
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception:  # pylint: disable=broad-except
    rebuilt = type(builder)(config=builder.builder_config, data_dir=builder.data_dir_root)
    if not rebuilt.is_prepared():
      raise
    log.info("%s was built concurrently by another process.", builder.info.full_name)
    return rebuilt
  return builder


def _source_resolution(c):
  return c.source_resolution or c.resolution


def make_builder(c):
  """The TFDS builder behind a 'shapes' or 'video_folder' config (not prepared)."""
  base = c.name.split("/")[0]
  if base == "shapes":
    from vldm.data import shapes_tfds  # pylint: disable=g-import-not-at-top
    # Stored clips: one clip span, or whole path_frames-long motions that clips are windows of.
    span = max(
        pipeline_lib.clip_span(c.frames, max(config_lib.frame_strides(c))),
        c.get("path_frames") or 0 if c.kind == "video" else 0,
    )
    return shapes_tfds.shapes_builder(
        c.kind,
        _source_resolution(c),
        span,
        num_train=c.num_train_examples,
        num_validation=c.num_validation_examples,
        seed=0,
        data_dir=c.data_dir,
        tempos=tuple(c.get("tempos", (1.0,))),
    )
  if base == "video_folder":
    from vldm.data import video_folder  # pylint: disable=g-import-not-at-top

    min_frames = c.min_frames or pipeline_lib.clip_span(c.frames, min(config_lib.frame_strides(c)))
    return video_folder.video_folder_builder(
        c.folder,
        c.captions,
        resolution=_source_resolution(c),
        min_frames=min_frames,
        max_frames=c.max_frames,
        target_fps=c.get("target_fps"),
        clips_per_video=c.get("clips_per_video", video_folder.DEFAULT_CLIPS_PER_VIDEO),
        data_dir=c.data_dir,
    )
  raise ValueError(f"data.name {c.name!r} has no vldm builder.")


def make_source(c, split):
  """A random-access source for `split` of the dataset `c` describes (building it if needed)."""
  config_lib.validate(c)
  base = c.name.split("/")[0]
  if base in ("shapes", "video_folder"):
    builder = prepare(make_builder(c))
    if split not in builder.info.splits:
      raise ValueError(
          f"{builder.info.full_name} has splits {list(builder.info.splits)}, " f"not {split!r}."
      )
    return builder.as_data_source(split)
  if base == "latent_cache":
    return cache_lib.LatentCache(os.path.join(c.cache_dir, split))
  from vldm.data import standard  # pylint: disable=g-import-not-at-top

  return standard.standard_source(c.name, split, c.data_dir, c.caption_template)


def make_pipeline(
    c,
    split=None,
    *,
    train=True,
    sharding=None,
    mesh=None,
    partition_spec=None,
    process_index=None,
    process_count=None,
    source=None,
    **overrides,
):
  """The Pipeline for `split` (default: c.train_split, or c.eval_split when train=False).

  Training streams shuffle forever with caption dropout; evaluation (train=False) reads one
  epoch in order, without dropout. `overrides` replace any Pipeline argument.
  """
  split = split or (c.train_split if train else c.eval_split)
  source = make_source(c, split) if source is None else source
  kwargs = dict(
      global_batch_size=c.batch_size,
      kind=c.kind,
      frames=c.frames,
      frame_stride=config_lib.frame_strides(c),
      resolution=c.resolution,
      random_crop=c.random_crop and train,
      caption_dropout=c.caption_dropout if train else 0.0,
      seed=c.seed,
      shuffle=c.shuffle and train,
      num_epochs=None if train else 1,
      drop_remainder=train or sharding is not None or mesh is not None,
      process_index=process_index,
      process_count=process_count,
      sharding=sharding,
      mesh=mesh,
      partition_spec=partition_spec,
      num_workers=c.num_workers,
      prefetch=c.prefetch,
      clip_start_prob=c.get("clip_start_prob", 0.0),
      max_captions=c.get("max_captions", 1),
      caption_weights=c.get("caption_weights"),
  )
  kwargs.update(overrides)
  return pipeline_lib.Pipeline(source, **kwargs)


def build_cache(c, split, directory, encode_video, encode_text, **kwargs):
  """Encodes `split` of the pixel dataset `c` into `directory/<split>`, the layout that a
  'latent_cache' config with cache_dir=directory reads. Returns the rows this process wrote."""
  source = make_source(c, split)
  return cache_lib.build_latent_cache(
      source,
      os.path.join(directory, split),
      encode_video,
      encode_text,
      batch_size=kwargs.pop("batch_size", c.batch_size),
      kind=c.kind,
      frames=c.frames,
      frame_stride=c.frame_stride,
      resolution=c.resolution,
      seed=c.seed,
      clip_start_prob=c.get("clip_start_prob", 0.0),
      max_captions=c.get("max_captions", 1),
      caption_weights=c.get("caption_weights"),
      **kwargs,
  )
