"""Clip files of `python -m vldm.curate` (config.export, vldm.curate.ffmpeg_cuts) from tiny MP4s
with a known GOP: a stream copy starts at the first keyframe at or after its clip's start and
decodes to the source's frames bit for bit; reencode cuts exactly the clip's frames; a killed and
rerun export writes the same files; the exported folder is training data."""

import filecmp
import json
import os
import shutil
import sys

import imageio.v3 as iio
import ml_collections
import numpy as np
import pytest

import media
import recipe_runs
import test_curate
from vldm.curate import ffmpeg_cuts
from vldm.curate import pipeline

FPS, GOP = 10, 10
SCENES = (23, 27, 30)  # cuts at 23 and 50: neither on a keyframe of the 10-frame GOP
SPARSE = (20, 20)  # one keyframe, at 0: only the first clip can be stream-copied


def write_mp4(path, frames, gop):
  """H.264 with a keyframe every `gop` frames exactly (no scene-cut keyframes), B-frames on."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  params = ["-g", str(gop), "-sc_threshold", "0", "-bf", "3"]
  iio.imwrite(path, frames, fps=FPS, codec="libx264", macro_block_size=2, ffmpeg_params=params)


def scenes(lengths, seed):
  tints = ((1, 0.5, 0.2), (0.2, 1, 0.4), (0.5, 0.3, 1))
  return np.concatenate(
      [
          test_curate.texture_clip(n, 0.8, seed=seed + i, tint=tints[i % 3])
          for i, n in enumerate(lengths)
      ]
  )


@pytest.fixture(scope="module", name="folder")
def folder_fixture(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("videos"))
  write_mp4(os.path.join(folder, "gop10.mp4"), scenes(SCENES, 1), GOP)
  write_mp4(os.path.join(folder, "sub", "sparse.mp4"), scenes(SPARSE, 5), 1000)
  write_mp4(os.path.join(folder, "still.mp4"), test_curate.texture_clip(20, 0.0, seed=9), GOP)
  with open(os.path.join(folder, "captions.jsonl"), "w", encoding="utf-8") as f:
    f.write(json.dumps({"file": "gop10.mp4", "caption": "three panning scenes"}) + "\n")
  return folder


def export_config(mode, **export):
  c = test_curate.small_config()
  c.filters.motion.threshold = 0.01  # drops the still video's clip only
  c.export.mode = mode
  c.export.update(export)
  return c


def run(folder, out, mode, **export):
  return pipeline.run(export_config(mode, **export), folder, out, host=0, host_count=1)


@pytest.fixture(scope="module", name="copy_run")
def copy_run_fixture(folder, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out_copy"))
  return out, run(folder, out, "copy")


@pytest.fixture(scope="module", name="reencode_run")
def reencode_run_fixture(folder, copy_run, tmp_path_factory):
  """Reencode into a copy of the copy run's OUT: the changed settings redo every clip."""
  out = str(tmp_path_factory.mktemp("out_reencode") / "out")
  shutil.copytree(copy_run[0], out)
  return out, run(folder, out, "reencode")


def decoded(path):
  return np.stack(list(iio.imiter(path)))


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def clip_files(out):
  """Relative path -> bytes of every file under OUT/clips."""
  files = {}
  for root, _, names in os.walk(os.path.join(out, ffmpeg_cuts.CLIPS_DIR)):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, out)] = f.read()
  return files


def test_packets_give_the_known_gop(folder):
  packets = ffmpeg_cuts.read_packets(os.path.join(folder, "gop10.mp4"))
  assert packets.num_frames == sum(SCENES)
  assert packets.keyframes == list(range(0, sum(SCENES), GOP))
  assert np.any(np.diff(packets.frame) < 0)  # B-frames: decoding order is not display order
  assert ffmpeg_cuts.read_packets(os.path.join(folder, "sub", "sparse.mp4")).keyframes == [0]


