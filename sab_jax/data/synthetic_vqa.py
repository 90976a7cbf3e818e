"""Synthetic shapes VQA: an embedded workload small enough to train on two CPU cores.

Scenes are 64x64 RGB images with 2-6 objects on a dark-grey background. Every object sits
in its own cell of a 4x4 grid of 16-px cells, aligned with a ViT's 16-px patch grid, so one
object is one image token: a tiny LLaVA-style model (16 image tokens, a small Llama
decoder) can learn the task, while binarizing it still costs measurable accuracy.

Five question types, sampled uniformly, each with one-word answers (CLEVR-style templates,
Johnson et al. 2017, https://arxiv.org/abs/1612.06890, much simplified):

* ``attribute``: "what color is the circle?" -> a colour, shape or size;
* ``count``: "how many red objects are there?" -> "zero" .. "six" (uniform);
* ``exist``: "is there a red circle?" -> yes / no (50/50, mostly hard negatives);
* ``relation``: "is the red circle left of the square?" -> yes / no (50/50);
* ``compare``: "is the circle larger than the red square?" or
  "are there more red objects than blue objects?" -> yes / no (50/50).

A referring expression ("the red circle") always denotes exactly one object: it is the
shortest unique description from a fixed preference list, and never names the attribute
that the question asks about. Every word that can appear is in `VOCABULARY`, so a word-level
tokenizer never meets an unknown word.

Everything is pure numpy: `generate_example(rng)` is a function of the generator state only,
and example i of a split is generated from a seed derived from (base seed, split, i), so the
test split is identical whatever the train size. `SyntheticVqa` is the TFDS builder
(array_record files, PNG images encoded with Pillow: no TensorFlow needed).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# ---------------------------------------------------------------------------------------
# Scene vocabulary.
# ---------------------------------------------------------------------------------------

IMAGE_SIZE = 64
# Cells are 16 px wide, the patch size of the vision tower: one object <-> one patch.
GRID_SIZE = 4
CELL_SIZE = IMAGE_SIZE // GRID_SIZE
BACKGROUND_RGB = (40, 40, 40)

SHAPES = ('circle', 'square', 'triangle', 'cross')
SHAPE_PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles',
                 'cross': 'crosses'}
# Well separated in RGB so a colour is readable from any single pixel of an object.
COLORS_RGB = {
    'red': (220, 40, 40),
    'green': (40, 200, 60),
    'blue': (50, 90, 240),
    'yellow': (230, 210, 40),
    'purple': (160, 60, 200),
    'cyan': (40, 210, 210),
}
COLORS = tuple(COLORS_RGB)
SIZES = ('small', 'large')
# Half-extent of an object in pixels; a large object still fits its 16-px cell.
SIZE_RADII = {'small': (3, 4), 'large': (6, 7)}
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')
MAX_OBJECTS = len(NUMBER_WORDS) - 1

QUESTION_TYPES = ('attribute', 'count', 'exist', 'relation', 'compare')
# Relation word -> (cell coordinate compared, sign): 'left of' holds when col1 < col2.
RELATIONS = {'left of': ('col', -1), 'right of': ('col', 1), 'above': ('row', -1),
             'below': ('row', 1)}
_OPPOSITE = {'left of': 'right of', 'right of': 'left of', 'above': 'below',
             'below': 'above'}

# The answer set of each question type (tests and the majority baseline use it).
ANSWERS_BY_TYPE = {
    'attribute': COLORS + SHAPES + SIZES,
    'count': NUMBER_WORDS,
    'exist': ('yes', 'no'),
    'relation': ('yes', 'no'),
    'compare': ('yes', 'no'),
}

_TEMPLATE_WORDS = (
    'what color shape size is the how many are there a of than larger smaller more object '
    'objects yes no left right above below ?').split()
# Every word that can appear in a question or an answer, in a fixed order (a word
# tokenizer's ids depend on it, so only ever append to this tuple).
VOCABULARY = tuple(dict.fromkeys(
    _TEMPLATE_WORDS + list(SHAPES) + list(SHAPE_PLURALS.values()) + list(COLORS)
    + list(SIZES) + list(NUMBER_WORDS)))

# Longest question ("is the large red circle left of the small red circle?") and answer,
# in word-tokenizer tokens: a prompt needs 1 (bos) + image tokens + 12 positions.
MAX_QUESTION_TOKENS = 12
MAX_ANSWER_TOKENS = 1

# Referring-expression preference lists: shortest unique description first. A question
# about attribute A never describes its referent with A.
_REFS_DEFAULT = (('shape',), ('color', 'shape'), ('size', 'color', 'shape'))
_REFS_EXCLUDING = {
    'color': (('shape',), ('size', 'shape')),
    'shape': (('color',), ('size', 'color')),
    'size': (('shape',), ('color', 'shape')),
}

# Scenes resampled before a question with the drawn answer is found (rarely more than 3).
_MAX_TRIES = 1000


class SceneObject(NamedTuple):
  """One object of a scene: attributes, grid cell and pixel geometry."""
  shape: str
  color: str
  size: str
  row: int
  col: int
  # Centre pixel (y, x) and half-extent in pixels.
  cy: int
  cx: int
  radius: int


Scene = tuple[SceneObject, ...]


# ---------------------------------------------------------------------------------------
# Scenes and rendering.
# ---------------------------------------------------------------------------------------

def _place(rng: np.random.Generator, attrs: Sequence[tuple[str, str, str]]) -> Scene:
  """Puts objects with the given (shape, color, size) into distinct random grid cells."""
  cells = rng.choice(GRID_SIZE * GRID_SIZE, size=len(attrs), replace=False)
  objects = []
  for (shape, color, size), cell in zip(attrs, cells):
    row, col = divmod(int(cell), GRID_SIZE)
    radius = int(rng.choice(SIZE_RADII[size]))
    # Centred in its cell (v1.0.0 jittered it): with jitter, telling sizes and shapes
    # apart needs translation invariance that a small from-scratch model learns too
    # slowly on two CPU cores (measured: 46% on attribute questions after 1500 steps).
    cy = row * CELL_SIZE + CELL_SIZE // 2
    cx = col * CELL_SIZE + CELL_SIZE // 2
    objects.append(SceneObject(shape, color, size, row, col, cy, cx, radius))
  return tuple(objects)


def _random_attrs(rng: np.random.Generator) -> tuple[str, str, str]:
  return (SHAPES[rng.integers(len(SHAPES))], COLORS[rng.integers(len(COLORS))],
          SIZES[rng.integers(len(SIZES))])


def sample_scene(rng: np.random.Generator, min_objects: int = 2,
                 max_objects: int = MAX_OBJECTS) -> Scene:
  """Samples a scene with uniformly random object count and attributes."""
  n = int(rng.integers(min_objects, max_objects + 1))
  return _place(rng, [_random_attrs(rng) for _ in range(n)])


def shape_mask(shape: str, radius: int) -> np.ndarray:
  """Boolean [2r+1, 2r+1] mask of a shape, integer geometry only (no anti-aliasing)."""
  d = np.arange(-radius, radius + 1)
  dy, dx = d[:, None], d[None, :]
  if shape == 'circle':
    return dy * dy + dx * dx <= radius * radius + radius
  if shape == 'square':
    return np.ones((2 * radius + 1,) * 2, bool)
  if shape == 'triangle':  # apex up, base on the bottom row
    return 2 * np.abs(dx) <= dy + radius
  if shape == 'cross':  # a plus sign, arms a third of the radius thick
    t = radius // 3
    return (np.abs(dx) <= t) | (np.abs(dy) <= t)
  raise ValueError(f'Unknown shape {shape!r}.')


def render(scene: Scene) -> np.ndarray:
  """Draws a scene into a uint8 [64, 64, 3] image (bitwise deterministic)."""
  image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  image[:] = BACKGROUND_RGB
  for o in scene:
    mask = shape_mask(o.shape, o.radius)
    window = image[o.cy - o.radius:o.cy + o.radius + 1, o.cx - o.radius:o.cx + o.radius + 1]
    window[mask] = COLORS_RGB[o.color]
  return image


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes with fixed Pillow settings, so the same image always gives the same bytes."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG', compress_level=6, optimize=False)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Referring expressions.
# ---------------------------------------------------------------------------------------

def _matches(o: SceneObject, desc: dict[str, str]) -> bool:
  return all(getattr(o, k) == v for k, v in desc.items())


def describe(scene: Scene, index: int, candidates=_REFS_DEFAULT) -> str | None:
  """Shortest unique description of scene[index] ("red circle"), or None if none is."""
  o = scene[index]
  for attrs in candidates:
    desc = {a: getattr(o, a) for a in attrs}
    if sum(_matches(p, desc) for p in scene) == 1:
      words = [desc[a] for a in ('size', 'color') if a in desc]
      return ' '.join(words + [desc.get('shape', 'object')])
  return None


def resolve(scene: Scene, ref: str) -> int:
  """Index of the unique object a description denotes; raises if it is not unique."""
  desc = {}
  for w in ref.split():
    if w in SIZES:
      desc['size'] = w
    elif w in COLORS:
      desc['color'] = w
    elif w in SHAPES:
      desc['shape'] = w
    elif w != 'object':
      raise ValueError(f'Unknown word {w!r} in reference {ref!r}.')
  hits = [i for i, o in enumerate(scene) if _matches(o, desc)]
  if len(hits) != 1:
    raise ValueError(f'Reference {ref!r} denotes {len(hits)} objects, not one.')
  return hits[0]


def _plural(desc: dict[str, str]) -> str:
  """'red objects', 'circles' or 'red circles'."""
  noun = SHAPE_PLURALS[desc['shape']] if 'shape' in desc else 'objects'
  return ' '.join(([desc['color']] if 'color' in desc else []) + [noun])


def _count(scene: Scene, desc: dict[str, str]) -> int:
  return sum(_matches(o, desc) for o in scene)


# ---------------------------------------------------------------------------------------
# Questions. Each `_ask_*` returns (question, answer) for the drawn answer, or None when
# the scene cannot give it (then a new scene is drawn).
# ---------------------------------------------------------------------------------------

def _ask_attribute(rng, scene):
  attr = ('color', 'shape', 'size')[rng.integers(3)]
  options = [(i, d) for i in range(len(scene))
             if (d := describe(scene, i, _REFS_EXCLUDING[attr])) is not None]
  if not options:
    return None
  i, ref = options[rng.integers(len(options))]
  return f'what {attr} is the {ref}?', getattr(scene[i], attr)


def _count_question(rng, min_objects, max_objects):
  """Builds the scene around the answer, so counts are uniform over 0..max_objects."""
  k = int(rng.integers(0, max_objects + 1))
  n = int(rng.integers(max(k, min_objects), max_objects + 1))
  kind = (('color',), ('shape',), ('color', 'shape'))[rng.integers(3)]
  target = {'color': COLORS[rng.integers(len(COLORS))],
            'shape': SHAPES[rng.integers(len(SHAPES))]}
  desc = {a: target[a] for a in kind}
  attrs = []
  while len(attrs) < n:
    shape, color, size = _random_attrs(rng)
    a = {'shape': desc.get('shape', shape), 'color': desc.get('color', color)}
    if len(attrs) >= k:  # a distractor: must not match
      a = {'shape': shape, 'color': color}
      if all(a[key] == v for key, v in desc.items()):
        continue
    attrs.append((a['shape'], a['color'], size))
  order = rng.permutation(n)
  scene = _place(rng, [attrs[j] for j in order])
  return scene, f'how many {_plural(desc)} are there?', NUMBER_WORDS[k]


def _ask_exist(rng, scene, yes):
  present = {(o.color, o.shape) for o in scene}
  if yes:
    color, shape = sorted(present)[rng.integers(len(present))]
  else:
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    # Mostly hard negatives: the colour or the shape is in the scene, on another object.
    hard = [(c, s) for c, s in absent
            if any(o.color == c or o.shape == s for o in scene)]
    pool = hard if hard and rng.random() < 0.8 else absent
    color, shape = pool[rng.integers(len(pool))]
  return f'is there a {color} {shape}?', 'yes' if yes else 'no'


def _referable(scene, candidates=_REFS_DEFAULT):
  return [(i, d) for i in range(len(scene))
          if (d := describe(scene, i, candidates)) is not None]


def relation_holds(a: SceneObject, b: SceneObject, relation: str) -> bool:
  """Whether `a` is <relation> `b`, from grid cells ('above': a smaller row index)."""
  coord, sign = RELATIONS[relation]
  return sign * (getattr(a, coord) - getattr(b, coord)) > 0


def _ask_relation(rng, scene, yes):
  refs = _referable(scene)
  if len(refs) < 2:
    return None
  (i, ref1), (j, ref2) = [refs[k] for k in rng.choice(len(refs), 2, replace=False)]
  a, b = scene[i], scene[j]
  # Only ask about an axis on which the two cells differ.
  axes = [r for r in ('left of', 'above')
          if getattr(a, RELATIONS[r][0]) != getattr(b, RELATIONS[r][0])]
  relation = axes[rng.integers(len(axes))]
  if rng.random() < 0.5:
    relation = _OPPOSITE[relation]
  if relation_holds(a, b, relation) != yes:
    relation = _OPPOSITE[relation]
  return f'is the {ref1} {relation} the {ref2}?', 'yes' if yes else 'no'


def _ask_compare(rng, scene, yes):
  if rng.random() < 0.5:
    # "is the X larger than the Y?": yes iff X is large and Y small; the references
    # never mention size.
    word = ('larger', 'smaller')[rng.integers(2)]
    big, small = ('large', 'small') if word == 'larger' else ('small', 'large')
    refs = _referable(scene, _REFS_EXCLUDING['size'])
    pairs = [(r1, r2) for (i, r1) in refs for (j, r2) in refs if i != j
             and ((scene[i].size, scene[j].size) == (big, small)) == yes]
    if not pairs:
      return None
    ref1, ref2 = pairs[rng.integers(len(pairs))]
    return f'is the {ref1} {word} than the {ref2}?', 'yes' if yes else 'no'
  # "are there more X than Y?" over two colours or two shapes, not both absent.
  attr, values = (('color', COLORS), ('shape', SHAPES))[rng.integers(2)]
  pairs = []
  for v1 in values:
    for v2 in values:
      c1, c2 = _count(scene, {attr: v1}), _count(scene, {attr: v2})
      if v1 != v2 and max(c1, c2) > 0 and (c1 > c2) == yes:
        pairs.append((v1, v2))
  if not pairs:
    return None
  v1, v2 = pairs[rng.integers(len(pairs))]
  return (f'are there more {_plural({attr: v1})} than {_plural({attr: v2})}?',
          'yes' if yes else 'no')


def generate_example(rng: np.random.Generator, *, min_objects: int = 2,
                     max_objects: int = MAX_OBJECTS,
                     with_scene: bool = False) -> dict[str, Any]:
  """Draws one (image, question, answer) example.

  Args:
    rng: the only source of randomness; the same generator state gives the same example.
    min_objects: fewest objects in a scene, at least 2 (count questions may use more).
    max_objects: most objects in a scene, at most 6 (the largest number word).
    with_scene: also return the scene metadata under 'scene' (tuple of SceneObject).

  Returns:
    dict(image=uint8[64, 64, 3], question=str, answer=str, question_type=str).
  """
  # Relation and comparison questions need two objects.
  if not 2 <= min_objects <= max_objects <= MAX_OBJECTS:
    raise ValueError(f'Need 2 <= min_objects <= max_objects <= {MAX_OBJECTS}, got '
                     f'{min_objects}, {max_objects}.')
  qtype = QUESTION_TYPES[rng.integers(len(QUESTION_TYPES))]
  if qtype == 'count':
    scene, question, answer = _count_question(rng, min_objects, max_objects)
  else:
    yes = bool(rng.random() < 0.5)
    for _ in range(_MAX_TRIES):
      scene = sample_scene(rng, min_objects, max_objects)
      if qtype == 'attribute':
        qa = _ask_attribute(rng, scene)
      elif qtype == 'exist':
        qa = _ask_exist(rng, scene, yes)
      elif qtype == 'relation':
        qa = _ask_relation(rng, scene, yes)
      else:
        qa = _ask_compare(rng, scene, yes)
      if qa is not None:
        break
    else:
      raise RuntimeError(f'No {qtype} question found in {_MAX_TRIES} scenes.')
    question, answer = qa
  example = dict(image=render(scene), question=question, answer=answer,
                 question_type=qtype)
  if with_scene:
    example['scene'] = scene
  return example


# Split name -> seed stream; distinct streams make the splits' seeds disjoint.
SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}


def example_rng(split: str, index: int, base_seed: int = 0) -> np.random.Generator:
  """The generator for example `index` of `split`; independent of the split's size."""
  if split not in SPLIT_IDS:
    raise ValueError(f'Unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}.')
  return np.random.default_rng([base_seed, SPLIT_IDS[split], index])


