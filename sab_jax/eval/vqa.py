"""VQA evaluation by greedy decoding: the accuracy every method in results.json reports.

Answers are decoded with the KV-cached `greedy_generate` and scored with exact match
(synthetic set, GQA) or VQAv2's soft accuracy; the result is an overall accuracy plus a
per-question-type table. With several processes each scores its own shard and the
sums are combined, so every process returns the same table.
"""

from __future__ import annotations

import functools
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


@functools.partial(nnx.jit, graph_updates=False)  # reads the models only: see decoding.greedy_generate
def _answer_loss_rows(model, teacher, input_ids, pixel_values, attention_mask, loss_mask):
  """Per row: Σ over answer tokens of the reference answer's cross-entropy and of
  KL(teacher ‖ model) of the next-token distributions (0 without a teacher), and the token count."""
  logp = jax.nn.log_softmax(model(input_ids, pixel_values, attention_mask).astype(jnp.float32))
  targets = jnp.roll(input_ids, -1, axis=1)
  ce = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  if teacher is None:
    kl = jnp.zeros_like(ce)
  else:
    t_logp = jax.nn.log_softmax(teacher(input_ids, pixel_values, attention_mask).astype(jnp.float32))
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - logp), axis=-1)
  return jnp.stack([jnp.sum(ce * loss_mask, 1), jnp.sum(kl * loss_mask, 1), jnp.sum(loss_mask, 1)], axis=1)


def evaluate(model, batches: Iterable[dict[str, Any]], tokenizer, *, question_types: Sequence[str],
             metric: str = "exact_match", max_new_tokens: int = 3, max_examples: int | None = None,
             predictions: list | None = None, teacher=None, answer_losses: bool = True) -> dict[str, Any]:
  """Scores greedy answers over `batches` (pipeline batch dicts), and the teacher-forced answer losses.

  Besides accuracy, over the reference answers' tokens (`loss_mask`): their mean cross-entropy
  (`answer_ce`), and with a `teacher`, the mean KL(teacher ‖ model) of the next-token
  distributions there (`kl_from_teacher`: what distillation lowers; it also sees how far a
  model is from the teacher where both answer correctly). Exact match moves in whole questions;
  these see a model's distance from the reference and the teacher below that resolution.

  Args:
    model: an LVLM (`models.families`).
    batches: an iterable of batches from `sab_jax.data.pipeline.make_dataset`.
    tokenizer: decodes generated ids to text.
    question_types: names for the batches' integer `question_type`.
    metric: key of METRICS.
    max_new_tokens: answer length budget (eos included).
    max_examples: stop after this many examples on this process (None: all).
    predictions: if a list, (question_type, prediction, answer) tuples are appended.
    teacher: the full-precision model for `kl_from_teacher` (None: not computed).
    answer_losses: False skips the teacher-forced pass (answers only: no answer_ce, no KL).
  Returns:
    accuracy, count, per_type, answer_ce (with answer_losses), and kl_from_teacher with a teacher.
  """
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(METRICS)}")
  score_fn = METRICS[metric]
  sums = np.zeros((len(question_types), 2))  # per type: score sum, count
  losses = np.zeros(3)  # answer CE sum, KL sum, answer tokens
  to_device, to_host = _transfers(model)
  seen = 0
  for batch in batches:
    if max_examples is not None and seen >= max_examples:
      break
    out = decoding.greedy_generate(model, to_device(batch["prompt_ids"]), to_device(batch["prompt_mask"]),
                                   to_device(batch["pixel_values"]), max_new_tokens=max_new_tokens,
                                   eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    out = to_host(out)
    loss_rows = (to_host(_answer_loss_rows(model, teacher, *(to_device(batch[k]) for k in (
        "input_ids", "pixel_values", "attention_mask", "loss_mask")))) if answer_losses
                 else np.zeros((len(out), 3)))
    n = len(out) if max_examples is None else min(len(out), max_examples - seen)
    valid = batch.get("valid", np.ones(len(out), np.int32))
    for i in range(n):
      if not valid[i]:  # padding that keeps processes in step (pipeline.make_dataset pad_shards)
        continue
      losses += loss_rows[i]
      pred = tokenizer.decode([int(t) for t in out[i] if t != tokenizer.eos_id])
      qt = int(batch["question_type"][i])
      answers = [str(a) for a in np.atleast_1d(batch["answers"][i])]
      sums[qt] += (score_fn(pred, answers), 1)
      if predictions is not None:
        predictions.append((question_types[qt], pred, str(batch["answer"][i])))
    seen += n
  if jax.process_count() > 1:
    sums = np.asarray(multihost_utils.process_allgather(sums), np.float64).sum(axis=0)
    losses = np.asarray(multihost_utils.process_allgather(losses), np.float64).sum(axis=0)
  per_type = {question_types[i]: {"accuracy": float(s / c), "count": int(c)}
              for i, (s, c) in enumerate(sums) if c}
  total = sums.sum(axis=0)
  out = {"accuracy": float(total[0] / max(total[1], 1)), "count": int(total[1]), "per_type": per_type}
  if answer_losses:
    out["answer_ce"] = float(losses[0] / max(losses[2], 1))
  if answer_losses and teacher is not None:
    out["kl_from_teacher"] = float(losses[1] / max(losses[2], 1))
  return out
