"""Tests of the word-level and Hugging Face tokenizers and the prompt formats."""

import pytest

from models.hf_fixture import LLAVA_PROMPT_WORDS, save_word_tokenizer
from sab_jax.data import synthetic_vqa as sv
from sab_jax.data import tokenizer as tok_lib


@pytest.fixture(scope='module')
def word_tok():
  return tok_lib.WordTokenizer.for_synthetic_vqa()


def test_word_special_ids(word_tok):
  assert (word_tok.pad_id, word_tok.bos_id, word_tok.eos_id, word_tok.image_token_id,
          word_tok.unk_id) == (0, 1, 2, 3, 4)
  assert word_tok.vocab_size == 5 + len(sv.VOCABULARY)
  assert word_tok.encode(sv.VOCABULARY[0]) == [5]


def test_word_round_trip_all_templates(word_tok):
  """decode(encode(q)) == q for generated questions/answers, with no unknown word."""
  examples = list(sv.generate_split('validation', 1500, base_seed=3))
  assert {ex['question_type'] for ex in examples} == set(sv.QUESTION_TYPES)
  for ex in examples:
    for text in (ex['question'], ex['answer']):
      ids = word_tok.encode(text)
      assert word_tok.unk_id not in ids, text
      assert word_tok.decode(ids) == text == tok_lib.normalize_text(text)
  for word in sv.VOCABULARY:
    assert word_tok.decode(word_tok.encode(word)) == word


def test_word_normalisation_and_unknown(word_tok):
  ids = word_tok.encode('What COLOR is the  Circle ?')
  assert word_tok.decode(ids) == 'what color is the circle?'
  assert ids[-1] == word_tok.encode('?')[0]
  assert word_tok.encode('is the hexagon red?')[2] == word_tok.unk_id


def test_word_decode_skips_specials_and_stops_at_eos(word_tok):
  t = word_tok
  ids = [t.pad_id, t.bos_id, t.image_token_id] + t.encode('yes') + [t.eos_id] + t.encode('no')
  assert t.decode(ids) == 'yes'
  assert t.decode([t.eos_id]) == ''


def test_word_prompt(word_tok):
  ids = tok_lib.prompt_ids(word_tok, 'is there a red circle?', 16)
  assert ids[0] == word_tok.bos_id
  assert ids[1:17] == [word_tok.image_token_id] * 16
  assert word_tok.decode(ids) == 'is there a red circle?'


def _write_hf_tokenizer(directory, with_config=True):
  return save_word_tokenizer(directory, list(sv.VOCABULARY) + list(LLAVA_PROMPT_WORDS), with_config=with_config)


def test_hf_tokenizer_specials_and_round_trip(tmp_path):
  vocab = _write_hf_tokenizer(tmp_path)
  tok = tok_lib.HFTokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)
  assert tok.image_token_id == len(vocab) and tok.vocab_size == len(vocab) + 1
  for ex in sv.generate_split('validation', 300, base_seed=5):
    ids = tok.encode(ex['question'])
    assert tok.unk_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids).replace(' ?', '?') == ex['question']
  ids = tok.encode('yes') + [tok.eos_id] + tok.encode('no')
  assert tok.decode([tok.bos_id] + ids) == 'yes'
  # The tokenizer.json path works as well as its directory.
  assert tok_lib.HFTokenizer(tmp_path / 'tokenizer.json').eos_id == tok.eos_id


def test_hf_fallback_without_configs(tmp_path):
  """Without config files, specials are found by their usual token strings."""
  _write_hf_tokenizer(tmp_path, with_config=False)
  tok = tok_lib.HFTokenizer(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  with pytest.raises(ValueError, match='not in the vocabulary'):
    tok_lib.HFTokenizer(tmp_path, image_token='<img>')


def test_hf_llava_prompt(tmp_path):
  """LLaVA-1.5 template after bos, one <image> expanded to N image ids."""
  _write_hf_tokenizer(tmp_path)
  tok = tok_lib.HFTokenizer(tmp_path)
  question = 'what color is the circle?'
  ids = tok_lib.prompt_ids(tok, question, 5)
  assert ids[0] == tok.bos_id
  k = ids.index(tok.image_token_id)
  assert ids[k:k + 5] == [tok.image_token_id] * 5 and ids.count(tok.image_token_id) == 5
  assert ids[1:k] == tok.encode('USER:')
  assert ids[k + 5:] == tok.encode(
      f'{question}\nAnswer the question using a single word or phrase. ASSISTANT:')
