"""FVD, frame FID, CLIPSIM and the shapes oracle of generated clips against real clips.

  protocol = Protocol(num_clips=2048, num_frames=16)
  evaluator = Evaluator(("fvd", "fid", "clipsim"), protocol, i3d_weights=..., inception_weights=...,
                        clip=...)
  real = evaluator.real_stats(read_folder("real/", protocol), cache_dir="stats/")
  evaluator.evaluate(read_folder("generated/", protocol), real)
  # {'fvd': …, 'fid': …, 'clipsim': …, 'clip_score': …, 'protocol': {…}, 'counts': {…}}

The protocol (every number is reported with it, since FVD changes with each of them):
  clips        at most `num_clips` clips of each set: a video's first clip, videos in sorted order
               (a clip list's rows in its order); the number actually used is reported.
  frames       `num_frames` frames a clip, every `frame_stride`-th from the clip's first frame;
               shorter videos are skipped and counted.
  fvd          I3D (cd-fvd's PyTorch I3D; weights i3d_pretrained_400.pt): each clip bilinearly
               resized to 224×224 (align_corners=False, no antialiasing), scaled to [-1, 1]; the
               feature is the 400 Kinetics logits averaged over time (cd-fvd's FVD feature).
  fid          the FID InceptionV3 (pytorch-fid / torch-fidelity's TF port) pool3, 2048-d, on
               `fid_frames` evenly spaced frames of each clip (0: all), each resized to 299×299
               as TF1's bilinear resize does (torch-fidelity's).
  distance     the Fréchet distance of the two feature sets' Gaussians, float64, the square root of
               the covariance product by scipy.linalg.sqrtm (vldm.eval.frechet).
  clipsim      the cosine of CLIP's image embedding of each frame with the clip's caption embedding,
               unscaled, averaged over the clip's frames, then over clips (CLIPSIM as GODIVA and
               most text-to-video papers report it); `clip_score` is torchmetrics' CLIPScore on the
               same pairs: max(100·cos, 0). Frames are centre-cropped square, then CLIP-resized.
  oracle       the shapes oracle's accuracy (vldm.eval.oracle), for prompts of the shapes dataset.

Real-set statistics depend only on the real clips, the protocol and the network weights: they are
cached under a key of all three (file names, sizes and modification times; the weights file's),
so the next evaluation against the same set reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
from typing import Mapping, Optional, Sequence

import imageio.v3 as iio
import numpy as np
import tqdm

from vldm import video_io
from vldm.data import transforms
from vldm.eval import features
from vldm.eval import frechet
from vldm.eval import metrics as oracle_metrics
from vldm.eval import oracle
from vldm.models import fid_inception
from vldm.models import i3d

log = logging.getLogger(__name__)

METRICS = ("fvd", "fid", "clipsim", "oracle")
FEATURE_METRICS = ("fvd", "fid")  # computed from feature statistics against the real set
SAMPLES_FILE = "samples.json"  # vldm.sample's list of {file, mp4, prompt, seed}


class EvaluationError(ValueError):
  """Bad input: the message says what was wrong and what is accepted."""


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How clips are taken from a set and fed to the networks (see the module docstring)."""

  num_clips: int = 2048
  num_frames: int = 16
  frame_stride: int = 1
  fid_frames: int = 0  # frames per clip for FID, evenly spaced; 0: all num_frames

  def __post_init__(self):
    if self.num_clips < 2 or self.num_frames < 1 or self.frame_stride < 1 or self.fid_frames < 0:
      raise EvaluationError(
          f"Need num_clips >= 2 (a covariance), num_frames >= 1, frame_stride >= 1 and "
          f"fid_frames >= 0; got {self}."
      )

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def fid_indices(self) -> np.ndarray:
    n = self.fid_frames or self.num_frames
    return np.unique(np.linspace(0, self.num_frames - 1, min(n, self.num_frames)).round()).astype(
        int
    )


@dataclasses.dataclass
class ClipSet:
  """Clips uint8 [F, H, W, 3] with their captions (None where unknown) and where they came from."""

  clips: list
  captions: list
  sources: list
  skipped: dict = dataclasses.field(default_factory=dict)  # reason → [source]
  folder: Optional[str] = None

  def __len__(self):
    return len(self.clips)