def generate_split(split: str, num_examples: int, base_seed: int = 0, *, start: int = 0,
                   **kwargs) -> Iterator[dict[str, Any]]:
  """Yields examples start .. start+num_examples-1 of a split (kwargs: generate_example)."""
  for i in range(start, start + num_examples):
    yield generate_example(example_rng(split, i, base_seed), **kwargs)


def majority_baseline(train_examples: Iterable[dict[str, Any]],
                      eval_examples: Iterable[dict[str, Any]] | None = None
                      ) -> dict[str, float]:
  """Accuracy of answering each question type with its most frequent training answer.

  Args:
    train_examples: examples with 'question_type' and 'answer' (str or bytes).
    eval_examples: where to score the majority answers; defaults to train_examples.

  Returns:
    {question_type: accuracy, ..., 'overall': accuracy} over eval_examples.
  """
  def pairs(examples):
    out = []
    for ex in examples:
      qt, ans = ex['question_type'], ex['answer']
      out.append((qt.decode() if isinstance(qt, bytes) else qt,
                  ans.decode() if isinstance(ans, bytes) else ans))
    return out
  train = pairs(train_examples)
  evaluation = train if eval_examples is None else pairs(eval_examples)
  counts = collections.defaultdict(collections.Counter)
  for qt, ans in train:
    counts[qt][ans] += 1
  # Ties broken by answer string, so the baseline is deterministic.
  majority = {qt: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0]
              for qt, c in counts.items()}
  hits, totals = collections.Counter(), collections.Counter()
  for qt, ans in evaluation:
    totals[qt] += 1
    hits[qt] += majority.get(qt) == ans
  result = {qt: hits[qt] / totals[qt] for qt in QUESTION_TYPES if totals[qt]}
  result['overall'] = sum(hits.values()) / max(1, sum(totals.values()))
  return result


