"""The shapes dataset: renderer geometry and the TFDS builder, against the DESIGN.md contract."""

import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vldm.data import shapes
from vldm.data import shapes_tfds

COLOR_RE = "|".join(shapes.COLORS)
SHAPE_RE = "|".join(shapes.SHAPES)
VIDEO_CAPTION = re.compile(rf"a ({COLOR_RE}) ({SHAPE_RE}) moving (left|right|up|down)")
IMAGE_CAPTION = re.compile(rf"a ({COLOR_RE}) ({SHAPE_RE})")
NUM_TRAIN, NUM_VALIDATION = 48, 24


def test_contract_constants():
  assert shapes.COLORS == {
      "red": (230, 40, 40),
      "green": (40, 200, 60),
      "blue": (50, 90, 240),
      "yellow": (240, 220, 40),
      "magenta": (220, 50, 220),
      "cyan": (40, 220, 230),
  }
  assert set(shapes.SHAPES) == {"circle", "square", "triangle"}
  assert set(shapes.DIRECTIONS) == {"left", "right", "up", "down"}
  assert shapes.HELD_OUT == {("yellow", "triangle"), ("cyan", "circle"), ("magenta", "square")}
  assert len(shapes.COMPOSITIONS) == 18 and set(shapes.COMPOSITIONS[:3]) == shapes.HELD_OUT
  assert shapes.video_caption("red", "circle", "left") == "a red circle moving left"
  assert shapes.image_caption("cyan", "square") == "a cyan square"


def alpha(pixels, color):
  """Per-pixel coverage recovered from a rendered clip of one color."""
  rgb = np.asarray(shapes.COLORS[color], np.float64)
  return pixels.astype(np.float64) @ rgb / (rgb @ rgb)


def area_tolerance(r, size, supersample=shapes.DEFAULT_SUPERSAMPLE):
  """Supersampling can misplace each edge by one sample spacing: area error <~ 4r / n."""
  n = size * supersample
  return 4 * r / n + 1 / n**2


def centroid(a):
  size = a.shape[-1]
  centers = (np.arange(size) + 0.5) / size
  total = a.sum(axis=(-2, -1))
  return (a.sum(-2) @ centers) / total, (a.sum(-1) @ centers) / total


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_render_geometry(shape):
  size, r = 64, 0.2
  clip = shapes.render_clip("green", shape, "right", 0.3, 0.4, r, 0.05, 3, size)
  assert clip.shape == (3, size, size, 3) and clip.dtype == np.uint8
  # Fully covered pixels carry exactly the palette color; the background is black.
  assert (clip.reshape(-1, 3) == shapes.COLORS["green"]).all(-1).sum() > 0
  assert (clip[:, 0, 0] == 0).all()
  a = alpha(clip, "green")
  np.testing.assert_allclose(
      a.sum((1, 2)) / size**2, shapes.shape_area(shape, r), atol=area_tolerance(r, size)
  )
  fine = alpha(shapes.render_clip("green", shape, None, 0.5, 0.5, r, 0, 1, size, 16), "green")
  np.testing.assert_allclose(fine.sum() / size**2, shapes.shape_area(shape, r), rtol=0.005)
  cx, _ = centroid(a)
  np.testing.assert_allclose(np.diff(cx), 0.05, atol=0.1 / size)
  # Deterministic.
  np.testing.assert_array_equal(
      clip, shapes.render_clip("green", shape, "right", 0.3, 0.4, r, 0.05, 3, size)
  )


def test_triangle_orientation():
  """Apex (x, y - r) on top, base (x +- r, y + r) at the bottom."""
  size = 100
  a = alpha(shapes.render_image("red", "triangle", 0.5, 0.5, 0.2, size, supersample=8), "red")
  rows = np.nonzero(a.max(1) > 0.5)[0]
  assert abs(rows[0] - 30) <= 1 and abs(rows[-1] - 69) <= 1
  top_width, base_width = (a[rows[0] + 2] > 0.5).sum(), (a[rows[-1]] > 0.5).sum()
  assert top_width < 6 and abs(base_width - 40) <= 2