def _entries(folder):
  """[(file, start_frame, caption or None)] of a folder: vldm.sample's samples.json, else the
  captions file (a curated clip list's frame ranges too), else every video file uncaptioned."""
  from vldm.data import video_folder  # pylint: disable=g-import-not-at-top  # tensorflow-datasets

  samples = os.path.join(folder, SAMPLES_FILE)
  if os.path.isfile(samples):
    with open(samples, encoding="utf-8") as f:
      return [(r.get("mp4") or r["file"], 0, r.get("prompt")) for r in json.load(f)]
  try:
    path = video_folder.captions_path(folder)
  except ValueError:
    return [(file, 0, None) for file in video_io.list_videos(folder)]
  return [(r["file"], r["start_frame"], r["caption"]) for r in video_folder.read_captions(path)]


def read_clip(path, start, num_frames, stride):
  """Frames start, start + stride, … (num_frames of them) of a video, uint8 [F, H, W, 3]; decoding
  stops at the last one. None when the video is shorter."""
  end = start + (num_frames - 1) * stride
  frames = []
  for index, frame in enumerate(iio.imiter(path)):
    if index >= start and (index - start) % stride == 0:
      frames.append(transforms.to_rgb(frame))
    if index >= end:
      break
  return np.stack(frames) if len(frames) == num_frames else None


def read_folder(folder: str, protocol: Protocol) -> ClipSet:
  """The protocol's clips of a folder of MP4 / GIF / … videos (see `_entries` for which)."""
  if not folder or not os.path.isdir(folder):
    raise EvaluationError(f"{folder!r} is not a folder of videos.")
  entries = _entries(folder)
  if not entries:
    raise EvaluationError(
        f"No videos in {folder!r}: looked for {SAMPLES_FILE}, a captions file (captions.csv / "
        f"captions.jsonl) and files ending in {', '.join(video_io.VIDEO_EXTENSIONS)}."
    )
  out = ClipSet([], [], [], {}, folder)
  bar = tqdm.tqdm(
      total=min(protocol.num_clips, len(entries)),
      desc=f"read {os.path.basename(os.path.normpath(folder))}",
      disable=not sys.stderr.isatty(),
  )
  for file, start, caption in entries:
    if len(out) == protocol.num_clips:
      break
    source = f"{file}@{start}" if start else file
    try:
      clip = read_clip(
          os.path.join(folder, file), start, protocol.num_frames, protocol.frame_stride
      )
    except (OSError, ValueError, RuntimeError) as e:  # imageio / pyav read errors
      log.warning("vldm.evaluate: skipping unreadable %s (%s)", source, e)
      out.skipped.setdefault("unreadable", []).append(source)
      continue
    if clip is None:
      out.skipped.setdefault("too_short", []).append(source)
      continue
    out.clips.append(clip)
    out.captions.append(caption)
    out.sources.append(source)
    bar.update()
  bar.close()
  log.info("vldm.evaluate: %d clips from %s", len(out), folder)
  if out.skipped:
    log.warning(
        "vldm.evaluate: %s: skipped %s.",
        folder,
        ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in out.skipped.items()),
    )
  return out


def resolutions(clips: ClipSet) -> list[str]:
  """The clips' frame sizes, 'HxW', sorted: part of the protocol a number was computed under."""
  return sorted({f"{c.shape[1]}x{c.shape[2]}" for c in clips.clips})


def clip_set(clips, captions=None) -> ClipSet:
  """In-memory clips (uint8 or float in [0, 1], [N, F, H, W, 3]) as a ClipSet."""
  clips = [video_io.to_uint8(c) for c in clips]
  captions = list(captions) if captions is not None else [None] * len(clips)
  if len(captions) != len(clips):
    raise EvaluationError(f"{len(clips)} clips for {len(captions)} captions.")
  return ClipSet(clips, captions, [str(i) for i in range(len(clips))])


def _by_shape(arrays):
  """{shape: indices} so that equal-sized inputs share batches."""
  groups = {}
  for i, a in enumerate(arrays):
    groups.setdefault(a.shape, []).append(i)
  return groups


def _file_key(path):
  stat = os.stat(path)
  return [os.path.abspath(path), stat.st_size, int(stat.st_mtime)]


