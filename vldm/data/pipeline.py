"""Host-sharded, exactly resumable input pipeline over a random-access source -> global jax.Arrays.

A source is anything with `len(source)` and `source[i] -> dict` (a TFDS `as_data_source()`, a
`LatentCache`, a list of dicts). Examples hold either pixels, 'video' uint8 [T, H, W, 3] (or a list
of frames) or 'image' uint8 [H, W, 3], or cached encoder outputs ('latents', text embeddings, ...),
plus 'caption' (str or bytes) and optionally 'fps', 'motion' and 'held_out'.

The sample order is a pure function of (seed, epoch): the epoch's permutation of all indices, cut
into global batches; process p of n reads rows [p*B/n, (p+1)*B/n) of every global batch, so the
hosts read disjoint data, together cover the epoch (less the remainder when dropped), and the global
stream does not depend on the number of hosts. Per-example randomness (clip start, stride, crop,
caption dropout) is seeded by (seed, epoch, example index). The iterator state is therefore a few
integers, `{'epoch', 'position', ...}`: restoring it resumes the identical stream.

Captions: an example holds 'caption', and may hold several, 'captions', with the names of their
captioners, 'captioners' (parallel; '' unnamed), as the video-folder dataset stores them. With
max_captions = 1 (the default) 'caption' is used. With max_captions > 1, one of the example's first
max_captions 'captions' is drawn with probability proportional to its captioner's weight in
`caption_weights` (captioner name -> weight >= 0): captioners it does not name weigh 0; empty
`caption_weights` (or an example whose every caption weighs 0) draws uniformly. Stable Video
Diffusion trains so on three captioners with fixed probabilities. The draw uses the example's rng
(after the clip, crop and dropout draws), so the stream stays a pure function of (seed, epoch,
index); caption dropout applies to the drawn caption. A latent cache built with max_captions > 1
holds every candidate's text fields [K, ...] and their probabilities ('caption_weights' [K]); the
draw picks a row of each text field (the keys of the cache's `null_text`) with the caption.

Batches are dicts: 'video' float32 [B, F, H, W, 3] in [-1, 1] (or 'image' [B, H, W, 3]; or the
cached fields), 'fps' float32 [B] (source fps / frame stride, for micro-conditioning), 'index' int32
[B] (source indices), 'motion' float32 [B] (the clip's motion score, frame short sides per second,
see vldm.data.motion; from the source, which scored the stored clip: a unit independent of the
frame stride) and 'held_out' bool [B] when the source has them, 'clip_start' bool [B] with
clip_start_prob > 0 -- global jax.Arrays when a
sharding is given, else numpy -- and 'caption', the list of this process's captions (host strings,
for the caller to tokenize; '' where dropped for classifier-free guidance).
"""

import collections
import concurrent.futures
import math
import numbers

import jax
import numpy as np

from vldm.data import transforms

DEFAULT_FPS = 8.0  # for sources without a frame rate
PIXEL_KEYS = ("video", "image")
# Per-example metadata, handled by name rather than passed through as a cached encoder field.
METADATA_KEYS = (
    "caption",
    "captions",
    "captioners",
    "caption_weights",
    "fps",
    "motion",
    "held_out",
    "index",
)


def caption_text(caption):
  return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def check_caption_weights(weights, key="caption_weights"):
  """`weights` (a dict or ConfigDict captioner name -> number >= 0; None: empty) as a dict of
  floats. Anything else is a ValueError naming `key`."""
  if weights is None:
    return {}
  if not hasattr(weights, "items") or isinstance(weights, str):
    raise ValueError(
        f"{key} must be a dict captioner name -> weight >= 0, e.g. {{'a': 0.8, 'b': 0.2}} "
        f"({{}}: uniform); got {weights!r}."
    )
  out = {}
  for name, weight in weights.items():
    if (
        isinstance(weight, bool)
        or not isinstance(weight, numbers.Real)
        or not math.isfinite(weight)
        or weight < 0
    ):
      raise ValueError(
          f"{key}[{name!r}] must be a finite number >= 0 (a captioner's weight); got {weight!r}."
      )
    out[str(name)] = float(weight)
  return out


