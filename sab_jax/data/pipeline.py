"""Grain input pipeline: VQA records -> fixed-shape numpy batches for LLaVA-style models.

One example is laid out as `[prompt, left-padded to Lp][answer + eos, right-padded to La]`,
so every answer starts at column Lp and a batch needs no ragged shapes:

    input_ids       int32   [B, Lp+La]  pad | bos image*N question | answer eos | pad
    attention_mask  int32   [B, Lp+La]  1 on real tokens (positions = cumsum(mask) - 1)
    loss_mask       float32 [B, Lp+La]  1 at t when input_ids[t+1] is an answer token or eos
    prompt_ids      int32   [B, Lp]     the left-padded prompt (greedy decoding starts here)
    prompt_mask     int32   [B, Lp]
    pixel_values    float32 [B, H, W, 3]  (uint8 / 255 - mean) / std
    answer          str     [B]         the reference answer
    answers         str     [B, A]      all reference answers (A = 1 synthetic, 10 VQAv2)
    question_type   int32   [B]         index into `question_types`
    example_id      int64   [B]         only when the source records have it
    valid           int32   [B]         only with pad_shards: 0 on padding rows

Records come from any random-access source (`tfds.data_source(...)[split]`,
`builder.as_data_source()[split]`) with fields image, question, answer and optionally
answers, question_type, example_id (str or bytes for text). Each process reads its own
shard; shuffling is seeded and reshuffles every epoch; the returned `grain.IterDataset`'s
iterator has `get_state()` / `set_state()` (and works with `grain.checkpoint`), so a run
resumes on exactly the batch it stopped at.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence, SupportsIndex

import grain
import jax
import numpy as np
from PIL import Image

from sab_jax.data import images, synthetic_vqa
from sab_jax.data import tokenizer as tokenizer_lib

# CLIP's per-channel image statistics (OpenAI CLIP: LLaVA's vision tower, Qwen2-VL's processor).
CLIP_MEAN, CLIP_STD = images.OPENAI_CLIP_MEAN, images.OPENAI_CLIP_STD


def _text(value: Any) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def to_pixels(image: Any, *, image_size: int | None, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 image (array or encoded bytes, RGB or grey) -> float32 [H, W, 3]: resized to the
  `image_size` square (bicubic; None: kept), scaled to [0, 1], normalised per channel."""
  if isinstance(image, (bytes, np.bytes_)):
    image = np.asarray(Image.open(io.BytesIO(image)).convert('RGB'))
  image = np.asarray(image)
  if image.ndim == 2 or image.shape[-1] == 1:
    image = np.broadcast_to(image.reshape(image.shape[:2] + (1,)), image.shape[:2] + (3,))
  if image_size is not None and image.shape[:2] != (image_size,) * 2:
    image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((image_size, image_size), Image.BICUBIC))
  return (image.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


class Preprocess:
  """Turns one record into the fixed-shape arrays of one batch row (see module doc)."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, *, num_image_tokens: int,
               image_mean: Sequence[float], image_std: Sequence[float],
               max_prompt_len: int, max_answer_len: int, image_size: int | None = None,
               question_types: Sequence[str] = synthetic_vqa.QUESTION_TYPES,
               prompt_template: str = tokenizer_lib.LLAVA_PROMPT):
    self.tokenizer = tokenizer
    self.prompt_template = prompt_template
    self.num_image_tokens = num_image_tokens
    self.mean = np.asarray(image_mean, np.float32)
    self.std = np.asarray(image_std, np.float32)
    self.max_prompt_len = max_prompt_len
    self.max_answer_len = max_answer_len
    self.image_size = image_size
    self.question_types = tuple(question_types)

  def tokens(self, question: str, answer: str) -> dict[str, np.ndarray]:
    """input_ids / attention_mask / loss_mask / prompt_ids / prompt_mask of one example."""
    tok, lp, la = self.tokenizer, self.max_prompt_len, self.max_answer_len
    prompt = tokenizer_lib.prompt_ids(tok, question, self.num_image_tokens, self.prompt_template)
    target = tok.encode(answer) + [tok.eos_id]
    if len(prompt) > lp:
      raise ValueError(
          f'Prompt has {len(prompt)} tokens ({self.num_image_tokens} image tokens) but '
          f'max_prompt_len={lp}; raise max_prompt_len. Question: {question!r}')
    if len(target) > la:
      raise ValueError(
          f'Answer + eos has {len(target)} tokens but max_answer_len={la}; raise '
          f'max_answer_len. Answer: {answer!r}')
    input_ids = np.full(lp + la, tok.pad_id, np.int32)
    attention_mask = np.zeros(lp + la, np.int32)
    input_ids[lp - len(prompt):lp] = prompt
    input_ids[lp:lp + len(target)] = target
    attention_mask[lp - len(prompt):lp + len(target)] = 1
    # Logits at t predict token t+1: the answer's logits sit at Lp-1 .. Lp+len-2.
    loss_mask = np.zeros(lp + la, np.float32)
    loss_mask[lp - 1:lp - 1 + len(target)] = 1.0
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                prompt_ids=input_ids[:lp].copy(), prompt_mask=attention_mask[:lp].copy())

  def pixels(self, image: Any) -> np.ndarray:
    """uint8 image (array or encoded bytes) -> normalised float32 [H, W, 3]."""
    return to_pixels(image, image_size=self.image_size, mean=self.mean, std=self.std)

  def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
    answer = _text(record['answer'])
    out = self.tokens(_text(record['question']), answer)
    out['pixel_values'] = self.pixels(record['image'])
    out['answer'] = np.asarray(answer)
    answers = record.get('answers')
    out['answers'] = np.asarray([_text(a) for a in answers] if answers is not None
                                else [answer])
    qtype = record.get('question_type', 0)
    if isinstance(qtype, (bytes, str)):
      qtype = self.question_types.index(_text(qtype))
    out['question_type'] = np.int32(qtype)
    if 'example_id' in record:
      out['example_id'] = np.int64(record['example_id'])
    return out


def _mark(valid: int):
  """Sets a row's `valid` flag (0: padding that evaluation skips)."""
  def mark(row):
    return {**row, 'valid': np.int32(valid)}
  return mark


def _curriculum(shard: grain.MapDataset, types: np.ndarray,
                phases: Sequence[tuple[int, Mapping[str, float]]], batch_size: int,
                seed: int | None) -> grain.MapDataset:
  """One endless random-access stream of the shard's records: phase by phase, a weighted
  mixture of per-question-type streams (each shuffled and repeated on its own).
  `types[i]` is the question type of `shard[i]`."""
  streams: dict[str, grain.MapDataset] = {}

  def stream(qtype: str) -> grain.MapDataset:
    if qtype not in streams:
      idx = np.arange(len(shard)) if qtype == '*' else np.flatnonzero(types == qtype)
      if not len(idx):
        raise ValueError(f'phases name question type {qtype!r}, which no record of this shard has; '
                         f'types present: {sorted(set(types.tolist()))}')
      ds = grain.MapDataset.range(len(idx)).map(lambda i, idx=idx: int(idx[i]))
      ds = ds.shuffle(seed=seed + len(streams)) if seed is not None else ds
      streams[qtype] = ds.repeat(None)
    return streams[qtype]

  parts = []
  for i, (num_batches, weights) in enumerate(phases):
    names = sorted(weights)
    if any(weights[n] < 0 for n in names) or sum(weights[n] for n in names) <= 0:
      raise ValueError(f'phase {i}: weights must be >= 0 with a positive sum, got {dict(weights)}')
    names = [n for n in names if weights[n] > 0]
    mixed = grain.MapDataset.mix([stream(n) for n in names], [weights[n] for n in names])
    # The last phase has no end (2**40 records stands for that: grain concatenates only finite parts).
    parts.append(mixed[:(2**40 if i == len(phases) - 1 else int(num_batches) * batch_size)])
  order = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  return order.map(lambda i: shard[i])


def make_dataset(
    source: Any,
    tokenizer: tokenizer_lib.Tokenizer,
    *,
    num_image_tokens: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    batch_size: int,
    max_prompt_len: int,
    max_answer_len: int,
    shuffle: bool = True,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: SupportsIndex | None = None,
    shard_count: SupportsIndex | None = None,
    drop_remainder: bool = True,
    image_size: int | None = None,
    question_types: Sequence[str] = synthetic_vqa.QUESTION_TYPES,
    read_threads: int = 2,
    max_records: int | None = None,
    pad_shards: bool = False,
    phases: Sequence[tuple[int, Mapping[str, float]]] = (),
    record_types: Sequence[str] | None = None,
    prompt_template: str = tokenizer_lib.LLAVA_PROMPT,
) -> grain.IterDataset:
  """Batches of one process's shard of a random-access VQA source.

  Args:
    source: random-access records (`__len__`, `__getitem__`), e.g. a TFDS data source.
    tokenizer: a WordTokenizer or HFTokenizer.
    num_image_tokens: image placeholder tokens per prompt (= image features per image).
    image_mean: per-channel mean of [0, 1] pixels (CLIP_MEAN for CLIP towers).
    image_std: per-channel std (CLIP_STD).
    batch_size: examples per batch on this process.
    max_prompt_len: Lp, prompt length after left padding; longer prompts raise.
    max_answer_len: La, answer + eos length after right padding; longer answers raise.
    shuffle: shuffle the shard, with a new order each epoch.
    seed: shuffle seed (the same on every process; shards are disjoint anyway).
    num_epochs: passes over the shard; None repeats forever.
    shard_index: this process's shard; defaults to jax.process_index().
    shard_count: number of shards; defaults to jax.process_count().
    drop_remainder: drop the last partial batch, and the records beyond a multiple of
      shard_count so that every shard has the same length (processes stay in step).
      With False (evaluation), shards differ by at most one record and the last batch
      may be short.
    image_size: resize images to this square size if they differ (None: keep).
    question_types: names that string question types are indexed into.
    read_threads: threads preparing batches ahead of the consumer.
    max_records: use only the source's first `max_records` records (before sharding, so
      the subset does not depend on the number of processes).
    pad_shards: with drop_remainder=False, pad every shard to the same number of full
      batches with copies of its first record marked `valid` 0 (every batch has a `valid`
      column): processes then run the same computations in step, as a model sharded
      across processes needs.
    phases: a curriculum for endless training streams: `(num_batches, {question_type:
      weight})` pairs, in order; each batch draws its records from the named types in
      those proportions (`'*'`: any record), and the last phase runs on forever. Empty:
      the shard as it is.
    record_types: the question type of every record of `source` (needed with phases;
      reading them without decoding images is the caller's business).
    prompt_template: the prompt of a Hugging Face tokenizer (`models.families.prompt_template`;
      a WordTokenizer has one format and ignores it).

  Returns:
    A `grain.IterDataset` of batch dicts (see module docstring); `iter()` it, and
    checkpoint the iterator with `get_state()` / `set_state()`.
  """
  shard_index = jax.process_index() if shard_index is None else int(shard_index)
  shard_count = jax.process_count() if shard_count is None else int(shard_count)
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} not in [0, shard_count={shard_count}).')
  ds = grain.MapDataset.source(source)
  # one question type per record, sliced exactly as `ds` is (placeholders without record_types)
  types = np.asarray(record_types) if record_types is not None else np.zeros(len(ds), np.int8)
  if len(types) != len(ds):
    raise ValueError(f'record_types has {len(types)} entries for a source of {len(ds)} records')
  if max_records is not None:
    ds, types = ds[:max_records], types[:max_records]
  total = len(ds)
  if drop_remainder:
    keep = len(ds) // shard_count * shard_count
    ds, types = ds[:keep], types[:keep]
  ds, types = ds[shard_index::shard_count], types[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f'Shard {shard_index} of {shard_count} of a source of '
                     f'{len(source)} records is empty.')
  if pad_shards and (drop_remainder or num_epochs != 1):
    raise ValueError('pad_shards is for one pass of evaluation: it needs drop_remainder=False, num_epochs=1')
  pad = 0
  if pad_shards:
    per_shard = -(-total // shard_count)
    pad = -(-per_shard // batch_size) * batch_size - len(ds)
  if phases:
    if num_epochs is not None or record_types is None:
      raise ValueError('phases are for endless training streams: they need num_epochs=None and record_types')
    ds = _curriculum(ds, types, phases, batch_size, seed if shuffle else None)
  else:
    if shuffle:
      ds = ds.shuffle(seed=seed)
    # After shuffle, so each epoch gets its own order.
    ds = ds.repeat(num_epochs)
  ds = ds.map(Preprocess(
      tokenizer, num_image_tokens=num_image_tokens, image_mean=image_mean,
      image_std=image_std, max_prompt_len=max_prompt_len, max_answer_len=max_answer_len,
      image_size=image_size, question_types=question_types, prompt_template=prompt_template))
  if pad:
    ds = grain.MapDataset.concatenate([ds.map(_mark(1)), ds[:1].repeat(pad).map(_mark(0))])
  elif pad_shards:
    ds = ds.map(_mark(1))
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=2 * read_threads))
