"""Tests of the grain VQA pipeline: batch layout, errors, checkpointing and sharding."""

import json

import numpy as np
import pytest

from sab_jax.data import pipeline
from sab_jax.data import synthetic_vqa as sv
from sab_jax.data import tokenizer as tok_lib

LP, LA, N_IMG = 28, 3, 16


@pytest.fixture(scope='module')
def sources(tiny_vqa):
  return tiny_vqa


@pytest.fixture(scope='module')
def tok():
  return tok_lib.WordTokenizer.for_synthetic_vqa()


def _dataset(source, tok, **overrides):
  kwargs = dict(num_image_tokens=N_IMG, image_mean=pipeline.CLIP_MEAN,
                image_std=pipeline.CLIP_STD, batch_size=8, max_prompt_len=LP,
                max_answer_len=LA, shuffle=True, seed=0, num_epochs=1, shard_index=0,
                shard_count=1, drop_remainder=True)
  kwargs.update(overrides)
  return pipeline.make_dataset(source, tok, **kwargs)


def _ids(batches):
  return [int(i) for b in batches for i in b['example_id']]


def test_batch_layout(sources, tok):
  """Shapes, dtypes, padding sides, masks and pixels agree with the generator."""
  batches = list(_dataset(sources['validation'], tok, batch_size=8))
  assert len(batches) == 4
  b = batches[0]
  shapes = {k: (v.shape, v.dtype.kind + str(v.dtype.itemsize)) for k, v in b.items()}
  assert shapes == {
      'input_ids': ((8, LP + LA), 'i4'), 'attention_mask': ((8, LP + LA), 'i4'),
      'loss_mask': ((8, LP + LA), 'f4'), 'prompt_ids': ((8, LP), 'i4'),
      'prompt_mask': ((8, LP), 'i4'), 'pixel_values': ((8, 64, 64, 3), 'f4'),
      'answer': ((8,), 'U' + str(b['answer'].dtype.itemsize)),
      'answers': ((8, 1), 'U' + str(b['answers'].dtype.itemsize)),
      'question_type': ((8,), 'i4'), 'example_id': ((8,), 'i8')}
  for b in batches:
    for row in range(8):
      ex = sv.generate_example(sv.example_rng('validation', int(b['example_id'][row])))
      ids, mask, loss = b['input_ids'][row], b['attention_mask'][row], b['loss_mask'][row]
      prompt = tok_lib.prompt_ids(tok, ex['question'], N_IMG)
      target = tok.encode(ex['answer']) + [tok.eos_id]
      # Prompt left-padded, answer + eos from column LP, right-padded.
      assert list(ids[LP - len(prompt):LP]) == prompt
      assert (ids[:LP - len(prompt)] == tok.pad_id).all()
      assert list(ids[LP:LP + len(target)]) == target
      assert (ids[LP + len(target):] == tok.pad_id).all()
      assert (mask == (np.arange(LP + LA) >= LP - len(prompt))
              & (np.arange(LP + LA) < LP + len(target))).all()
      # loss_mask marks exactly the positions whose next token is answer or eos.
      (pos,) = np.nonzero(loss)
      assert list(ids[pos + 1]) == target and pos[0] == LP - 1
      assert (b['prompt_ids'][row] == ids[:LP]).all()
      assert (b['prompt_mask'][row] == mask[:LP]).all()
      assert tok.decode(b['prompt_ids'][row]) == ex['question']
      assert tok.decode(ids[LP:]) == ex['answer'] == b['answer'][row]
      assert list(b['answers'][row]) == [ex['answer']]
      assert sv.QUESTION_TYPES[b['question_type'][row]] == ex['question_type']
      want = (ex['image'] / 255.0 - np.array(pipeline.CLIP_MEAN)) / np.array(pipeline.CLIP_STD)
      np.testing.assert_allclose(b['pixel_values'][row], want, rtol=1e-5, atol=1e-5)


def test_length_errors(sources, tok):
  """Too-short Lp / La raise a ValueError naming the setting to raise."""
  with pytest.raises(ValueError, match='max_prompt_len=10; raise max_prompt_len'):
    next(iter(_dataset(sources['test'], tok, max_prompt_len=10)))
  with pytest.raises(ValueError, match='max_answer_len=1; raise max_answer_len'):
    next(iter(_dataset(sources['test'], tok, max_answer_len=1)))


