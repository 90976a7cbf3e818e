"""Tokenizers behind one small interface, and the prompt format of each.

The pipeline, the trainer and the evaluator only use `encode`, `decode` and the special-id
attributes (`pad_id`, `bos_id`, `eos_id`, `image_token_id`, `vocab_size`):

* `WordTokenizer`: a fixed word list (the synthetic VQA vocabulary), for the small models
  trained here; never meets an unknown word on that dataset.
* `HFTokenizer`: a Hugging Face `tokenizer.json` (the `tokenizers` library), for real
  LLaVA checkpoints; prompts follow LLaVA-1.5 (Liu et al. 2023,
  https://arxiv.org/abs/2310.03744), whose short-answer VQA instruction we reuse.

`prompt_ids` builds the prompt of either, with the image placeholder expanded to one token
per image feature (the model replaces those positions with the projected image features);
`tokenizer_path` says which tokenizer a pipeline config uses.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import tokenizers

from sab_jax.data import synthetic_vqa

from sab_jax.models.prompts import LLAVA_CHAT_PROMPT, LLAVA_PROMPT, QWEN_CHAT_PROMPT, QWEN_VQA_PROMPT  # noqa: F401

# How a checkpoint's meta.json names the synthetic set's WordTokenizer.
WORD_TOKENIZER = 'word:synthetic_vqa'
# LLaVA's prompt templates by kind; every family's are `models.families.FAMILIES[...].prompts`
# (`python -m sab_jax.ask --prompt=KIND`).
PROMPTS = {'vqa': LLAVA_PROMPT, 'chat': LLAVA_CHAT_PROMPT}

_WORD_RE = re.compile(r"[a-z0-9']+|[^\sa-z0-9']")


def split_words(text: str) -> list[str]:
  """Lower-cases and splits into words and single punctuation marks ("?" on its own)."""
  return _WORD_RE.findall(text.lower())


def join_words(words: Iterable[str]) -> str:
  """Inverse of split_words on normalised text: no space before punctuation."""
  out = ''
  for w in words:
    if out and _WORD_RE.fullmatch(w) and not re.fullmatch(r"[a-z0-9']+", w):
      out += w  # punctuation sticks to the previous word
    else:
      out += (' ' if out else '') + w
  return out


def normalize_text(text: str) -> str:
  """The form `decode(encode(text))` returns for a WordTokenizer without unknown words."""
  return join_words(split_words(text))


class WordTokenizer:
  """Word-level tokenizer with fixed ids: pad 0, bos 1, eos 2, image 3, unk 4, words 5..."""

  SPECIALS = ('<pad>', '<bos>', '<eos>', '<image>', '<unk>')

  def __init__(self, words: Sequence[str]):
    words = [w.lower() for w in words]
    if len(set(words)) != len(words) or set(words) & set(self.SPECIALS):
      raise ValueError('Words must be unique and must not be special tokens.')
    self.pad_id, self.bos_id, self.eos_id, self.image_token_id, self.unk_id = range(5)
    self._id_to_token = list(self.SPECIALS) + words
    self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
    self.vocab_size = len(self._id_to_token)

  @classmethod
  def for_synthetic_vqa(cls) -> 'WordTokenizer':
    """The tokenizer of the synthetic VQA dataset (its full question/answer vocabulary)."""
    return cls(synthetic_vqa.VOCABULARY)

  def encode(self, text: str) -> list[int]:
    """Word ids of `text`, without specials; unknown words become unk."""
    return [self._token_to_id.get(w, self.unk_id) for w in split_words(text)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first eos; pad, bos and image tokens are skipped."""
    words = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id, self.image_token_id):
        continue
      words.append(self._id_to_token[i] if 0 <= i < self.vocab_size else '<unk>')
    return join_words(words)


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _token_content(token) -> str | None:
  """A special token as written in HF configs: a string or {'content': ...}."""
  if isinstance(token, dict):
    return token.get('content')
  return token


