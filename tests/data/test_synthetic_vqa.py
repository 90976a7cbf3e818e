"""Tests of the synthetic shapes-VQA generator and its TFDS builder (tiny config)."""

import collections
import hashlib
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sab_jax.data import synthetic_vqa as sv

NUM_SAMPLES = 3000


@pytest.fixture(scope='module')
def samples():
  return list(sv.generate_split('train', NUM_SAMPLES, base_seed=7, with_scene=True))


# An independent oracle: parse the question, resolve its references against the scene
# metadata (raising unless each denotes exactly one object) and recompute the answer.

def _yes(b):
  return 'yes' if b else 'no'


def _filter(phrase):
  """'red circles' / 'circles' / 'red objects' -> attribute dict."""
  *adj, noun = phrase.split()
  desc = {}
  if adj:
    assert len(adj) == 1 and adj[0] in sv.COLORS, phrase
    desc['color'] = adj[0]
  if noun != 'objects':
    desc['shape'] = {v: k for k, v in sv.SHAPE_PLURALS.items()}[noun]
  return desc


def _count(scene, desc):
  return sum(all(getattr(o, k) == v for k, v in desc.items()) for o in scene)


def oracle(question, scene):
  if m := re.fullmatch(r'what (color|shape|size) is the (.+)\?', question):
    attr, ref = m.groups()
    values = {'color': sv.COLORS, 'shape': sv.SHAPES, 'size': sv.SIZES}[attr]
    assert not set(ref.split()) & set(values), f'{question}: reference names the answer'
    return getattr(scene[sv.resolve(scene, ref)], attr)
  if m := re.fullmatch(r'how many (.+) are there\?', question):
    return sv.NUMBER_WORDS[_count(scene, _filter(m.group(1)))]
  if m := re.fullmatch(r'is there a (\w+) (\w+)\?', question):
    return _yes(_count(scene, {'color': m.group(1), 'shape': m.group(2)}) > 0)
  if m := re.fullmatch(r'is the (.+) (left of|right of|above|below) the (.+)\?', question):
    a, rel, b = m.groups()
    a, b = scene[sv.resolve(scene, a)], scene[sv.resolve(scene, b)]
    assert a is not b
    if rel in ('left of', 'right of'):
      assert a.col != b.col, question
      return _yes(a.col < b.col if rel == 'left of' else a.col > b.col)
    assert a.row != b.row, question
    return _yes(a.row < b.row if rel == 'above' else a.row > b.row)
  if m := re.fullmatch(r'is the (.+) (larger|smaller) than the (.+)\?', question):
    a, word, b = m.groups()
    assert not set((a + ' ' + b).split()) & set(sv.SIZES), question
    a, b = scene[sv.resolve(scene, a)], scene[sv.resolve(scene, b)]
    assert a is not b
    want = ('large', 'small') if word == 'larger' else ('small', 'large')
    return _yes((a.size, b.size) == want)
  if m := re.fullmatch(r'are there more (.+) than (.+)\?', question):
    return _yes(_count(scene, _filter(m.group(1))) > _count(scene, _filter(m.group(2))))
  raise AssertionError(f'Unknown template: {question!r}')


def test_answers_match_scene_and_referents_are_unique(samples):
  """Recomputing every answer from the scene metadata gives the generated answer."""
  for ex in samples:
    assert oracle(ex['question'], ex['scene']) == ex['answer'], ex['question']


def test_image_matches_scene(samples):
  """Each object is drawn in its own colour, wholly inside its own cell; the rest is
  background."""
  for ex in samples[:500]:
    image, scene = ex['image'], ex['scene']
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    cells = {(o.row, o.col): o for o in scene}
    assert len(cells) == len(scene)
    for r in range(sv.GRID_SIZE):
      for c in range(sv.GRID_SIZE):
        cell = image[16 * r:16 * r + 16, 16 * c:16 * c + 16].reshape(-1, 3)
        fg = cell[(cell != sv.BACKGROUND_RGB).any(-1)]
        o = cells.get((r, c))
        if o is None:
          assert len(fg) == 0
          continue
        assert (fg == sv.COLORS_RGB[o.color]).all()
        assert len(fg) == sv.shape_mask(o.shape, o.radius).sum()
        assert o.radius in sv.SIZE_RADII[o.size]
        assert 16 * r <= o.cy - o.radius and o.cy + o.radius < 16 * r + 16
        assert 16 * c <= o.cx - o.radius and o.cx + o.radius < 16 * c + 16


def test_shapes_are_distinct():
  """No two shapes draw the same mask at any radius."""
  for radius in (3, 4, 6, 7):
    masks = {s: sv.shape_mask(s, radius).tobytes() for s in sv.SHAPES}
    assert len(set(masks.values())) == len(sv.SHAPES)


def test_answer_vocabulary_per_type(samples):
  """Every question type produces exactly its expected answer set."""
  answers = collections.defaultdict(set)
  for ex in samples:
    answers[ex['question_type']].add(ex['answer'])
  assert set(answers) == set(sv.QUESTION_TYPES)
  for qtype, expected in sv.ANSWERS_BY_TYPE.items():
    assert answers[qtype] == set(expected), qtype


def test_all_words_in_vocabulary(samples):
  vocab = set(sv.VOCABULARY)
  assert len(vocab) == len(sv.VOCABULARY)
  for ex in samples:
    words = re.findall(r"[a-z]+|\?", ex['question'] + ' ' + ex['answer'])
    assert set(words) <= vocab, ex['question']