def test_snap_ends_where_the_decoded_frames_are_a_run():
  """Decoding order I0 P3 B1 B2 P6 B4 B5 | I7 P9 B8: a copy of [0, 5) stops after B2 (4 frames),
  as P6 would add frame 6; [1, 10) starts at the keyframe 7."""
  lines = ["#tb 0: 1/10"]
  for n, (pts, key) in enumerate(
      [(0, 1), (3, 0), (1, 0), (2, 0), (6, 0), (4, 0), (5, 0), (7, 1), (9, 0), (8, 0)]
  ):
    lines.append(f"0, {n - 2}, {pts}, 1, 100, 0x{n:08x}" + ("" if key else ", F=0x0"))
  packets = ffmpeg_cuts.parse_framecrc("\n".join(lines))
  assert packets.keyframes == [0, 7] and packets.num_frames == 10
  assert ffmpeg_cuts.snap(packets, 0, 5) == (0, 4, 4)
  assert ffmpeg_cuts.snap(packets, 0, 7) == (0, 7, 7)
  assert ffmpeg_cuts.snap(packets, 1, 10) == (7, 10, 3)
  assert ffmpeg_cuts.snap(packets, 1, 9) == (7, 8, 1)
  assert ffmpeg_cuts.snap(packets, 1, 7) is None  # no keyframe in the clip


def test_copy_of_a_b_frame_stream_ends_before_frames_of_later(folder, tmp_path):
  """Where B-frames make a clip's end unclean, the copy ends earlier, on exactly the source's
  frames (cutting `end - start` packets would have added a frame from after the end)."""
  src = os.path.join(folder, "gop10.mp4")
  packets = ffmpeg_cuts.read_packets(src)
  source = decoded(src)
  cases = [
      (k, e)
      for k in packets.keyframes[1:4]
      for e in range(k + 2, k + GOP)
      if ffmpeg_cuts.snap(packets, k, e)[1] < e
  ][:3]
  assert cases  # the encoder's B-frames give unclean ends
  for k, e in cases:
    first, end, count = ffmpeg_cuts.snap(packets, k, e)
    dst = str(tmp_path / f"{k}-{e}.mp4")
    ffmpeg_cuts.cut_copy(ffmpeg_cuts.ffmpeg_exe(), src, dst, packets, first, count)
    np.testing.assert_array_equal(decoded(dst), source[first:end])