class Evaluator:
  """The metrics' networks (loaded once) and the computations of the module docstring."""

  def __init__(
      self,
      metrics: Sequence[str],
      protocol: Protocol = Protocol(),
      *,
      i3d_weights: str = "",
      inception_weights: str = "",
      clip: str = "",
      batch_size: int = 8,
  ):
    self.metrics = tuple(m.strip() for m in metrics if m.strip())
    unknown = [m for m in self.metrics if m not in METRICS]
    if unknown or not self.metrics:
      raise EvaluationError(
          f"Unknown metrics {unknown or metrics}; accepted: {', '.join(METRICS)}."
      )
    needs = {"fvd": ("i3d_weights", i3d_weights), "fid": ("inception_weights", inception_weights)}
    needs["clipsim"] = ("clip", clip)
    missing = [f"{m} needs --{needs[m][0]}" for m in self.metrics if m in needs and not needs[m][1]]
    if missing:
      raise EvaluationError(f"{'; '.join(missing)} (weights are never downloaded).")
    self.protocol = protocol
    self.networks = {}
    self.weights = {}
    if "fvd" in self.metrics:
      self.networks["fvd"] = features.I3DFeatures(i3d_weights, batch_size)
      self.weights["fvd"] = _file_key(i3d_weights)
    if "fid" in self.metrics:
      self.networks["fid"] = features.InceptionFeatures(inception_weights, 4 * batch_size)
      self.weights["fid"] = _file_key(inception_weights)
    self.clip = (
        features.ClipEmbedder(clip, 4 * batch_size, flag="--clip")
        if "clipsim" in self.metrics
        else None
    )

  # --- features -----------------------------------------------------------------------------

  def _inputs(self, metric, clips):
    if metric == "fvd":
      return clips
    return [c[self.protocol.fid_indices()] for c in clips]  # fid: frames

  def feature_stats(self, clips: Sequence[np.ndarray]) -> dict:
    """{metric: FeatureStats} of the clips for fvd / fid."""
    out = {}
    for metric in FEATURE_METRICS:
      if metric not in self.networks:
        continue
      network = self.networks[metric]
      stats = frechet.FeatureStats(network.dim)
      inputs = self._inputs(metric, clips)
      for indices in _by_shape(inputs).values():
        batch = np.stack([inputs[i] for i in indices])
        if metric == "fid":
          batch = batch.reshape((-1,) + batch.shape[2:])  # every frame of every clip
        stats.add(network(batch))
      out[metric] = stats
    return out

  def _cache_key(self, clips: ClipSet) -> str:
    files = []
    for source in clips.sources:
      file = source.split("@")[0]
      files.append([source] + _file_key(os.path.join(clips.folder, file))[1:])
    key = dict(
        folder=os.path.abspath(clips.folder),
        files=files,
        protocol=self.protocol.as_dict(),
        weights={m: self.weights[m] for m in sorted(self.weights)},
    )
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

  def real_stats(self, real: ClipSet, cache_dir: Optional[str] = None) -> dict:
    """{metric: FeatureStats} of the real clips, read from / written to `cache_dir` when given
    (and the clips came from a folder)."""
    if not self.networks:
      return {}
    paths = {}
    if cache_dir and real.folder:
      os.makedirs(cache_dir, exist_ok=True)
      key = self._cache_key(real)
      paths = {m: os.path.join(cache_dir, f"real-{m}-{key}.npz") for m in self.networks}
      if all(os.path.isfile(p) for p in paths.values()):
        log.info("vldm.evaluate: real statistics from %s", cache_dir)
        return {m: frechet.FeatureStats.load(p) for m, p in paths.items()}
    stats = self.feature_stats(real.clips)
    for metric, path in paths.items():
      stats[metric].save(path)
    return stats

  # --- metrics ------------------------------------------------------------------------------

  def clipsim(self, clips: ClipSet) -> dict:
    pairs = [(c, t) for c, t in zip(clips.clips, clips.captions) if t]
    if not pairs:
      raise EvaluationError(
          "clipsim needs captions for the generated clips (vldm.sample's samples.json, or a "
          "captions file in the folder); none were found."
      )
    texts = self.clip.caption_embeds([t for _, t in pairs])
    frames = np.concatenate([c for c, _ in pairs])
    images = features.l2_normalize(self.clip.image_embeds(frames))
    per_clip, start = [], 0
    for (clip, _), text in zip(pairs, texts):
      per_clip.append(images[start : start + len(clip)] @ text)
      start += len(clip)
    return dict(
        clipsim=float(np.mean([c.mean() for c in per_clip])),
        clip_score=float(np.mean([np.maximum(100 * c, 0).mean() for c in per_clip])),
        clipsim_clips=len(per_clip),
    )

  def evaluate(self, generated: ClipSet, real: Optional[Mapping] = None) -> dict:
    """The metrics of `generated` (against the real statistics for fvd / fid), with the protocol
    and the numbers of clips used."""
    if len(generated) < 2 and any(m in self.networks for m in self.metrics):
      raise EvaluationError(f"Need at least 2 generated clips; got {len(generated)}.")
    out = {}
    stats = self.feature_stats(generated.clips)
    for metric, s in stats.items():
      if real is None or metric not in real:
        raise EvaluationError(f"{metric} needs the real set's statistics.")
      out[metric] = frechet.frechet_distance_of(s, real[metric])
    if self.clip is not None:
      out.update(self.clipsim(generated))
    if "oracle" in self.metrics:
      records = oracle.judge_all(generated.clips, generated.captions)
      summary = oracle_metrics.summarize(records)["overall"]
      out.update({f"oracle_{k}": v for k, v in summary.items() if k != "clips"})
    out["protocol"] = dict(
        self.protocol.as_dict(),
        i3d_input=i3d.RESOLUTION if "fvd" in self.networks else None,
        inception_input=fid_inception.INPUT_SIZE if "fid" in self.networks else None,
    )
    out["counts"] = dict(  # features: clips for fvd, frames for fid
        generated_clips=len(generated),
        generated_resolutions=resolutions(generated),
        generated_skipped={k: len(v) for k, v in generated.skipped.items()},
        generated_features={m: s.count for m, s in stats.items()},
        real_features={m: s.count for m, s in (real or {}).items()},
    )
    return out