def test_epochs_reshuffle_and_seed(sources, tok):
  """Each epoch is a permutation of the split, reshuffled; the seed fixes the order."""
  ids = _ids(_dataset(sources['train'], tok, num_epochs=2))
  first, second = ids[:64], ids[64:]
  assert sorted(first) == sorted(second) == list(range(64))
  assert first != second and first != list(range(64))
  assert ids == _ids(_dataset(sources['train'], tok, num_epochs=2))
  assert ids != _ids(_dataset(sources['train'], tok, num_epochs=2, seed=1))
  assert _ids(_dataset(sources['train'], tok, shuffle=False)) == list(range(64))


def test_checkpoint_restore_mid_epoch(sources, tok):
  """Restoring a saved iterator state replays exactly the following batches."""
  ds = _dataset(sources['train'], tok, num_epochs=None)  # 8 batches per epoch
  it = iter(ds)
  for _ in range(5):
    next(it)
  # What a checkpoint stores (grain.checkpoint writes the state as JSON).
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(6)]  # crosses into the second epoch
  restored = iter(_dataset(sources['train'], tok, num_epochs=None))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize('drop_remainder', [False, True])
def test_shards_disjoint_and_cover(sources, tok, drop_remainder):
  """Shards of 2 processes are disjoint; together they cover the split."""
  shards = [_ids(_dataset(sources['validation'], tok, shard_index=i, shard_count=2,
                          batch_size=4, drop_remainder=drop_remainder))
            for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(32))
  with pytest.raises(ValueError, match='shard_index'):
    _dataset(sources['validation'], tok, shard_index=2, shard_count=2)


def test_uneven_shards(tok):
  """An odd-sized source: equal shards when dropping the remainder, full cover if not."""
  records = [dict(image=np.zeros((64, 64, 3), np.uint8), question='is there a red circle?',
                  answer='yes', question_type='exist', example_id=i) for i in range(7)]
  kept = [_ids(_dataset(records, tok, shard_index=i, shard_count=2, batch_size=1))
          for i in range(2)]
  assert len(kept[0]) == len(kept[1]) == 3 and not set(kept[0]) & set(kept[1])
  full = [_ids(_dataset(records, tok, shard_index=i, shard_count=2, batch_size=2,
                        drop_remainder=False)) for i in range(2)]
  assert sorted(full[0] + full[1]) == list(range(7))
  batch = next(iter(_dataset(records, tok, batch_size=7)))
  assert batch['answers'].tolist() == [['yes']] * 7  # answers defaults to [answer]


def test_padded_evaluation_shards(tok):
  """pad_shards: every process gets the same number of full batches; the rows marked valid
  are exactly the first max_records records, each once."""
  records = [dict(image=np.zeros((64, 64, 3), np.uint8), question='is there a red circle?',
                  answer='yes', question_type='exist', example_id=i) for i in range(11)]
  shards = [list(_dataset(records, tok, shard_index=i, shard_count=3, batch_size=2, shuffle=False,
                          drop_remainder=False, max_records=9, pad_shards=True)) for i in range(3)]
  assert [len(s) for s in shards] == [2, 2, 2]  # 3 records per shard -> 2 batches of 2 everywhere
  assert all(len(b['valid']) == 2 for s in shards for b in s)
  valid = [int(i) for s in shards for b in s for i, v in zip(b['example_id'], b['valid']) if v]
  assert sorted(valid) == list(range(9))
  assert sum(int(v) for s in shards for b in s for v in b['valid']) == 9
  with pytest.raises(ValueError, match='pad_shards'):
    _dataset(records, tok, pad_shards=True)  # drop_remainder=True: nothing to pad


