"""Tokenizers: text → int32 token ids [B, max_length] for the CLIP text encoder.

All share one interface (`Tokenizer`): `tokenizer(texts) -> np.ndarray int32 [B, max_length]`,
each row `bos, tokens…, eos, pad…`, truncated to `max_length` with the eos kept, as transformers'
CLIPTokenizer does with `padding='max_length', truncation=True`. They also expose `max_length`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id`, and `text_model_config()`, the CLIPTextModel fields
a model trained from scratch on that tokenizer needs.

  CLIPBPETokenizer  the published CLIP BPE (vocab.json + merges.txt, or tokenizer.json, e.g. a
                    diffusers pipeline's `tokenizer/` folder), through transformers; SD1 / SD2
                    padding conventions.
  ByteTokenizer     needs nothing: UTF-8 bytes. Any text; one token per byte.
  WordTokenizer     needs nothing but its word list (from a few example texts): one token per word,
                    which suits short, templated captions ("a red circle moving left").
  IdsOnlyTokenizer  the ids of a published vocabulary without the vocabulary (architecture presets,
                    `vldm.models.presets`): enough to build and compile the text encoder; it
                    cannot encode text.
Both file-free tokenizers put eos last in their vocabulary, as CLIP does, so either pooling rule
of CLIPTextModel (argmax id, or first eos) finds it.
"""

from __future__ import annotations

import abc
import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np


class Tokenizer(abc.ABC):
  """The common interface. Subclasses set the ids and implement `encode` (no special tokens)."""

  max_length: int
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """The token ids of one text, without bos / eos / padding."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
      raise ValueError(
          f"Tokenizers take a list of strings, got {[type(t).__name__ for t in texts]}."
      )
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, ids in zip(out, self.encode_batch(texts)):
      ids = [self.bos_id] + list(ids)[: self.max_length - 2] + [self.eos_id]
      row[: len(ids)] = ids
    return out

  def text_model_config(self) -> dict:
    """CLIPTextModel fields that must agree with this tokenizer."""
    return dict(
        vocab_size=self.vocab_size,
        max_position_embeddings=self.max_length,
        bos_token_id=self.bos_id,
        eos_token_id=self.eos_id,
        pad_token_id=self.pad_id,
    )

  def _check_max_length(self):
    if self.max_length < 2:
      raise ValueError(f"max_length must leave room for bos and eos (≥ 2), got {self.max_length}.")


# ------------------------------------------------------------------------------------ CLIP BPE

CLIP_TOKENIZER_FILES = ("vocab.json", "merges.txt")  # published CLIP / diffusers folders
TOKENIZER_JSON = "tokenizer.json"  # what transformers 5 `save_pretrained` writes instead
# SD1.x pads with the end-of-text token (49407), SD2.x with id 0 ("!").
PAD_CONVENTIONS = ("sd1", "sd2")


def _is_tokenizer_folder(folder: str) -> bool:
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  return all(has(f) for f in CLIP_TOKENIZER_FILES) or has(TOKENIZER_JSON)


def find_tokenizer_folder(path: str) -> str:
  """`path` itself when it holds the tokenizer files (vocab.json + merges.txt, or tokenizer.json),
  else its `tokenizer/` subfolder (a diffusers pipeline folder)."""
  candidates = (path, os.path.join(path, "tokenizer"))
  for folder in candidates:
    if _is_tokenizer_folder(folder):
      return folder
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No tokenizer folder at {path}.")
  folder = candidates[1] if os.path.isdir(candidates[1]) else path
  missing = [f for f in CLIP_TOKENIZER_FILES if not os.path.isfile(os.path.join(folder, f))]
  raise ValueError(
      f"{folder} is not a CLIP tokenizer folder: it has no {' and no '.join(missing)}. "
      f"A CLIP BPE tokenizer needs {' and '.join(CLIP_TOKENIZER_FILES)} (or a "
      f"transformers {TOKENIZER_JSON}) in one folder; a diffusers pipeline folder has "
      f"them in tokenizer/."
  )


class CLIPBPETokenizer(Tokenizer):
  """CLIP's byte-level BPE from a local folder, through `transformers.CLIPTokenizer`.

  `path`: a folder with vocab.json + merges.txt (or tokenizer.json), or a diffusers pipeline
  folder (its `tokenizer/` is used). `padding`: 'sd1' pads with the end-of-text token, 'sd2' with
  the token of id 0 ("!"), exactly as those pipelines' tokenizer configs do (the pad token is then
  also a special token in the text); None keeps the folder's own pad token (tokenizer_config.json;
  transformers' default is end-of-text). `max_length`: default the folder's model_max_length,
  else 77.
  """

  def __init__(self, path: str, *, padding: Optional[str] = None, max_length: Optional[int] = None):
    from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top

    if padding not in (None,) + PAD_CONVENTIONS:
      raise ValueError(
          f"Unknown padding convention {padding!r}; accepted: None, {PAD_CONVENTIONS}."
      )
    self.folder = find_tokenizer_folder(path)
    self._tokenizer = CLIPTokenizer.from_pretrained(self.folder)
    pad_token = {
        "sd1": self._tokenizer.eos_token,
        "sd2": self._tokenizer.convert_ids_to_tokens(0),
    }.get(padding)
    if pad_token is not None and pad_token != self._tokenizer.pad_token:
      self._tokenizer = CLIPTokenizer.from_pretrained(self.folder, pad_token=pad_token)
    self.bos_id = self._tokenizer.bos_token_id
    self.eos_id = self._tokenizer.eos_token_id
    self.pad_id = self._tokenizer.pad_token_id
    if self.pad_id is None:
      raise ValueError(
          f"The tokenizer in {self.folder} has no pad token; pass padding='sd1' or 'sd2'."
      )
    folder_max = self._tokenizer.model_max_length
    self.max_length = max_length or (folder_max if folder_max and folder_max < 10_000 else 77)
    self.vocab_size = len(self._tokenizer)
    self._check_max_length()

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------- file-free


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes: pad 0, bos 1, byte b → b + 2, eos 258 (the last id); vocab_size 259."""

  pad_id, bos_id, eos_id, vocab_size = 0, 1, 258, 259

  def __init__(self, max_length: int = 77):
    self.max_length = max_length
    self._check_max_length()

  def encode(self, text: str) -> list[int]:
    return [b + 2 for b in text.encode("utf-8")]

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(i - 2 for i in ids if 2 <= i < 258).decode("utf-8", errors="replace")


