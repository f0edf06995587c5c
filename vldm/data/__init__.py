"""Data: the shapes dataset, TFDS builders, the host-sharded input pipeline, the latent cache.

  shapes        the procedural shapes world (palette, held-out set, numpy renderer); no TF
  shapes_tfds   TFDS builder `vldm_shapes` (configs image_<res>, video_<res>_<frames>)
  video_folder  TFDS builder `vldm_video_folder` (videos + CSV/JSONL captions)
  standard      ucf101 / moving_mnist / bair_robot_pushing_small, where prepared locally
  pipeline      Pipeline: sharded, resumable batches -> global jax.Arrays
  cache         latent / text-embedding cache (build_latent_cache, LatentCache)
  config        data_config(...) ConfigDict schema; sources: config -> source / Pipeline
  python -m vldm.data --config FILE --batches N --out DIR   (a look at the data)

Submodules are imported explicitly (`from vldm.data import pipeline`): TFDS/TensorFlow load only
where a builder is needed.
"""
