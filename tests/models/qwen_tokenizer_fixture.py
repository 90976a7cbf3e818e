"""A tiny tokenizer laid out like Qwen2.5-VL's: the reference for its prompt.

Qwen's real tokenizer is a 151k byte-level BPE; the prompt only depends on its added special
tokens, its configs (no bos, eos `<|im_end|>`) and its chat template, so a word-level vocabulary
that keeps spaces and newlines as tokens is enough, and a missing newline in a template shows up
as a different id sequence.
"""

from __future__ import annotations

import json
import os

# Qwen2.5-VL's added special tokens, in the order of its vocabulary (ids 151643...).
QWEN_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|object_ref_start|>', '<|object_ref_end|>',
                 '<|box_start|>', '<|box_end|>', '<|quad_start|>', '<|quad_end|>', '<|vision_start|>',
                 '<|vision_end|>', '<|vision_pad|>', '<|image_pad|>', '<|video_pad|>')

# The words of Qwen's default system prompt and of the VQA instruction (case matters: no normalizer).
QWEN_PROMPT_WORDS = tuple('system user assistant You are a helpful Answer the question using single word or '
                          'phrase'.split())

# Qwen2.5-VL-Instruct's chat template (tokenizer_config.json's "chat_template").
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_qwen_tokenizer(directory, words=()) -> dict[str, int]:
  """Writes tokenizer.json + tokenizer_config.json (Qwen's specials, configs and chat template).

  The vocabulary is `[UNK]`, space, newline, `.`, `?`, `:`, the prompt words, then `words`; the
  specials are appended after it as added tokens, as in Qwen's checkpoints. Returns the ids of
  every token string (specials included).
  """
  import tokenizers
  from tokenizers import Regex, decoders, models, pre_tokenizers

  base = ['[UNK]', ' ', '\n', '.', '?', ':', *QWEN_PROMPT_WORDS, *words]
  vocab = {w: i for i, w in enumerate(dict.fromkeys(base))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  # Every whitespace character and punctuation mark is its own token; Fuse decodes by concatenation.
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r'\s'), behavior='isolated'),
                                               pre_tokenizers.Punctuation(behavior='isolated')])
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(QWEN_SPECIALS))
  tok.save(os.path.join(directory, 'tokenizer.json'))
  # Qwen's own config says 'Qwen2Tokenizer', which transformers 5 rebuilds as a byte-level BPE from
  # the vocabulary (ignoring this word-level pipeline); the generic class reads tokenizer.json as is.
  config = {'bos_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>', 'unk_token': None,
            'errors': 'replace', 'model_max_length': 131072, 'split_special_tokens': False,
            'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False,
            'chat_template': QWEN_CHAT_TEMPLATE}
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return {**vocab, **{s: tok.token_to_id(s) for s in QWEN_SPECIALS}}