def caption_probabilities(captioners, weights):
  """float64 [len(captioners)]: each caption's chance, proportional to its captioner's weight in
  `weights` (unnamed there: 0); uniform when `weights` is empty or weighs every caption 0."""
  n = len(captioners)
  p = np.array([weights.get(c, 0.0) for c in captioners], np.float64) if weights else np.ones(n)
  total = p.sum()
  return p / total if total > 0 else np.full(n, 1.0 / n)


def draw_index(probabilities, rng):
  """An index drawn with `probabilities` (>= 0; all 0: uniform) from one uniform draw of `rng`."""
  p = np.asarray(probabilities, np.float64)
  if not (p > 0).any():
    p = np.ones_like(p)
  cumulative = np.cumsum(p)
  index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
  return min(index, int(np.flatnonzero(p)[-1]))  # rounding never lands on a weight-0 caption


def caption_candidates(example, max_captions):
  """(captions, captioners) of an example: its first `max_captions` 'captions' with their
  'captioners' ('' where unnamed), or [its 'caption'] when it has no 'captions'."""
  captions = example.get("captions")
  if captions is None or len(captions) == 0:
    return [caption_text(example.get("caption", ""))], [""]
  captions = [caption_text(c) for c in list(captions)[:max_captions]]
  names = example.get("captioners")
  names = [caption_text(c) for c in list(names)[: len(captions)]] if names is not None else []
  return captions, names + [""] * (len(captions) - len(names))


def clip_span(frames, stride):
  """Number of source frames a clip of `frames` frames at `stride` spans."""
  return (frames - 1) * stride + 1


def sample_clip(video, frames, strides, rng, start_prob=0.0):
  """A random clip [frames, ...] of `video` at a random fitting stride; returns (clip, stride,
  start). With probability `start_prob` the clip starts the video (start 0), else anywhere."""
  length = len(video)
  fitting = [s for s in strides if clip_span(frames, s) <= length]
  if not fitting:
    raise ValueError(
        f"A video of {length} frames is too short for a clip of {frames} frames at "
        f"stride {min(strides)} (needs {clip_span(frames, min(strides))} frames); "
        "filter short videos when building the dataset (min_frames)."
    )
  stride = fitting[rng.integers(len(fitting))] if len(fitting) > 1 else fitting[0]
  if start_prob and rng.random() < start_prob:
    start = 0
  else:
    start = int(rng.integers(length - clip_span(frames, stride) + 1))
  return video[start : start + clip_span(frames, stride) : stride], stride, start