def test_bad_names_raise():
  with pytest.raises(ValueError, match="color"):
    shapes.render_clip("pink", "circle", "left", 0.5, 0.5, 0.2, 0.04, 2, 8)
  with pytest.raises(ValueError, match="direction"):
    shapes.render_clip("red", "circle", "north", 0.5, 0.5, 0.2, 0.04, 2, 8)
  with pytest.raises(ValueError, match="at most"):
    shapes.example_params("video", "train", 0, frames=shapes.max_frames() + 1)


def test_params_are_resolution_independent_and_in_range():
  for i in range(200):
    p = shapes.example_params("video", "train", i, frames=16)
    assert shapes.SIZE_RANGE[0] <= p["r"] <= shapes.SIZE_RANGE[1]
    assert shapes.SPEED_RANGE[0] <= p["speed"] <= shapes.SPEED_RANGE[1]
    xs, ys = shapes.trajectory(p["direction"], p["x"], p["y"], p["speed"], 16)
    for c in (xs, ys):
      assert c.min() - p["r"] >= -1e-12 and c.max() + p["r"] <= 1 + 1e-12
  a = shapes.make_example("video", "train", 7, size=32)
  b = shapes.make_example("video", "train", 7, size=64)
  assert {k: a[k] for k in ("caption", "x", "y", "r")} == {
      k: b[k] for k in ("caption", "x", "y", "r")
  }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def load(data_dir, kind, split, frames=8, resolution=32):
  builder = shapes_tfds.shapes_builder(
      kind,
      resolution,
      frames,
      num_train=NUM_TRAIN,
      num_validation=NUM_VALIDATION,
      data_dir=data_dir,
  )
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


def names(example, kind):
  color = list(shapes.COLORS)[example["color"]]
  shape = shapes.SHAPES[example["shape"]]
  direction = list(shapes.DIRECTIONS)[example["direction"]] if kind == "video" else None
  return color, shape, direction


def test_video_train_split(data_dir):
  examples = load(data_dir, "video", "train")
  assert len(examples) == NUM_TRAIN
  for e in examples:
    color, shape, direction = names(e, "video")
    caption = e["caption"].decode()
    assert VIDEO_CAPTION.fullmatch(caption), caption
    assert caption == f"a {color} {shape} moving {direction}"
    assert (color, shape) not in shapes.HELD_OUT and not e["held_out"]
    video = e["video"]
    assert video.shape == (8, 32, 32, 3) and video.dtype == np.uint8
    # Inside the frame: every frame holds the whole area (a clipped object would lose some).
    xs, ys = shapes.trajectory(direction, e["x"], e["y"], e["speed"], 8)
    for c in (xs, ys):
      assert c.min() - e["r"] >= -1e-6 and c.max() + e["r"] <= 1 + 1e-6
    a = alpha(video, color)
    np.testing.assert_allclose(
        a.sum((1, 2)) / 32**2, shapes.shape_area(shape, e["r"]), atol=area_tolerance(e["r"], 32)
    )
    # Motion: the centroid moves `speed` per frame along the direction, not across it.
    cx, cy = centroid(a)
    dx, dy = shapes.DIRECTIONS[direction]
    steps = np.arange(8)
    np.testing.assert_allclose(cx - cx[0], dx * e["speed"] * steps, atol=0.3 / 32)
    np.testing.assert_allclose(cy - cy[0], dy * e["speed"] * steps, atol=0.3 / 32)
    assert shapes.SPEED_RANGE[0] <= e["speed"] <= shapes.SPEED_RANGE[1] + 1e-6
    assert e["fps"] == shapes_tfds.FPS
  assert len({e["caption"] for e in examples}) > 20  # varied