class DuringTraining:
  """A training run's `config.eval`: the metrics the trainer logs every `eval_every` steps.

  The prompts are `eval.prompts`, else the captions of the first `eval.num_clips` clips of
  `eval.real`; they and the sampling key stay fixed, so the numbers are comparable over steps. The
  real set's statistics are computed at the first evaluation (cached in `eval.stats_cache` when
  set) and kept.
  """

  def __init__(self, eval_config, clip_frames: int):
    c = eval_config
    frames = min(c.num_frames or clip_frames, clip_frames)
    self.protocol = Protocol(max(c.num_clips, 2), frames, 1, c.fid_frames)
    self.evaluator = Evaluator(
        c.metrics.split(","),
        self.protocol,
        i3d_weights=c.i3d_weights,
        inception_weights=c.inception_weights,
        clip=c.clip,
        batch_size=c.batch_size,
    )
    self.real = read_folder(c.real, self.protocol) if c.real else None
    self.prompts = list(c.prompts) or [t for t in (self.real.captions if self.real else []) if t]
    if not self.prompts:
      raise EvaluationError(
          "config.eval needs prompts: eval.prompts, or eval.real (a folder of captioned clips)."
      )
    if self.evaluator.networks and self.real is None:
      raise EvaluationError(
          f"eval.metrics {c.metrics!r} compare with real clips: set eval.real to a folder of them."
      )
    self.batch_size, self.stats_cache = c.batch_size, c.stats_cache or None
    self._real_stats = None

  def __call__(self, generate, rng) -> dict:
    """generate(prompts, rng) → clips [B, F, H, W, 3] in [0, 1]; returns {metric: float}."""
    import jax  # pylint: disable=g-import-not-at-top

    clips = []
    for i in range(0, len(self.prompts), self.batch_size):
      batch = self.prompts[i : i + self.batch_size]
      out = np.asarray(jax.device_get(generate(batch, jax.random.fold_in(rng, i))))
      clips += [c[: self.protocol.num_frames] for c in out]
    if self._real_stats is None and self.real is not None:
      self._real_stats = self.evaluator.real_stats(self.real, self.stats_cache)
    result = self.evaluator.evaluate(clip_set(clips, self.prompts), self._real_stats)
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float))}