class Pipeline:
  """Iterator of batches from `source`; see the module docstring.

  Args:
    source: random-access source (len + getitem).
    global_batch_size: examples per global batch; divisible by process_count.
    kind: 'video' (clips of `frames` frames) or 'image' (a still, or one random frame of a video).
    frames: frames per clip (video).
    frame_stride: int, or a sequence of strides to pick from at random (those that fit the video).
    resolution: output side in pixels; frames of another size are resized (shorter side) and
      cropped, centred or at random with `random_crop`. None keeps the source size.
    caption_dropout: probability of replacing the caption by '' (and cached text fields by the
      source's `null_text` entries) for classifier-free guidance.
    seed: the stream's seed. shuffle: permute each epoch (else source order).
    num_epochs: None repeats forever; else stops after that many epochs.
    drop_remainder: drop the last partial global batch of each epoch (required with a sharding).
    process_index, process_count: this host's place; default jax.process_index()/count().
    sharding: a jax.sharding.Sharding for the batch dim (e.g. NamedSharding(mesh, P('data'))); or
      mesh + partition_spec (default: batch split over every mesh axis). None: numpy batches.
    num_workers: threads building batches ahead; prefetch: batches built ahead (>= 1).
    clip_start_prob: > 0: a video clip starts its source video with this probability (else
      anywhere), and batches carry 'clip_start' bool [B] (the clip is the video's first frames:
      what a long video's first chunk is trained on, see recipes.ldm).
    max_captions: 1: the example's 'caption'; > 1: one of its first max_captions 'captions',
      drawn by `caption_weights` (captioner name -> weight; empty: uniform). See the module
      docstring. A latent cache source must have been built with the same max_captions (and,
      above 1, caption_weights).
    sample_captions: False (with max_captions > 1): no draw; 'caption' is every candidate, a list
      of max_captions (padded by repeating the example's captions) per example, and batches carry
      'caption_weights' float32 [B, max_captions], the candidates' probabilities (0 for padding):
      what build_latent_cache stores.
  """

  def __init__(
      self,
      source,
      *,
      global_batch_size,
      kind="video",
      frames=8,
      frame_stride=1,
      resolution=None,
      random_crop=False,
      caption_dropout=0.0,
      seed=0,
      shuffle=True,
      num_epochs=None,
      drop_remainder=True,
      process_index=None,
      process_count=None,
      sharding=None,
      mesh=None,
      partition_spec=None,
      num_workers=4,
      prefetch=4,
      clip_start_prob=0.0,
      max_captions=1,
      caption_weights=None,
      sample_captions=True,
  ):
    if kind not in PIXEL_KEYS:
      raise ValueError(f"kind must be one of {PIXEL_KEYS}, got {kind!r}.")
    self.source = source
    self.num_examples = len(source)
    self.kind, self.frames, self.resolution = kind, int(frames), resolution
    strides = (frame_stride,) if np.ndim(frame_stride) == 0 else tuple(frame_stride)
    if not strides or min(strides) < 1 or self.frames < 1:
      raise ValueError(f"Need frames >= 1 and strides >= 1, got {frames}, {frame_stride}.")
    self.strides = tuple(int(s) for s in strides)
    if not 0.0 <= caption_dropout <= 1.0:
      raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}.")
    self.random_crop, self.caption_dropout = random_crop, float(caption_dropout)
    if not 0.0 <= clip_start_prob <= 1.0:
      raise ValueError(f"clip_start_prob must be in [0, 1], got {clip_start_prob}.")
    self.clip_start_prob = float(clip_start_prob)
    if isinstance(max_captions, bool) or int(max_captions) != max_captions or max_captions < 1:
      raise ValueError(f"max_captions must be an integer >= 1, got {max_captions!r}.")
    self.max_captions = int(max_captions)
    self.caption_weights = check_caption_weights(caption_weights)
    self.sample_captions = bool(sample_captions)
    _check_cache_captions(source, self.max_captions, self.caption_weights)
    self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count}).")
    if global_batch_size < 1 or global_batch_size % self.process_count:
      raise ValueError(
          f"global_batch_size {global_batch_size} must be a positive multiple of the "
          f"process count {self.process_count}."
      )
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // self.process_count
    if mesh is not None:
      if sharding is not None:
        raise ValueError("Pass either sharding or mesh (+ partition_spec), not both.")
      spec = (
          partition_spec
          if partition_spec is not None
          else jax.sharding.PartitionSpec(tuple(mesh.axis_names))
      )
      sharding = jax.sharding.NamedSharding(mesh, spec)
    self.sharding = sharding
    if sharding is not None:
      if not drop_remainder:
        raise ValueError("drop_remainder=False gives a ragged last batch; it needs sharding=None.")
      try:
        sharding.shard_shape((self.global_batch_size,))
      except ValueError as e:
        raise ValueError(
            f"global_batch_size {self.global_batch_size} does not split over the "
            f"sharding {sharding}: {e}"
        ) from e
    self.drop_remainder = bool(drop_remainder)
    if self.drop_remainder:
      self.steps_per_epoch = self.num_examples // self.global_batch_size
    else:
      self.steps_per_epoch = math.ceil(self.num_examples / self.global_batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"The source has {self.num_examples} examples, fewer than one global batch "
          f"of {self.global_batch_size}."
      )
    self.null_text = getattr(source, "null_text", None) or {}
    self._epoch, self._position = 0, 0
    self._order_cache = (None, None)
    self._pending = collections.deque()  # (epoch, position, future), in stream order
    self._executor = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
    self._prefetch = max(1, int(prefetch))

  # --- state -------------------------------------------------------------------------------------

  def get_state(self):
    """The position in the stream: a small JSON-able dict (save it with the checkpoint)."""
    return dict(
        epoch=self._epoch,
        position=self._position,
        seed=self.seed,
        num_examples=self.num_examples,
        global_batch_size=self.global_batch_size,
        shuffle=self.shuffle,
    )

  def set_state(self, state):
    """Continues from a `get_state()` dict; the stream must be the same one."""
    for key in ("seed", "num_examples", "global_batch_size", "shuffle"):
      if key in state and state[key] != getattr(self, key):
        raise ValueError(
            f"Iterator state is for {key}={state[key]!r}, this pipeline has "
            f"{getattr(self, key)!r}: it would not continue the same stream."
        )
    if not 0 <= int(state["position"]) < self.steps_per_epoch:
      raise ValueError(
          f"Iterator state position {state['position']} is outside the epoch's "
          f"{self.steps_per_epoch} steps."
      )
    self._drop_pending()
    self._epoch, self._position = int(state["epoch"]), int(state["position"])

  # --- order -------------------------------------------------------------------------------------

  def epoch_order(self, epoch):
    """All source indices in the order epoch `epoch` visits them."""
    cached_epoch, order = self._order_cache
    if cached_epoch != epoch:
      order = (
          np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
          if self.shuffle
          else np.arange(self.num_examples)
      )
      self._order_cache = (epoch, order)
    return order

  def local_indices(self, epoch, position):
    """Source indices of this process's rows of global batch `position` of `epoch`."""
    order = self.epoch_order(epoch)
    rows = order[position * self.global_batch_size : (position + 1) * self.global_batch_size]
    if len(rows) == self.global_batch_size:
      return rows[
          self.process_index
          * self.local_batch_size : (self.process_index + 1)
          * self.local_batch_size
      ]
    return np.array_split(rows, self.process_count)[self.process_index]  # ragged last batch

  # --- examples ----------------------------------------------------------------------------------

  def process_example(self, example, rng):
    """One source example -> dict of numpy fields (+ 'caption' str)."""
    caption = caption_text(example.get("caption", ""))
    drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
    out = {}
    if any(k in example for k in PIXEL_KEYS):
      out.update(self._process_pixels(example, rng))
    else:  # cached encoder outputs: numeric fields pass through
      for key, value in example.items():
        value = np.asarray(value)
        if key not in METADATA_KEYS and value.dtype.kind in "biuf":
          out[key] = value
      out["fps"] = np.float32(example.get("fps", DEFAULT_FPS))
    if self.max_captions > 1:
      caption = self._choose_caption(example, out, rng)
    if drop:
      caption = ""
      for key, value in self.null_text.items():
        out[key] = np.asarray(value, out[key].dtype if key in out else None)
    if "motion" in example:
      out["motion"] = np.float32(example["motion"])
    if "held_out" in example:
      out["held_out"] = np.bool_(example["held_out"])
    out["caption"] = caption
    return out

  def _choose_caption(self, example, out, rng):
    """The example's caption among its candidates (a list of all of them without
    sample_captions); picks the matching row of cached text fields in `out`."""
    if "caption_weights" in example:  # a latent cache row: candidates and chances stored
      captions = [caption_text(c) for c in example["captions"]]
      index = draw_index(example["caption_weights"], rng)
      for key in self.null_text:
        if key in out:
          out[key] = out[key][index]
      return captions[index]
    captions, captioners = caption_candidates(example, self.max_captions)
    probabilities = caption_probabilities(captioners, self.caption_weights)
    if not self.sample_captions:
      padding = self.max_captions - len(captions)
      out["caption_weights"] = np.pad(probabilities, (0, padding)).astype(np.float32)
      return [captions[i % len(captions)] for i in range(self.max_captions)]
    return captions[draw_index(probabilities, rng)]

  def _process_pixels(self, example, rng):
    fps, start = float(example.get("fps", DEFAULT_FPS)), None
    if "video" in example:
      video = example["video"]
      video = np.stack(video) if isinstance(video, (list, tuple)) else np.asarray(video)
      if self.kind == "video":
        pixels, stride, start = sample_clip(
            video, self.frames, self.strides, rng, self.clip_start_prob
        )
        fps /= stride
      else:  # one random frame of the video
        pixels = video[rng.integers(len(video))][None]
    else:
      if self.kind == "video":
        raise ValueError("This source holds images; use kind='image' (or a video source).")
      pixels = np.asarray(example["image"])[None]
    pixels = transforms.to_rgb(pixels)
    if self.resolution is not None:
      pixels = transforms.resize_and_crop(
          pixels, self.resolution, rng if self.random_crop else None
      )
    pixels = transforms.normalize(pixels)
    out = {self.kind: pixels if self.kind == "video" else pixels[0], "fps": np.float32(fps)}
    if self.clip_start_prob and self.kind == "video":
      out["clip_start"] = np.bool_(start == 0)
    return out

  def example_rng(self, epoch, index):
    return np.random.default_rng([self.seed, epoch, int(index)])

  def local_batch(self, epoch, position):
    """This process's rows of a global batch, as host numpy arrays (and the caption list)."""
    return self._build(epoch, self.local_indices(epoch, position))

  def _build(self, epoch, indices):
    rows = [self.process_example(self.source[int(i)], self.example_rng(epoch, i)) for i in indices]
    batch = {key: np.stack([r[key] for r in rows]) for key in rows[0] if key != "caption"}
    batch["caption"] = [r["caption"] for r in rows]
    batch["index"] = np.asarray(indices, np.int32)
    return batch

  # --- iteration ---------------------------------------------------------------------------------

  def _next_key(self, epoch, position):
    position += 1
    return (epoch + 1, 0) if position == self.steps_per_epoch else (epoch, position)

  def _finished(self, epoch):
    return self.num_epochs is not None and epoch >= self.num_epochs

  def _drop_pending(self):
    for *_, future in self._pending:
      future.cancel()
    self._pending.clear()

  def _fill(self):
    if self._pending:
      key = self._next_key(*self._pending[-1][:2])
    else:
      key = (self._epoch, self._position)
    while len(self._pending) < self._prefetch and not self._finished(key[0]):
      indices = self.local_indices(*key)  # the order is computed here, not in the workers
      self._pending.append((*key, self._executor.submit(self._build, key[0], indices)))
      key = self._next_key(*key)

  def __iter__(self):
    return self

  def __next__(self):
    if self._finished(self._epoch):
      raise StopIteration
    self._fill()
    epoch, position, future = self._pending.popleft()
    assert (epoch, position) == (self._epoch, self._position)
    batch = future.result()
    self._epoch, self._position = self._next_key(epoch, position)
    return self.globalize(batch)

  def globalize(self, batch):
    """Numeric host fields -> global jax.Arrays with the batch sharding (no-op without one)."""
    if self.sharding is None:
      return batch
    return {
        key: value if key == "caption" else to_global(value, self.sharding, self.global_batch_size)
        for key, value in batch.items()
    }

  def close(self):
    self._drop_pending()
    self._executor.shutdown(wait=False, cancel_futures=True)


def _check_cache_captions(source, max_captions, caption_weights):
  """A latent cache's text fields have one row per candidate caption: it must have been built
  with this max_captions (and, above 1, these caption_weights, which gave its stored chances)."""
  built = getattr(source, "max_captions", None)
  if built is None:  # not a latent cache
    return
  where = getattr(source, "directory", "the latent cache")
  if built != max_captions:
    raise ValueError(
        f"{where} was built with max_captions={built}; this pipeline has "
        f"max_captions={max_captions}. Set data.max_captions={built}, or rebuild the cache "
        "(delete it) with the new value."
    )
  built_weights = dict(getattr(source, "caption_weights", {}) or {})
  if max_captions > 1 and built_weights != caption_weights:
    raise ValueError(
        f"{where} was built with caption_weights={built_weights}; this pipeline has "
        f"caption_weights={caption_weights}. Its stored caption probabilities come from the "
        "former: set data.caption_weights to it, or rebuild the cache (delete it)."
    )


def to_global(local, sharding, global_batch_size):
  """This process's rows [b, ...] -> the global jax.Array [global_batch_size, ...]."""
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(
      sharding, local, (global_batch_size,) + local.shape[1:]
  )