def test_video_validation_has_held_out_flagged(data_dir):
  examples = load(data_dir, "video", "validation")
  seen = set()
  for e in examples:
    color, shape, direction = names(e, "video")
    assert e["caption"].decode() == f"a {color} {shape} moving {direction}"
    assert bool(e["held_out"]) == ((color, shape) in shapes.HELD_OUT)
    seen.add((color, shape))
  assert shapes.HELD_OUT <= seen and len(seen) == 18


def test_image_split(data_dir):
  seen = set()
  for split in ("train", "validation"):
    for e in load(data_dir, "image", split):
      color, shape, _ = names(e, "image")
      assert IMAGE_CAPTION.fullmatch(e["caption"].decode())
      assert e["caption"].decode() == f"a {color} {shape}"
      assert bool(e["held_out"]) == ((color, shape) in shapes.HELD_OUT)
      assert e["image"].shape == (32, 32, 3)
      a = alpha(e["image"], color)
      np.testing.assert_allclose(
          a.sum() / 32**2, shapes.shape_area(shape, e["r"]), atol=area_tolerance(e["r"], 32)
      )
      seen.add((color, shape))
  assert shapes.HELD_OUT <= seen  # held-out compositions appear as images


def test_build_is_deterministic(data_dir, tmp_path):
  a = load(data_dir, "video", "train")
  b = load(tmp_path, "video", "train")
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["video"], y["video"])
    assert x["caption"] == y["caption"]