class HFTokenizer:
  """A Hugging Face `tokenizer.json`, with specials read from the checkpoint's configs.

  Args:
    path: a `tokenizer.json` file or a checkpoint directory that holds one (plus,
      optionally, `tokenizer_config.json` / `special_tokens_map.json`).
    image_token: the image placeholder token string (LLaVA: '<image>', Qwen2.5-VL:
      '<|image_pad|>').

  Qwen2.5-VL's tokenizer_config.json has "bos_token": null and eos '<|im_end|>': no bos is
  added (`bos_id` None, `add_bos` False).
  """

  def __init__(self, path: str | os.PathLike, image_token: str = '<image>'):
    path = os.fspath(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f'{file} not found: point config.data.tokenizer at the checkpoint\'s tokenizer.json '
                              f'(or the directory holding it)')
    self._tok = tokenizers.Tokenizer.from_file(file)
    # tokenizer_config.json wins over special_tokens_map.json (transformers' order).
    config = {**_read_json(os.path.join(directory, 'special_tokens_map.json')),
              **_read_json(os.path.join(directory, 'tokenizer_config.json'))}

    def lookup(key, *fallback_tokens):
      for token in (_token_content(config.get(key)),) + fallback_tokens:
        if token is not None and self._tok.token_to_id(token) is not None:
          return self._tok.token_to_id(token)
      return None

    # An explicit "bos_token": null (Qwen) means no bos, whatever the vocabulary holds (a BPE
    # vocabulary may well have '<s>'); only a config without the key falls back to the usual ones.
    self.bos_id = None if 'bos_token' in config and config['bos_token'] is None else lookup(
        'bos_token', '<s>', '<|begin_of_text|>', '<bos>')
    self.eos_id = lookup('eos_token', '</s>', '<|end_of_text|>', '<|endoftext|>',
                         '<eos>')
    self.unk_id = lookup('unk_token', '<unk>')
    # No pad token (Llama): pad with unk, else eos; padded positions are masked anyway.
    pad_id = lookup('pad_token', '<pad>')
    if pad_id is None:
      pad_id = self.unk_id if self.unk_id is not None else self.eos_id
    self.pad_id = 0 if pad_id is None else pad_id
    if self.eos_id is None:
      raise ValueError(f'No eos token found in {path}.')
    self.image_token = image_token
    self.image_token_id = self._tok.token_to_id(image_token)
    if self.image_token_id is None:
      raise ValueError(f'Image token {image_token!r} is not in the vocabulary of {path}.')
    # Llama-family tokenizers prepend bos; prompt_ids adds it explicitly.
    self.add_bos = bool(config.get('add_bos_token', True)) and self.bos_id is not None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos (prompt_ids adds those)."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first eos, special tokens skipped, whitespace stripped."""
    # Also drop bos / pad / image explicitly: a tokenizer.json need not mark them special.
    skip = {self.bos_id, self.pad_id, self.image_token_id}
    kept = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i not in skip:
        kept.append(i)
    return self._tok.decode(kept, skip_special_tokens=True).strip()


Tokenizer = WordTokenizer | HFTokenizer


def tokenizer_path(config: Mapping[str, Any]) -> str | None:
  """The tokenizer of a pipeline config (a ConfigDict or its dict): config.data.tokenizer, else
  a Hugging Face teacher's own directory; None: the synthetic set's WordTokenizer."""
  data, teacher = config.get('data') or {}, config.get('teacher') or {}
  return data.get('tokenizer') or (teacher.get('init') if teacher.get('format') == 'hf' else None)


def mismatch(tokenizer: Tokenizer, *, vocab_size: int, image_token_id: int) -> str | None:
  """Why `tokenizer` is not the model's (another model's tokenizer decodes nonsense and raises
  nothing); None when it fits."""
  if tokenizer.vocab_size > vocab_size:
    return f'tokenizer has {tokenizer.vocab_size} tokens but the model\'s vocab_size is {vocab_size}'
  if tokenizer.image_token_id != image_token_id:
    return (f'the model\'s image_token_id is {image_token_id} but the tokenizer\'s image token is '
            f'{tokenizer.image_token_id}: the tokenizer does not belong to this model')
  return None


def prompt_ids(tokenizer: Tokenizer, question: str, num_image_tokens: int,
               template: str = LLAVA_PROMPT) -> list[int]:
  """The prompt for one question, image placeholder expanded to `num_image_tokens` ids.

  WordTokenizer: `[bos] + [image] * N + encode(question)` (`template` does not apply).
  HFTokenizer: `template` (default LLaVA-1.5's VQA prompt `USER: <image>\\n{question}\\nAnswer
  the question using a single word or phrase. ASSISTANT:`, the one every evaluation uses;
  `models.families` has each family's) after bos (if the tokenizer adds one), its
  single image token (`tokenizer.image_token`) replaced by N.
  """
  if isinstance(tokenizer, WordTokenizer):
    return ([tokenizer.bos_id] + [tokenizer.image_token_id] * num_image_tokens
            + tokenizer.encode(question))
  # Encode the whole text at once (tokenizers splits on the added <image> token), so
  # the text around the image tokenizes exactly as in LLaVA's own processor.
  ids = tokenizer.encode(template.format(question=question))
  if ids.count(tokenizer.image_token_id) != 1:
    raise ValueError(f'Expected one {tokenizer.image_token!r} token in the prompt, got '
                     f'{ids.count(tokenizer.image_token_id)}; is it an added token?')
  k = ids.index(tokenizer.image_token_id)
  ids = ids[:k] + [tokenizer.image_token_id] * num_image_tokens + ids[k + 1:]
  return ([tokenizer.bos_id] if tokenizer.add_bos else []) + ids
