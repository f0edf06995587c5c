"""Tokenizers: CLIP BPE against transformers' CLIPTokenizer on a tiny vocabulary built here, SD1 /
SD2 padding, and the file-free byte and word tokenizers."""
import json
import os
import random

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import sd_folders

from vldm.models import clip
from vldm.models import tokenizer as tok

MERGES = [("r", "e"), ("re", "d</w>"), ("c", "i"), ("ci", "r"), ("cir", "c"), ("circ", "l"),
          ("circl", "e</w>"), ("m", "o"), ("mo", "v"), ("mov", "i"), ("movi", "n"), ("movin", "g</w>"),
          ("l", "e"), ("le", "f"), ("lef", "t</w>")]
TEXTS = ["a red circle moving left", "A RED   circle, moving!", "a blue square", "",
         "circles moving léft ☺", " ".join(["red circle"] * 60)]  # the last one is truncated


def _write_clip_vocab(folder):
  """The tiny vocabulary with this file's merges; {token: id}."""
  sd_folders.write_clip_vocab(folder, MERGES)
  with open(os.path.join(folder, "vocab.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("clip_tokenizer"))
  return folder, _write_clip_vocab(folder)


def _reference(folder, texts, max_length=77, **kwargs):
  hf = transformers.CLIPTokenizer.from_pretrained(folder, **kwargs)
  return np.asarray(hf(texts, padding="max_length", max_length=max_length, truncation=True)["input_ids"])


def test_clip_bpe_matches_transformers_sd1(vocab_folder):
  folder, vocab = vocab_folder
  tokenizer = tok.CLIPBPETokenizer(folder, padding="sd1")
  ids = tokenizer(TEXTS)
  assert ids.dtype == np.int32 and ids.shape == (len(TEXTS), 77)
  np.testing.assert_array_equal(ids, _reference(folder, TEXTS))
  eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (bos, eos, eos)
  assert tokenizer.vocab_size == len(vocab) == eos + 1
  # Whole words merge into single tokens; the row is bos, words, eos, then eos padding.
  words = [vocab["a</w>"], vocab["red</w>"], vocab["circle</w>"], vocab["moving</w>"], vocab["left</w>"]]
  np.testing.assert_array_equal(ids[0, :7], [bos] + words + [eos])
  assert (ids[0, 7:] == eos).all()
  assert ids[-1, -1] == eos and (ids[-1] != eos).sum() == 76  # truncated, eos kept


def test_clip_bpe_sd2_pads_with_zero(vocab_folder):
  folder, vocab = vocab_folder
  sd1 = tok.CLIPBPETokenizer(folder, padding="sd1")(TEXTS)
  sd2 = tok.CLIPBPETokenizer(folder, padding="sd2")(TEXTS)
  np.testing.assert_array_equal(sd2, _reference(folder, TEXTS, pad_token="!"))
  assert vocab["!"] == 0
  plain = [i for i, t in enumerate(TEXTS) if "!" not in t]  # SD2 reads a typed "!" as its pad, 0
  lengths = (sd2[plain] != 0).sum(1)
  for row1, row2, n in zip(sd1[plain], sd2[plain], lengths):
    np.testing.assert_array_equal(row1[:n], row2[:n])
    assert (row1[n:] == vocab["<|endoftext|>"]).all() and (row2[n:] == 0).all()


def test_clip_bpe_reads_a_diffusers_pipeline_folder(vocab_folder, tmp_path):
  """SD2 pipelines ship tokenizer/ with vocab.json, merges.txt and a tokenizer_config.json that
  sets pad "!" (id 0)."""
  folder, _ = vocab_folder
  _write_clip_vocab(str(tmp_path / "tokenizer"))
  with open(tmp_path / "tokenizer" / "tokenizer_config.json", "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "pad_token": "!",
               "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}, f)
  tokenizer = tok.CLIPBPETokenizer(str(tmp_path))  # the pipeline folder itself
  assert tokenizer.folder == str(tmp_path / "tokenizer")
  assert (tokenizer.max_length, tokenizer.pad_id) == (16, 0)
  np.testing.assert_array_equal(tokenizer(TEXTS), _reference(folder, TEXTS, 16, pad_token="!"))
  np.testing.assert_array_equal(tok.CLIPBPETokenizer(str(tmp_path), padding="sd2")(TEXTS),
                                tokenizer(TEXTS))
  assert tok.CLIPBPETokenizer(str(tmp_path), max_length=8)(TEXTS).shape == (len(TEXTS), 8)


def test_clip_bpe_reads_a_transformers_5_folder(vocab_folder, tmp_path):
  """transformers 5 `save_pretrained` writes tokenizer.json instead of vocab.json + merges.txt."""
  folder, _ = vocab_folder
  transformers.CLIPTokenizer.from_pretrained(folder).save_pretrained(str(tmp_path))
  assert not os.path.exists(tmp_path / "vocab.json")
  np.testing.assert_array_equal(tok.CLIPBPETokenizer(str(tmp_path), padding="sd1")(TEXTS),
                                _reference(folder, TEXTS))


def test_clip_bpe_folder_errors(vocab_folder, tmp_path):
  folder, _ = vocab_folder
  os.makedirs(tmp_path / "tokenizer")
  with open(os.path.join(folder, "vocab.json")) as src:
    (tmp_path / "tokenizer" / "vocab.json").write_text(src.read())
  with pytest.raises(ValueError, match="no merges.txt"):
    tok.CLIPBPETokenizer(str(tmp_path))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no vocab.json and no merges.txt"):
    tok.CLIPBPETokenizer(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="No tokenizer folder"):
    tok.CLIPBPETokenizer(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="accepted"):
    tok.CLIPBPETokenizer(folder, padding="sd3")


# ---------------------------------------------------------------------------------- file-free


def test_byte_tokenizer_round_trip():
  tokenizer = tok.ByteTokenizer(max_length=40)
  texts = ["a red circle moving left", "cyan △ triangle", ""]
  ids = tokenizer(texts)
  assert ids.dtype == np.int32 and ids.shape == (3, 40)
  assert (ids[:, 0] == tokenizer.bos_id).all() and tokenizer.eos_id == tokenizer.vocab_size - 1
  for text, row in zip(texts, ids):
    n = len(text.encode("utf-8"))
    assert row[n + 1] == tokenizer.eos_id and (row[n + 2:] == tokenizer.pad_id).all()
    assert tokenizer.decode(row) == text
  np.testing.assert_array_equal(tok.ByteTokenizer(max_length=40)(texts), ids)  # no state at all
  long = tokenizer(["x" * 100])[0]
  assert long[-1] == tokenizer.eos_id and tokenizer.decode(long) == "x" * 38


def test_word_tokenizer_is_deterministic_and_round_trips():
  captions = [f"a {c} {s} moving {d}" for c in ("red", "green", "cyan") for s in ("circle", "square")
              for d in ("left", "up")]
  shuffled = random.Random(0).sample(captions, len(captions))
  tokenizer = tok.WordTokenizer.from_texts(captions, max_length=12)
  assert tok.WordTokenizer.from_texts(shuffled, max_length=12).words == tokenizer.words
  assert tokenizer.words == ("a", "circle", "cyan", "green", "left", "moving", "red", "square", "up")
  assert tokenizer.vocab_size == 3 + 9 + 1 and tokenizer.eos_id == tokenizer.vocab_size - 1
  ids = tokenizer(["A Red circle,  moving LEFT", "a cyan triangle moving up"])
  assert ids.dtype == np.int32 and ids.shape == (2, 12)
  assert tokenizer.decode(ids[0]) == "a red circle <unk> moving left"  # ',' is not in the words
  assert tokenizer.decode(ids[1]) == "a cyan <unk> moving up"
  np.testing.assert_array_equal(ids[1, :7], [1, 3, 5, 2, 8, 11, 12])
  assert (ids[0, 8:] == tokenizer.pad_id).all() and (ids[1, 7:] == tokenizer.pad_id).all()
  np.testing.assert_array_equal(tokenizer(["a red circle moving left"]),
                                tok.WordTokenizer(tokenizer.words, 12)(["a red circle moving left"]))


@pytest.mark.parametrize("tokenizer", [tok.ByteTokenizer(16), tok.WordTokenizer(["a red circle"], 16)],
                         ids=["byte", "word"])
def test_file_free_tokenizers_configure_a_text_model(tokenizer):
  """eos is the last id, so CLIPTextModel pools at the eos under either pooling rule."""
  config = tokenizer.text_model_config()
  ids = tokenizer(["a red circle", "a"])
  eos_at = np.argmax(ids == tokenizer.eos_id, axis=1)
  hidden = jnp.arange(2 * 16, dtype=jnp.float32).reshape(2, 16, 1)
  for eos_rule in (config["eos_token_id"], 2):  # first eos; legacy argmax(ids)
    model = clip.CLIPTextModel(**dict(config, eos_token_id=eos_rule))
    pooled = model.apply({}, hidden, jnp.asarray(ids), method=clip.CLIPTextModel.pool)
    np.testing.assert_array_equal(pooled[:, 0], eos_at + 16 * np.arange(2))
  assert config["max_position_embeddings"] == ids.shape[1] == 16
  assert ids.max() < config["vocab_size"]


def test_tokenizer_errors():
  with pytest.raises(ValueError, match="accepted"):
    tok.build_tokenizer("sentencepiece")
  with pytest.raises(ValueError, match="max_length"):
    tok.ByteTokenizer(max_length=1)
  with pytest.raises(ValueError, match="list of strings"):
    tok.ByteTokenizer()([b"bytes"])
  with pytest.raises(ValueError, match="at least one word"):
    tok.WordTokenizer([])
  assert isinstance(tok.build_tokenizer("word", words=["a"]), tok.Tokenizer)