def test_config_names(data_dir):
  c = shapes_tfds.ShapesConfig.from_name("video_48_12_train5_val3")
  assert (c.kind, c.resolution, c.frames, c.num_train, c.num_validation) == ("video", 48, 12, 5, 3)
  assert shapes_tfds.ShapesConfig.make("image", 64).name == "image_64"
  assert shapes_tfds.config_name("video", 32, 8) == "video_32_8"
  for bad in ("video_32", "image_32_8", "video_32_8_foo", "video_32_8_train10000", "video_32_99"):
    with pytest.raises(ValueError):
      shapes_tfds.ShapesConfig.from_name(bad)
  # An arbitrary config through the TFDS registry, at another resolution and length.
  builder = tfds.builder("vldm_shapes/video_20_5_train4_val3", data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  assert builder.as_data_source("train")[0]["video"].shape == (5, 20, 20, 3)
  assert len(builder.as_data_source("validation")) == 3
  # A constructed config object is accepted too.
  built = shapes_tfds.VldmShapes(
      config=shapes_tfds.ShapesConfig.make("video", 20, 5, 4, 3), data_dir=data_dir
  )
  assert built.is_prepared()


def test_config_to_pipeline(data_dir):
  from vldm.data import config as config_lib  # pylint: disable=g-import-not-at-top
  from vldm.data import sources  # pylint: disable=g-import-not-at-top

  c = config_lib.data_config(
      "shapes",
      kind="image",
      resolution=32,
      batch_size=8,
      num_train_examples=NUM_TRAIN,
      num_validation_examples=NUM_VALIDATION,
      data_dir=str(data_dir),
  )
  batch = next(sources.make_pipeline(c, process_index=0, process_count=1))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["held_out"].shape == (8,)
  # Held-out evaluation: the video validation split, once, in order, no caption dropout.
  c = config_lib.data_config(
      "shapes",
      kind="video",
      resolution=16,
      batch_size=8,
      num_train_examples=NUM_TRAIN,
      num_validation_examples=NUM_VALIDATION,
      source_resolution=32,
      data_dir=str(data_dir),
  )
  batches = list(sources.make_pipeline(c, train=False, process_index=0, process_count=1))
  assert len(batches) == NUM_VALIDATION // 8
  assert batches[0]["video"].shape == (8, 8, 16, 16, 3)  # resized from the 32-pixel build
  captions = sum((b["caption"] for b in batches), [])
  held = np.concatenate([b["held_out"] for b in batches])
  assert "" not in captions and held.sum() >= 3
  for caption, flag in zip(captions, held):
    color, shape = caption.split()[1:3]
    assert flag == ((color, shape) in shapes.HELD_OUT)


# Tempo: the same motion filmed at k x the frame rate (long clips, interpolation training clips).


def test_tempo_one_is_the_original_dataset():
  # Regression values of the original renderer (before tempos existed).
  p = shapes.example_params("video", "train", 0, frames=8)
  assert (p["color"], p["shape"], p["direction"]) == ("blue", "square", "down")
  assert (p["x"], p["r"], p["speed"]) == (
      0.787995353676578,
      0.1845710440164981,
      0.05402724260675916,
  )
  assert (p["tempo"], p["fps"]) == (1.0, shapes_tfds.FPS)
  assert shapes.max_frames() == shapes.max_frames(1.0) == 25
  for kind, split, index in (
      ("video", "train", 3),
      ("video", "validation", 5),
      ("image", "train", 2),
  ):
    default = shapes.make_example(kind, split, index, frames=12, size=8, seed=1)
    explicit = shapes.make_example(kind, split, index, frames=12, size=8, seed=1, tempos=(1.0,))
    np.testing.assert_array_equal(default[kind], explicit[kind])
    assert {k: v for k, v in default.items() if k != kind} == {
        k: v for k, v in explicit.items() if k != kind
    }


def test_tempo_scales_speed_and_fps():
  assert shapes.max_frames(4) == 97 and shapes.max_frames(2.5) == 61
  low, high = shapes.SPEED_RANGE[0] / 4, shapes.SPEED_RANGE[1] / 4
  for i in range(30):
    p = shapes.example_params("video", "train", i, frames=16, tempos=(4.0,))
    assert low <= p["speed"] <= high and p["tempo"] == 4.0 and p["fps"] == 32.0


def test_long_clip_at_tempo_2_5_stays_inside_the_frame():
  frames, size = 32, 16
  for i in range(12):
    e = shapes.make_example("video", "train", i, frames=frames, size=size, tempos=(2.5,))
    xs, ys = shapes.trajectory(e["direction"], e["x"], e["y"], e["speed"], frames)
    for c in (xs, ys):
      assert c.min() - e["r"] >= -1e-12 and c.max() + e["r"] <= 1 + 1e-12
    a = alpha(e["video"], e["color"])
    # A clipped object would lose area at the border; every frame keeps all of it.
    np.testing.assert_allclose(
        a.sum((1, 2)) / size**2,
        shapes.shape_area(e["shape"], e["r"]),
        atol=area_tolerance(e["r"], size),
    )


def test_mixed_tempos():
  validation = [
      shapes.example_params("video", "validation", i, frames=9, tempos=(4, 16)) for i in range(4)
  ]
  assert {p["tempo"] for p in validation} == {4.0, 16.0}
  assert all(p["fps"] == 8 * p["tempo"] for p in validation)
  train = [shapes.example_params("video", "train", i, frames=9, tempos=(4, 16)) for i in range(40)]
  assert {p["tempo"] for p in train} == {4.0, 16.0}
  for p in train:
    assert shapes.SPEED_RANGE[0] / p["tempo"] <= p["speed"] <= shapes.SPEED_RANGE[1] / p["tempo"]
  # Every composition meets both tempos over its validation visits.
  tempos = {}
  for i in range(72):
    p = shapes.example_params("video", "validation", i, frames=9, tempos=(4, 16))
    tempos.setdefault((p["color"], p["shape"]), set()).add(p["tempo"])
  assert all(t == {4.0, 16.0} for t in tempos.values())


def test_bad_tempos_raise():
  for bad in ((0,), (-1.0,), (), (float("nan"),)):
    with pytest.raises(ValueError, match="> 0"):
      shapes.example_params("video", "train", 0, tempos=bad)
  with pytest.raises(ValueError, match="at most 97 frames"):
    shapes.example_params("video", "train", 0, frames=98, tempos=(4.0,))
  with pytest.raises(ValueError, match="videos only"):
    shapes.example_params("image", "train", 0, tempos=(4.0,))
  with pytest.raises(ValueError, match=r"Frames must be in \[1, 61\] at tempo 2.5"):
    shapes_tfds.ShapesConfig.from_name("video_32_62_tempo2.5")
  with pytest.raises(ValueError, match="> 0"):
    shapes_tfds.ShapesConfig.from_name("video_32_8_tempo0")
  with pytest.raises(ValueError, match=r"_tempo<k>\[-<k2>...\]"):
    shapes_tfds.ShapesConfig.from_name("video_32_8_train5_tempo4")
  with pytest.raises(ValueError, match="video configs only"):
    shapes_tfds.ShapesConfig.from_name("image_32_tempo4")


def test_tempo_config_names():
  for name, tempos in (
      ("video_32_9_tempo4-16", (4.0, 16.0)),
      ("video_32_32_tempo2.5", (2.5,)),
      ("video_8_9_tempo1-4_train4_val4_seed2", (1.0, 4.0)),
  ):
    c = shapes_tfds.ShapesConfig.from_name(name)
    assert c.tempos == tempos
    assert (
        shapes_tfds.config_name(
            c.kind, c.resolution, c.frames, c.num_train, c.num_validation, c.seed, c.tempos
        )
        == name
    )
  assert shapes_tfds.config_name("video", 32, 9, tempos=(16, 4, 4)) == "video_32_9_tempo4-16"
  assert shapes_tfds.config_name("video", 32, 8, tempos=(1.0,)) == "video_32_8"
  for non_canonical, canonical in (
      ("video_32_9_tempo16-4", "video_32_9_tempo4-16"),
      ("video_32_9_tempo4.0", "video_32_9_tempo4"),
      ("video_32_8_tempo1", "video_32_8"),
  ):
    with pytest.raises(ValueError, match=f"use '{canonical}'"):
      shapes_tfds.ShapesConfig.from_name(non_canonical)


def test_tempo_dataset_and_config(tmp_path):
  from vldm.data import config as config_lib  # pylint: disable=g-import-not-at-top
  from vldm.data import sources  # pylint: disable=g-import-not-at-top

  c = config_lib.data_config(
      "shapes",
      resolution=8,
      frames=9,
      tempos=(4.0, 16.0),
      num_train_examples=4,
      num_validation_examples=4,
      data_dir=str(tmp_path),
  )
  builder = sources.make_builder(c)
  assert builder.builder_config.name == "video_8_9_tempo4-16_train4_val4"
  builder.download_and_prepare(file_format="array_record")
  examples = list(builder.as_data_source("validation"))
  assert {float(e["tempo"]) for e in examples} == {4.0, 16.0}
  for e in examples:
    assert e["video"].shape == (9, 8, 8, 3) and e["fps"] == 8 * e["tempo"]
  # path_frames: whole 32-frame motions are stored; training clips are windows of them.
  long = config_lib.data_config(
      "shapes",
      resolution=8,
      frames=8,
      tempos=(2.5,),
      path_frames=32,
      num_train_examples=4,
      num_validation_examples=4,
  )
  assert sources.make_builder(long).builder_config.name == "video_8_32_tempo2.5_train4_val4"
  # Tempo-1 configs keep their features: no 'tempo'.
  plain = shapes_tfds.shapes_builder("video", 8, 9, 4, 4, data_dir=str(tmp_path))
  assert "tempo" not in plain.info.features and "fps" in plain.info.features
  for bad in (
      dict(tempos=(0.0,)),
      dict(tempos=(4.0,), kind="image"),
      dict(name="ucf101", tempos=(2.0,)),
  ):
    with pytest.raises(ValueError, match="data.tempos"):
      config_lib.data_config(**bad)
