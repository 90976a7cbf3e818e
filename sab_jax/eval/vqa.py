"""VQA evaluation by greedy decoding: the accuracy every method in results.json reports.

Answers are decoded with the KV-cached `greedy_generate` and scored with exact match
(synthetic set, GQA) or VQAv2's soft accuracy; the result is an overall accuracy plus a
per-question-type table. With several processes each scores its own shard and the
sums are combined, so every process returns the same table.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from sab_jax import distributed, sharding as sharding_lib
from sab_jax.eval import metrics
from sab_jax.models import decoding

METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": lambda pred, answers: metrics.exact_match(pred, list(answers)),
    "vqav2": metrics.vqav2_accuracy,
}


def _transfers(model) -> tuple[Callable, Callable]:
  """How batches reach the model and answers come back.

  A model whose parameters span processes (FSDP over hosts) runs one SPMD program over
  every process's batch: inputs become global arrays split over the mesh's batch axes,
  and each process reads back its own rows. Otherwise each process decodes its batches
  alone.
  """
  spanning = distributed.spanning_leaf(nnx.state(model))
  if spanning is None:
    return jnp.asarray, np.asarray
  mesh = spanning.sharding.mesh
  rows = lambda ndim: sharding_lib.batch_sharding(mesh, ndim)
  to_device = lambda a: jax.make_array_from_process_local_data(rows(a.ndim), a)

  def to_host(a):  # the compiler may return the answers replicated: split them by rows again first
    a = jax.device_put(a, rows(a.ndim))
    return np.asarray(multihost_utils.global_array_to_host_local_array(a, mesh, rows(a.ndim).spec))

  return to_device, to_host


def evaluate(model, batches: Iterable[dict[str, Any]], tokenizer, *, question_types: Sequence[str],
             metric: str = "exact_match", max_new_tokens: int = 3, max_examples: int | None = None,
             predictions: list | None = None) -> dict[str, Any]:
  """Scores greedy answers over `batches` (pipeline batch dicts).

  Args:
    model: an LVLM (`models.families`).
    batches: an iterable of batches from `sab_jax.data.pipeline.make_dataset`.
    tokenizer: decodes generated ids to text.
    question_types: names for the batches' integer `question_type`.
    metric: key of METRICS.
    max_new_tokens: answer length budget (eos included).
    max_examples: stop after this many examples on this process (None: all).
    predictions: if a list, (question_type, prediction, answer) tuples are appended.
  Returns:
    `metrics.accuracy_table` output: accuracy, count, per_type.
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
  score_fn = METRICS[metric]
  sums = np.zeros((len(question_types), 2))  # per type: score sum, count
  to_device, to_host = _transfers(model)
  seen = 0
  for batch in batches:
    if max_examples is not None and seen >= max_examples:
      break
    out = decoding.greedy_generate(model, to_device(batch["prompt_ids"]), to_device(batch["prompt_mask"]),
                                   to_device(batch["pixel_values"]), max_new_tokens=max_new_tokens,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    out = to_host(out)
    n = len(out) if max_examples is None else min(len(out), max_examples - seen)
    valid = batch.get("valid", np.ones(len(out), np.int32))
    for i in range(n):
      if not valid[i]:  # padding that keeps processes in step (pipeline.make_dataset pad_shards)
        continue
      pred = tokenizer.decode([int(t) for t in out[i] if t != tokenizer.eos_id])
      qt = int(batch["question_type"][i])
      answers = [str(a) for a in np.atleast_1d(batch["answers"][i])]
      sums[qt] += (score_fn(pred, answers), 1)
      if predictions is not None:
        predictions.append((question_types[qt], pred, str(batch["answer"][i])))
    seen += n
  if jax.process_count() > 1:
    sums = np.asarray(multihost_utils.process_allgather(sums), np.float64).sum(axis=0)
  per_type = {question_types[i]: {"accuracy": float(s / c), "count": int(c)}
              for i, (s, c) in enumerate(sums) if c}
  total = sums.sum(axis=0)
  return {"accuracy": float(total[0] / max(total[1], 1)), "count": int(total[1]), "per_type": per_type}
