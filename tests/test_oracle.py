"""The shapes oracle (vldm.eval): right on rendered clips, sharp and blurred; wrong on noise."""
import numpy as np
import pytest
from scipy import ndimage

from vldm.data import shapes
from vldm.data import shapes_tfds
from vldm.eval import metrics
from vldm.eval import oracle

NUM_VALIDATION = 144  # every composition x direction, twice


def blur(clip, sigma):
  """A Gaussian blur of sigma pixels per frame; float in [0, 1]."""
  return ndimage.gaussian_filter(np.asarray(clip, np.float64), (0, sigma, sigma, 0)) / 255.0


@pytest.fixture(scope="module")
def builder_clips(tmp_path_factory):
  """Validation clips of the TFDS builder at 32 px: every composition and direction."""
  builder = shapes_tfds.shapes_builder("video", 32, 8, num_train=1, num_validation=NUM_VALIDATION,
                                       data_dir=str(tmp_path_factory.mktemp("tfds")))
  builder.download_and_prepare(file_format="array_record")
  source = builder.as_data_source("validation")
  examples = [source[i] for i in range(len(source))]
  return [e["video"] for e in examples], [e["caption"].decode() for e in examples]


def accuracy(clips, prompts):
  records = oracle.judge_all(clips, prompts)
  return np.mean([r["correct"]["all"] for r in records]), records


@pytest.mark.parametrize("sigma", [0.0, 0.7])
def test_builder_clips_sharp_and_blurred(builder_clips, sigma):
  clips, prompts = builder_clips
  assert len(set(prompts)) == 72
  if sigma:
    clips = [blur(c, sigma) for c in clips]
  acc, records = accuracy(clips, prompts)
  assert acc >= 0.99, [r for r in records if not r["correct"]["all"]][:3]
  assert np.mean([r["consistency"] for r in records]) >= 0.9


@pytest.mark.parametrize("sigma", [0.0, 1.4])
def test_rendered_clips_at_64(sigma):
  examples = [shapes.make_example("video", "validation", i, 8, 64) for i in range(72)]
  clips = [e["video"] if not sigma else blur(e["video"], sigma) for e in examples]
  acc, records = accuracy(clips, [e["caption"] for e in examples])
  assert acc >= 0.99
  assert np.mean([r["consistency"] for r in records]) >= 0.9


def test_images_are_static():
  examples = [shapes.make_example("image", "validation", i, size=32) for i in range(36)]
  acc, _ = accuracy([e["image"] for e in examples], [e["caption"] for e in examples])
  assert acc >= 0.99
  assert oracle.judge(examples[0]["image"]).direction == oracle.STATIC


def test_wrong_attributes_are_caught():
  clip = shapes.render_clip("red", "square", "left", 0.7, 0.5, 0.2, 0.05, 8, 32)
  j = oracle.judge(clip)
  assert (j.color, j.shape, j.direction) == ("red", "square", "left")
  assert oracle.score(j, "a red square moving left")["all"]
  assert oracle.score(j, "a blue square moving left") == dict(color=False, shape=True,
                                                              direction=True, all=False)
  assert not oracle.score(j, "a red circle moving left")["shape"]
  assert not oracle.score(j, "a red square moving right")["direction"]
  still = shapes.render_clip("red", "square", None, 0.5, 0.5, 0.2, 0.0, 8, 32)
  assert oracle.judge(still).direction == oracle.STATIC
  assert not oracle.score(oracle.judge(still), "a red square moving left")["all"]


def test_noise_is_wrong():
  rng = np.random.default_rng(0)
  prompts = [shapes.video_caption(c, s, d) for c in shapes.COLORS for s in shapes.SHAPES
             for d in shapes.DIRECTIONS]
  noise = [rng.uniform(size=(8, 32, 32, 3)) for _ in prompts]
  acc, records = accuracy(noise, prompts)
  assert acc == 0.0
  gray = rng.uniform(0.4, 0.6, size=(8, 32, 32, 1)) * np.ones(3)
  assert not oracle.score(oracle.judge(gray), prompts[0])["all"]
  black = np.zeros((8, 32, 32, 3), np.uint8)
  assert oracle.judge(black).color is None and not oracle.score(oracle.judge(black), prompts[0])["all"]


def test_consistency_drops_with_flicker():
  steady = shapes.render_clip("green", "triangle", "down", 0.5, 0.3, 0.2, 0.05, 8, 32)
  morphing = np.stack([shapes.render_clip("green", s, None, 0.5, 0.3 + 0.05 * t, 0.2, 0, 1, 32)[0]
                       for t, s in enumerate(["triangle", "circle", "square", "triangle"] * 2)])
  blinking = steady.copy()
  blinking[1::2] = 0
  assert oracle.temporal_consistency(steady) >= 0.9
  assert oracle.temporal_consistency(morphing) < 0.85
  assert oracle.temporal_consistency(blinking) < 0.1


def test_parse_prompt():
  assert oracle.parse_prompt("a red circle moving left") == ("red", "circle", "left")
  assert oracle.parse_prompt("a cyan square") == ("cyan", "square", None)
  for bad in ("a purple circle", "a red hexagon moving up", "red circle", "a red circle moving in"):
    with pytest.raises(ValueError, match="prompt|Unknown"):
      oracle.parse_prompt(bad)
  with pytest.raises(ValueError, match="clip"):
    oracle.judge(np.zeros((8, 32, 32)))


def test_summary_table():
  clip = shapes.render_clip("cyan", "circle", "up", 0.5, 0.7, 0.15, 0.05, 8, 32)
  records = oracle.judge_all([clip, clip], ["a cyan circle moving up", "a red circle moving up"])
  summary = metrics.summarize(records)
  assert summary["held_out"]["all"] == 1.0 and summary["seen"]["all"] == 0.0
  assert summary["overall"]["color"] == 0.5 and summary["overall"]["direction"] == 1.0
  assert summary["prompts"] == {"a cyan circle moving up": (1, 1), "a red circle moving up": (0, 1)}
  table = metrics.markdown_table(summary)
  assert "| held-out | 1 | 100.0% | 100.0% | 100.0% | 100.0% |" in table