def test_hf_tokenizer_and_encoded_images(tmp_path):
  """The pipeline also takes an HFTokenizer, PNG-bytes images and resizing."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  words = ['<unk>', '<s>', '</s>', 'USER', ':', 'ASSISTANT', 'yes', 'is', 'there', '?']
  t = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)},
                                            unk_token='<unk>'))
  t.pre_tokenizer = pre_tokenizers.Whitespace()
  t.add_special_tokens(['<unk>', '<s>', '</s>', '<image>'])
  t.save(str(tmp_path / 'tokenizer.json'))
  hf = tok_lib.HFTokenizer(tmp_path)
  image = np.full((32, 32, 3), 200, np.uint8)
  records = [dict(image=sv.encode_png(image), question='is there?', answer='yes')] * 2
  kwargs = dict(num_image_tokens=4, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                batch_size=2, max_prompt_len=40, max_answer_len=2, num_epochs=1,
                shard_index=0, shard_count=1, image_size=64)
  b = next(iter(pipeline.make_dataset(records, hf, **kwargs)))
  assert b['pixel_values'].shape == (2, 64, 64, 3)
  np.testing.assert_allclose(b['pixel_values'], 200 / 255 * 2 - 1, atol=1e-5)
  assert (b['input_ids'][:, 40:] == [hf.encode('yes')[0], hf.eos_id]).all()
  assert hf.decode(b['input_ids'][0, 40:]) == 'yes'
  assert (b['input_ids'][0] == hf.image_token_id).sum() == 4


def _types(source):
  return [str(source[i]['question_type'].decode() if isinstance(source[i]['question_type'], bytes)
              else source[i]['question_type']) for i in range(len(source))]


def test_curriculum_phases_mix_types_and_resume_exactly(sources, tok):
  """Phase 1 draws only relation/compare records (3:1), then any record; a checkpointed
  iterator resumes on the same batches across the phase boundary."""
  src = sources['train']
  types = _types(src)
  phases = [(3, {'relation': 3.0, 'compare': 1.0}), (1, {'*': 1.0})]
  ds = _dataset(src, tok, num_epochs=None, phases=phases, record_types=types)
  it = iter(ds)
  batches = [next(it) for _ in range(8)]
  names = sv.QUESTION_TYPES
  first = [names[t] for b in batches[:3] for t in b['question_type']]
  assert set(first) == {'relation', 'compare'}
  assert first.count('relation') == 18 and first.count('compare') == 6  # grain's mix keeps the ratio exactly
  for b in batches[:3]:  # records really are of the type the stream says
    for i, t in zip(b['example_id'], b['question_type']):
      assert types[int(i)] == names[t]
  later = {names[t] for b in batches[3:] for t in b['question_type']}
  assert len(later) >= 4  # the whole split again
  it = iter(_dataset(src, tok, num_epochs=None, phases=phases, record_types=types))
  next(it), next(it)
  state = json.loads(json.dumps(it.get_state()))
  restored = iter(_dataset(src, tok, num_epochs=None, phases=phases, record_types=types))
  restored.set_state(state)
  for want in batches[2:6]:
    np.testing.assert_array_equal(next(restored)['example_id'], want['example_id'])


def test_curriculum_errors(sources, tok):
  src = sources['train']
  types = _types(src)
  with pytest.raises(ValueError, match="'where'"):
    _dataset(src, tok, num_epochs=None, phases=[(1, {'where': 1.0})], record_types=types)
  with pytest.raises(ValueError, match='endless'):
    _dataset(src, tok, num_epochs=1, phases=[(1, {'*': 1.0})], record_types=types)
  with pytest.raises(ValueError, match='positive sum'):
    _dataset(src, tok, num_epochs=None, phases=[(1, {'count': 0.0})], record_types=types)
  with pytest.raises(ValueError, match='record_types has'):
    _dataset(src, tok, num_epochs=None, phases=[(1, {'*': 1.0})], record_types=types[1:])


def test_curriculum_draws_the_named_type_in_every_shard(sources, tok):
  """The types stay aligned with the records after max_records and shard slicing."""
  src = sources['train']
  types = _types(src)
  for index in range(3):
    ds = _dataset(src, tok, num_epochs=None, phases=[(2, {'count': 1.0})], record_types=types,
                  shard_index=index, shard_count=3, max_records=len(src) - 5)
    it = iter(ds)
    for b in (next(it), next(it)):
      ids = [int(i) for i in b['example_id']]
      assert all(types[i] == 'count' for i in ids) and all(i % 3 == index for i in ids)
