"""Data curation of raw videos, Stable Video Diffusion's recipe: `python -m vldm.curate`.

cuts      cut detection (a PySceneDetect cascade) and the clip frame ranges between cuts
scorers   the model scores: CLIP caption similarity, LAION aesthetics, CRAFT text area
pipeline  the sharded, resumable run: decoding, scoring, filtering, OUT/clips.jsonl
report    OUT/report.html
ffmpeg_cuts  clip files (config.export): keyframe-aware stream copy or frame-exact re-encoding
jsonl     atomic rewrites of the JSON-lines outputs
"""
