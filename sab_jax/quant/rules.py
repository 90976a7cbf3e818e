"""Which Dense layers get binarized: regex rules over module paths (Qwix-style).

A rule matches a layer when its `module_path` regex fully matches the layer's dotted
path (e.g. `language_model.layers.3.mlp.up_proj`); the first matching rule decides.
A rule that matches no layer at all is an error, so a typo cannot silently leave a
model in full precision.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

from flax import nnx

from sab_jax.models import paths


@dataclasses.dataclass(frozen=True, kw_only=True)
class BinarizeRule:
  # Regex, fully matched against the dotted module path of a Dense layer.
  module_path: str
  # True: binarize the matching layers; False: keep them in full precision.
  binarize: bool = True


# The papers' setting: every linear layer of the language decoder, nothing else
# (embeddings, head, vision tower and projector stay in full precision).
DECODER_ONLY = (BinarizeRule(module_path=r"language_model\.layers\..*"),
                BinarizeRule(module_path=r".*", binarize=False))


def parse(rules: Iterable) -> tuple[BinarizeRule, ...]:
  """Accepts BinarizeRule objects or (regex, bool) pairs from a config."""
  return tuple(r if isinstance(r, BinarizeRule) else BinarizeRule(module_path=r[0], binarize=bool(r[1]))
               for r in rules)


def select(model: nnx.Module, rules: Sequence[BinarizeRule]) -> list[str]:
  """Paths of the Dense layers to binarize; raises for a rule that matches nothing."""
  rules = parse(rules)
  used = [False] * len(rules)
  chosen = []
  for path, _ in paths.dense_layers(model):
    for i, rule in enumerate(rules):
      if re.fullmatch(rule.module_path, path):
        used[i] = True
        if rule.binarize:
          chosen.append(path)
        break
  unused = [r.module_path for r, u in zip(rules, used) if not u]
  if unused:
    raise ValueError(f"binarization rule(s) {unused} match no Dense layer; layer paths look like "
                     f"{paths.dense_layers(model)[0][0]!r}")
  return chosen