class IdsOnlyTokenizer(Tokenizer):
  """A published tokenizer's ids and length, without its vocabulary: what a text encoder's shapes
  need (compile-only checks of architecture presets). Encoding text is an error."""

  def __init__(self, vocab_size: int, max_length: int, bos_id: int, eos_id: int, pad_id: int):
    self.vocab_size, self.max_length = vocab_size, max_length
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self._check_max_length()

  def encode(self, text: str) -> list[int]:
    raise ValueError(
        "This tokenizer comes from an architecture preset and has no vocabulary: it "
        "serves compile-only checks. To train or sample, give the model's folder "
        "(ldm.pretrained or ldm.tokenizer.folder)."
    )


_WORD_PATTERN = re.compile(r"[^\W_]+|[^\w\s]")  # runs of letters / digits, or one punctuation mark


def split_words(text: str) -> list[str]:
  """Lower-cased words and punctuation marks: "A red, circle" → ['a', 'red', ',', 'circle']."""
  return _WORD_PATTERN.findall(text.lower())


class WordTokenizer(Tokenizer):
  """One id per word of a fixed vocabulary: pad 0, bos 1, unk 2, the words (sorted) from 3, eos
  last. Unknown words map to unk. `words` (words or whole texts, split as `split_words` does; any
  order, duplicates and case ignored) is the whole state: keep it in the experiment config.
  """

  pad_id, bos_id, unk_id = 0, 1, 2
  _FIRST_WORD_ID = 3

  def __init__(self, words: Iterable[str], max_length: int = 77):
    if isinstance(words, str):
      words = [words]
    words = sorted({w for word in words for w in split_words(word)})
    if not words:
      raise ValueError("WordTokenizer needs at least one word.")
    self.words = tuple(words)
    self._ids = {w: i + self._FIRST_WORD_ID for i, w in enumerate(self.words)}
    self.eos_id = self._FIRST_WORD_ID + len(self.words)
    self.vocab_size = self.eos_id + 1
    self.max_length = max_length
    self._check_max_length()

  @classmethod
  def from_texts(cls, texts: Iterable[str], max_length: int = 77) -> "WordTokenizer":
    """The vocabulary of every word in `texts` (deterministic: sorted, whatever the order)."""
    return cls(texts, max_length=max_length)

  def encode(self, text: str) -> list[int]:
    return [self._ids.get(w, self.unk_id) for w in split_words(text)]

  def decode(self, ids: Iterable[int]) -> str:
    first, last = self._FIRST_WORD_ID, self.eos_id
    return " ".join(
        self.words[i - first] if first <= i < last else "<unk>"
        for i in ids
        if i == self.unk_id or first <= i < last
    )


WORD_TOKENIZER_FILE = "vldm_word_tokenizer.json"


def save_tokenizer(tokenizer: Tokenizer, folder: str) -> None:
  """Writes `tokenizer` to `folder` so that `load_tokenizer(folder)` rebuilds it: a CLIP BPE
  tokenizer as its files (vocab.json + merges.txt or tokenizer.json, tokenizer_config.json), a
  WordTokenizer as WORD_TOKENIZER_FILE (its words and max_length)."""
  import json  # pylint: disable=g-import-not-at-top

  os.makedirs(folder, exist_ok=True)
  if isinstance(tokenizer, CLIPBPETokenizer):
    hf = tokenizer._tokenizer  # pylint: disable=protected-access
    hf.model_max_length = tokenizer.max_length
    hf.save_pretrained(folder)
  elif isinstance(tokenizer, WordTokenizer):
    with open(os.path.join(folder, WORD_TOKENIZER_FILE), "w") as f:
      json.dump({"words": list(tokenizer.words), "max_length": tokenizer.max_length}, f, indent=1)
  else:
    raise ValueError(
        f"Cannot save a {type(tokenizer).__name__}; saved kinds: CLIPBPETokenizer, "
        "WordTokenizer."
    )


def load_tokenizer(folder: str) -> Tokenizer:
  """The tokenizer `save_tokenizer` wrote, or a CLIP BPE tokenizer folder (diffusers layout)."""
  import json  # pylint: disable=g-import-not-at-top

  path = os.path.join(folder, WORD_TOKENIZER_FILE)
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
    return WordTokenizer(saved["words"], max_length=saved["max_length"])
  return CLIPBPETokenizer(folder)


TOKENIZERS = ("clip", "byte", "word")


def build_tokenizer(kind: str, **kwargs) -> Tokenizer:
  """A tokenizer by name (for configs): 'clip' (path=, padding=, max_length=), 'byte'
  (max_length=) or 'word' (words=, max_length=)."""
  classes = {"clip": CLIPBPETokenizer, "byte": ByteTokenizer, "word": WordTokenizer}
  if kind not in classes:
    raise ValueError(f"Unknown tokenizer {kind!r}; accepted: {TOKENIZERS}.")
  return classes[kind](**kwargs)