def test_copy_starts_at_a_keyframe_and_decodes_to_the_source(folder, copy_run):
  out, result = copy_run
  rows = {(r["file"], r["start_frame"]): r for r in result["rows"]}
  exported = [r for r in rows.values() if r.get("clip_file")]
  assert {r["file"] for r in exported} == {"gop10.mp4", "sub/sparse.mp4"}
  sources = {f: decoded(os.path.join(folder, f)) for f in ("gop10.mp4", "sub/sparse.mp4")}
  for r in exported:
    keys = ffmpeg_cuts.read_packets(os.path.join(folder, r["file"])).keyframes
    start, end = r["clip_start_frame"], r["clip_end_frame"]
    assert start == min(k for k in keys if k >= r["start_frame"]), r
    assert end <= r["end_frame"] and end - start >= 6, r
    assert os.path.basename(r["clip_file"]).endswith(f"_{start:06d}-{end:06d}.mp4")
    clip = decoded(os.path.join(out, r["clip_file"]))
    np.testing.assert_array_equal(clip, sources[r["file"]][start:end])  # no re-encoding
    assert ffmpeg_cuts.read_packets(os.path.join(out, r["clip_file"])).key[0]
  # The 2nd scene of the sparse video has no keyframe; the still video's clip is dropped by the
  # motion filter, so not exported.
  assert rows[("sub/sparse.mp4", 20)]["clip_file"] is None
  assert rows[("sub/sparse.mp4", 20)]["export_skipped"].startswith("keyframes")
  assert not rows[("still.mp4", 0)]["kept"] and "clip_file" not in rows[("still.mp4", 0)]
  assert result["export"]["exported"] == len(exported) and result["export"]["skipped"] == {
      "keyframes": 1
  }
  with open(os.path.join(out, pipeline.CLIPS_FILE), encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == result["rows"]


def test_reencode_cuts_exactly_the_clip(folder, reencode_run):
  out, result = reencode_run
  kept = [r for r in result["rows"] if r["kept"]]
  assert all(r.get("clip_file") for r in kept) and len(kept) == 5  # sparse's 2nd clip too
  for r in kept:
    start, end = r["start_frame"], r["end_frame"]
    assert (r["clip_start_frame"], r["clip_end_frame"]) == (start, end)
    source = decoded(os.path.join(folder, r["file"]))
    clip = decoded(os.path.join(out, r["clip_file"]))
    assert len(clip) == end - start, r
    aligned = psnr(clip, source[start:end])
    assert aligned > 38.0, (r, aligned)
    # One frame off would be much worse: the cut is frame-exact, not a frame early or late.
    if start:
      assert aligned > psnr(clip, source[start - 1 : end - 1]) + 3.0
    assert aligned > psnr(clip[:-1], source[start + 1 : end]) + 3.0
  # The copy run's files are gone: only this run's clips, its list and its settings remain.
  listed = {r["clip_file"] for r in kept}
  assert set(clip_files(out)) == listed | {"clips/captions.jsonl", "clips/export.json"}


def test_killed_and_rerun_writes_the_same_files(folder, copy_run, tmp_path):
  full_out, _ = copy_run
  out = str(tmp_path / "out")
  result = run(folder, out, "copy")
  first, second = [r["clip_file"] for r in result["rows"] if r.get("clip_file")][:2]
  # Killed while writing `first`: its partial file is there, the clip itself not yet.
  os.rename(os.path.join(out, first), ffmpeg_cuts._partial(os.path.join(out, first)))  # pylint: disable=protected-access
  with open(ffmpeg_cuts._partial(os.path.join(out, first)), "r+b") as f:  # pylint: disable=protected-access
    f.truncate(300)
  os.remove(os.path.join(out, ffmpeg_cuts.CLIPS_DIR, ffmpeg_cuts.EXPORTED_LIST))
  os.remove(os.path.join(out, pipeline.CLIPS_FILE))
  mtime = os.stat(os.path.join(out, second)).st_mtime_ns
  result = run(folder, out, "copy")
  assert result["export"]["exported"] == 1 and result["export"]["reused"] >= 1
  assert os.stat(os.path.join(out, second)).st_mtime_ns == mtime  # complete: not redone
  assert clip_files(out) == clip_files(full_out)
  assert filecmp.cmp(
      os.path.join(out, pipeline.CLIPS_FILE), os.path.join(full_out, pipeline.CLIPS_FILE), False
  )


def test_exported_clips_are_training_data(copy_run, tmp_path):
  """data=OUT/clips/captions.jsonl (or the folder OUT/clips) reads the clip files, each from its
  first frame, with its clip row's caption."""
  # pylint: disable=g-import-not-at-top
  from configs import common as configs_common
  from vldm.data import config as data_config_lib
  from vldm.data import video_folder

  out, result = copy_run
  clip_list = os.path.join(out, ffmpeg_cuts.CLIPS_DIR, ffmpeg_cuts.EXPORTED_LIST)
  data = data_config_lib.data_config("video_folder", folder=out)  # what data=DIR would set
  config = ml_collections.ConfigDict(dict(data=data))
  config.batch_size = 2
  configs_common.link_data(config, clip_list, str(tmp_path))
  assert config.data.folder == os.path.dirname(clip_list)
  assert video_folder.captions_path(config.data.folder) == clip_list  # the folder alone reads it
  builder = video_folder.video_folder_builder(
      config.data.folder,
      config.data.captions,
      resolution=16,
      min_frames=4,
      max_frames=4,
      clips_per_video=0,
      data_dir=str(tmp_path / "tfds"),
  )
  builder.download_and_prepare(file_format="array_record")
  source = builder.as_data_source("train")
  examples = [source[i] for i in range(len(source))]
  exported = {r["clip_file"]: r for r in result["rows"] if r.get("clip_file")}
  assert {"clips/" + e["file"].decode() for e in examples} == set(exported)
  lengths = [r["clip_end_frame"] - r["clip_start_frame"] for r in exported.values()]
  assert len(examples) == sum(n // 4 for n in lengths)
  captions = {e["file"].decode(): e["caption"].decode() for e in examples}
  assert {c for f, c in captions.items() if f.startswith("gop10")} == {"three panning scenes"}
  assert {c for f, c in captions.items() if f.startswith("sub/")} == {""}


def test_include_dropped_exports_every_clip_and_training_skips_dropped(folder, tmp_path):
  from vldm.data import video_folder  # pylint: disable=g-import-not-at-top

  out = str(tmp_path / "out")
  result = run(folder, out, "copy", include_dropped=True)
  still = next(r for r in result["rows"] if r["file"] == "still.mp4")
  assert not still["kept"] and still["clip_file"] == "clips/still_000000-000020.mp4"
  clip_list = os.path.join(out, ffmpeg_cuts.CLIPS_DIR, ffmpeg_cuts.EXPORTED_LIST)
  with open(clip_list, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  assert {r["file"]: r["kept"] for r in rows}["still_000000-000020.mp4"] is False
  assert "still_000000-000020.mp4" not in {r["file"] for r in video_folder.read_captions(clip_list)}


def test_bad_settings_and_missing_ffmpeg(monkeypatch):
  with pytest.raises(ffmpeg_cuts.ExportError, match="mode must be one of ranges, copy"):
    ffmpeg_cuts.validate(export_config("cut"))
  with pytest.raises(ffmpeg_cuts.ExportError, match="libx264 preset"):
    ffmpeg_cuts.validate(export_config("reencode", preset="fastest"))
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top

  def missing():
    raise RuntimeError("No ffmpeg exe could be found.")

  monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", missing)
  ffmpeg_cuts.ffmpeg_exe.cache_clear()
  try:
    ffmpeg_cuts.validate(export_config("ranges"))  # ranges needs no ffmpeg
    with pytest.raises(ffmpeg_cuts.ExportError, match="pip install --force-reinstall imageio"):
      ffmpeg_cuts.validate(export_config("copy"))
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ffmpeg_cuts.ExportError, match="pip install imageio-ffmpeg"):
      ffmpeg_cuts.validate(export_config("reencode"))
  finally:
    ffmpeg_cuts.ffmpeg_exe.cache_clear()


@pytest.mark.slow  # ≈ 1 min: curation with stream-copied clips, then 3 video-stage steps on them
def test_video_stage_trains_on_exported_clips(tmp_path):
  """`python -m vldm.curate --config.export.mode=copy`, then `python -m vldm.train` with
  data=OUT/clips (the exported clip files, not the sources)."""
  import sd_folders  # pylint: disable=g-import-not-at-top  # diffusers: slow to import

  inputs = {"cache": str(tmp_path / "jax_cache")}
  sd2 = sd_folders.write_sd_folder(str(tmp_path), "sd2")
  videos = media.write_video_folder(str(tmp_path / "videos"))["folder"]
  out = str(tmp_path / "curated")
  with recipe_runs.shared_compilation_cache(inputs["cache"]):
    recipe_runs.run(
        "curate",
        "--input",
        videos,
        "--out",
        out,
        "--config.min_frames=4",
        "--config.export.mode=copy",
        inputs=inputs,
    )
    with open(os.path.join(out, pipeline.CLIPS_FILE), encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    assert any(r.get("clip_file") for r in rows) and not all(r["kept"] for r in rows)
    root = str(tmp_path / "runs")
    config = os.path.join(recipe_runs.REPO, "configs", "video_ldm.py")
    data = os.path.join(out, ffmpeg_cuts.CLIPS_DIR)
    recipe_runs.run(
        "train",
        "--config",
        f"{config}:stage=video,pretrained={sd2},data={data},root={root},runlocal",
        "--workdir",
        os.path.join(root, "video"),
        "--config.batch_size=2",  # the tiny folder's exported clips: fewer than the default 8
        "--config.progress_bar=False",
        "--config.tensorboard=False",
        inputs=inputs,
    )
  with open(os.path.join(root, "video", "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(line).get("step") for line in f]
  assert max(s for s in steps if s is not None) == 3