# ---------------------------------------------------------------------------------------
# TFDS builder.
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class SyntheticVqaConfig(tfds.core.BuilderConfig):
  """Split sizes and scene options; the seeds make every split independent of sizes."""
  # Examples per split.
  num_train: int = 100_000
  num_validation: int = 2_000
  num_test: int = 2_000
  # Object count range per scene.
  min_objects: int = 2
  max_objects: int = MAX_OBJECTS
  # Base seed: example i of split s is drawn from seed (seed, s, i).
  seed: int = 0


class SyntheticVqa(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes VQA (see module docstring); builds without TensorFlow."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.', '1.1.0': 'Objects centred in their grid cells (no jitter).'}
  BUILDER_CONFIGS = [
      SyntheticVqaConfig(name='default', description='100k train, 2k val, 2k test.'),
      SyntheticVqaConfig(name='small', num_train=2_000, num_validation=500,
                         num_test=2_000, description='2k train; same test as default.'),
      SyntheticVqaConfig(name='tiny', num_train=64, num_validation=32, num_test=32,
                         description='For unit tests.'),
  ]
  DEFAULT_CONFIG_NAME = 'default'

  # tfds 4.9.10 resolves the code path of a builder that lives in a package through
  # `importlib_resources`, which it declares only for Python < 3.9 (ModuleNotFoundError
  # otherwise); the plain file path is all it needs (it looks for a checksums file).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, **kwargs):
    # array_record is the format that needs no TensorFlow to write or read.
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # Fed as PNG bytes (encoding numpy arrays would need TensorFlow); decoded
            # back to uint8 [64, 64, 3] by the data source with Pillow.
            'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                                         encoding_format='png'),
            'question': tfds.features.Text(),
            'answer': tfds.features.Text(),
            # All reference answers (one here; VQAv2 has ten).
            'answers': tfds.features.Sequence(tfds.features.Text()),
            'question_type': tfds.features.Text(),
            # Index of the example within its split (its seed).
            'example_id': tfds.features.Scalar(dtype=np.int64),
        }),
        # Records stay in generation order: source[i] is example i of the split.
        disable_shuffling=True,
        homepage='https://arxiv.org/abs/1612.06890',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {split: self._generate_examples(split, n)
            for split, n in (('train', c.num_train), ('validation', c.num_validation),
                             ('test', c.num_test))}

  def _generate_examples(self, split: str, num_examples: int):
    c = self.builder_config
    examples = generate_split(split, num_examples, c.seed, min_objects=c.min_objects,
                              max_objects=c.max_objects)
    for i, ex in enumerate(examples):
      yield i, {
          'image': encode_png(ex['image']),
          'question': ex['question'],
          'answer': ex['answer'],
          'answers': [ex['answer']],
          'question_type': ex['question_type'],
          'example_id': i,
      }


def build(config_name: str, data_dir: str | os.PathLike) -> SyntheticVqa:
  """Builds `synthetic_vqa/<config_name>` under data_dir unless it is there already.

  Read it back with `builder.as_data_source()[split]` (random access, no TensorFlow).
  """
  builder = SyntheticVqa(config=config_name, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  return builder
