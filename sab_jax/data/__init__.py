"""Data: the synthetic shapes-VQA TFDS builder, tokenizers and the grain input pipeline.

Importing this package registers the `synthetic_vqa` TFDS builder, so
`tfds.data_source('synthetic_vqa/tiny', data_dir=...)` finds it.
"""

from sab_jax.data.pipeline import CLIP_MEAN
from sab_jax.data.pipeline import CLIP_STD
from sab_jax.data.pipeline import make_dataset
from sab_jax.data.synthetic_vqa import QUESTION_TYPES
from sab_jax.data.synthetic_vqa import SyntheticVqa
from sab_jax.data.synthetic_vqa import build
from sab_jax.data.synthetic_vqa import generate_example
from sab_jax.data.synthetic_vqa import generate_split
from sab_jax.data.synthetic_vqa import majority_baseline
from sab_jax.data.tokenizer import HFTokenizer
from sab_jax.data.tokenizer import WordTokenizer
from sab_jax.data.tokenizer import prompt_ids
