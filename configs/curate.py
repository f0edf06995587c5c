"""Curation of a folder of raw videos (Stable Video Diffusion's recipe): `python -m vldm.curate`.

  python -m vldm.curate --input videos/ --out curated/
  python -m vldm.curate --input videos/ --out curated/ --config.clip=clip-vit-large-patch14 \\
      --config.aesthetic_weights=sac+logos+ava1-l14-linearMSE.pth \\
      --config.craft_weights=craft_mlt_25k.pth --config.filters.motion.threshold=0.05

Model scores run only when their weights are given; motion always runs. Each filter drops a
percentile of all clips (SVD's: the lowest 25 % on motion and aesthetics, the lowest 50 % on
CLIP score, the 25 % with the most text), or, with `threshold` set, every clip past it.

Clips are frame ranges of the sources (no re-encoding); `--config.export.mode=copy` also cuts the
kept ones into files by keyframe-aware stream copy, `--config.export.mode=reencode` frame-exactly
with libx264 (OUT/clips/; train on them with data=OUT/clips).
"""

import ml_collections
from ml_collections import config_dict


def _filter(percentile):
  return ml_collections.ConfigDict(
      {"percentile": percentile, "threshold": config_dict.placeholder(float)}
  )


def get_config():
  config = ml_collections.ConfigDict()
  config.captions = "captions.csv"  # relative to --input; captions.jsonl when absent
  config.extensions = ".mp4,.webm,.mkv,.mov,.avi,.m4v,.gif"
  # Clips: frame ranges between cuts, long scenes split into clips of at most max_frames.
  config.min_frames = 8
  config.max_frames = 64
  config.analysis_size = 64  # short side (px) of the frames for cuts, motion and thumbnails
  config.score_size = 256  # short side (px) of the frames held for the model scores
  config.cuts = ml_collections.ConfigDict(
      {
          "content_threshold": 27.0,
          "adaptive_threshold": 3.0,
          "adaptive_min_content": 15.0,
          "fade_threshold": 12.0,
          "min_scene_len": 4,
          "frame_skip": 2,
          "merge_frames": 3,
      }
  )
  # Model weights ('' = that score is not computed).
  config.clip = ""  # transformers CLIPModel folder with its tokenizer (ViT-L/14 for aesthetics)
  config.aesthetic_weights = ""  # LAION sac+logos+ava1-l14-linearMSE.pth; needs config.clip
  config.craft_weights = ""  # craft_mlt_25k.pth
  config.craft_long_side = 512  # CRAFT input: the frame's long side resized to this (px)
  config.batch_size = 32  # frames per network call
  config.filters = ml_collections.ConfigDict(
      {
          "motion": _filter(25.0),
          "aesthetic": _filter(25.0),
          "clip_score": _filter(50.0),
          "text_area": _filter(25.0),
      }
  )
  config.max_videos = 0  # score at most this many new videos in this run (0: all)
  # Clip files (vldm.curate.ffmpeg_cuts), under OUT/clips/ with OUT/clips/captions.jsonl.
  # mode: 'ranges' (none: clips.jsonl's rows are frame ranges of the sources), 'copy' (stream copy
  # from the first keyframe at or after each clip's start; no re-encoding), 'reencode'
  # (frame-exact, libx264 at crf / preset: for sources with sparse keyframes).
  config.export = ml_collections.ConfigDict(
      {
          "mode": "ranges",
          "crf": 18,  # libx264 quality for reencode (0 lossless, 51 worst; 18 ≈ visually lossless)
          "preset": "medium",  # libx264 speed / size trade-off for reencode
          "include_dropped": False,  # also export the clips the filters dropped
          "workers": 0,  # ffmpeg processes at once (0: the CPU count, at most 8)
      }
  )
  return config