def test_max_lengths(samples):
  """The published length bounds hold and are reached."""
  q_len = max(len(re.findall(r"[a-z]+|\?", ex['question'])) for ex in samples)
  a_len = max(len(ex['answer'].split()) for ex in samples)
  assert (q_len, a_len) == (sv.MAX_QUESTION_TOKENS, sv.MAX_ANSWER_TOKENS)


def test_balance(samples):
  """Types uniform, yes/no 50/50, counts roughly uniform over zero..six."""
  by_type = collections.defaultdict(list)
  for ex in samples:
    by_type[ex['question_type']].append(ex['answer'])
  for qtype in sv.QUESTION_TYPES:
    assert 0.16 < len(by_type[qtype]) / NUM_SAMPLES < 0.24, qtype
  for qtype in ('exist', 'relation', 'compare'):
    assert 0.44 < by_type[qtype].count('yes') / len(by_type[qtype]) < 0.56, qtype
  counts = collections.Counter(by_type['count'])
  for word in sv.NUMBER_WORDS:
    assert 0.09 < counts[word] / len(by_type['count']) < 0.2, word
  # Both compare forms and all relation words occur.
  questions = ' '.join(ex['question'] for ex in samples)
  for phrase in ('larger than', 'smaller than', 'are there more', 'left of', 'right of',
                 'above', 'below'):
    assert phrase in questions


def test_generate_example_is_deterministic():
  a = sv.generate_example(np.random.default_rng(123))
  b = sv.generate_example(np.random.default_rng(123))
  assert a['question'] == b['question'] and a['answer'] == b['answer']
  assert a['image'].tobytes() == b['image'].tobytes()
  assert sv.encode_png(a['image']) == sv.encode_png(b['image'])


def test_split_independent_of_size():
  """Example i of a split does not depend on how many examples are generated."""
  full = list(sv.generate_split('test', 12, base_seed=0))
  tail = list(sv.generate_split('test', 4, base_seed=0, start=8))
  for a, b in zip(full[8:], tail):
    assert a['question'] == b['question'] and (a['image'] == b['image']).all()


def _key(ex):
  return hashlib.sha256(ex['image'].tobytes() + ex['question'].encode()).hexdigest()


def test_splits_disjoint():
  """Different seeds per split, and no (image, question) pair shared between splits."""
  keys = {}
  for split in sv.SPLIT_IDS:
    keys[split] = {_key(ex) for ex in sv.generate_split(split, 300, base_seed=0)}
    assert len(keys[split]) == 300
  assert not keys['train'] & keys['validation']
  assert not keys['train'] & keys['test']
  assert not keys['validation'] & keys['test']
  states = {str(sv.example_rng(s, 0).bit_generator.state) for s in sv.SPLIT_IDS}
  assert len(states) == 3
  with pytest.raises(ValueError, match='Unknown split'):
    sv.example_rng('dev', 0)


def test_majority_baseline():
  train = [dict(question_type='exist', answer='yes'), dict(question_type='exist', answer='yes'),
           dict(question_type='exist', answer='no'), dict(question_type='count', answer=b'two')]
  evaluation = [dict(question_type='exist', answer='no'), dict(question_type='exist', answer='yes'),
                dict(question_type='count', answer='two')]
  result = sv.majority_baseline(train, evaluation)
  assert result == {'count': 1.0, 'exist': 0.5, 'overall': 2 / 3}


def _read_all(builder):
  out = {}
  for split, source in builder.as_data_source().items():
    out[split] = [source[i] for i in range(len(source))]
  return out


@pytest.fixture(scope='module')
def two_builds(tmp_path_factory):
  return [sv.build('tiny', tmp_path_factory.mktemp(f'build{i}')) for i in range(2)]


def test_builder_records_match_generator(two_builds):
  """Record i of each split is example i of the split, image decoded losslessly."""
  records = _read_all(two_builds[0])
  assert {k: len(v) for k, v in records.items()} == {'train': 64, 'validation': 32, 'test': 32}
  for split, recs in records.items():
    for i, (rec, ex) in enumerate(zip(recs, sv.generate_split(split, len(recs)))):
      assert rec['example_id'] == i
      assert rec['question'].decode() == ex['question']
      assert rec['answer'].decode() == ex['answer']
      assert [a.decode() for a in rec['answers']] == [ex['answer']]
      assert rec['question_type'].decode() == ex['question_type']
      assert rec['image'].dtype == np.uint8 and (rec['image'] == ex['image']).all()


def test_builder_is_deterministic(two_builds):
  """Two builds in fresh directories give the same examples and the same files."""
  def digest(builder):
    h = hashlib.sha256()
    for split, recs in sorted(_read_all(builder).items()):
      for rec in recs:
        h.update(split.encode() + rec['image'].tobytes() + rec['question'] + rec['answer'])
    return h.hexdigest()
  assert digest(two_builds[0]) == digest(two_builds[1])

  def files(builder):
    root = pathlib.Path(builder.data_dir)
    return {p.name: p.read_bytes() for p in root.glob('*.array_record*')}
  a, b = files(two_builds[0]), files(two_builds[1])
  assert len(a) == 3 and a == b


def test_data_source_by_name(two_builds):
  """tfds.data_source finds the registered builder's files; a rebuild is a no-op."""
  data_dir = pathlib.Path(two_builds[0].data_dir).parents[2]
  source = tfds.data_source('synthetic_vqa/tiny', data_dir=str(data_dir))
  assert len(source['test']) == 32
  assert sv.build('tiny', data_dir).info.splits['train'].num_examples == 64
