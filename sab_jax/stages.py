"""The pipeline behind `sab_jax.main`: the stages named in `config.stages`, in order.

Each stage reads what earlier ones left (in memory or under the workdir; `NEEDS` says
what, and a run that lacks it stops with `MissingPrerequisite` naming the stage to run)
and records its outcome in `workdir/results.json`, which is rewritten after every stage.
Rerunning the same command on the same workdir skips stages whose results are already
there and resumes an interrupted training from its checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from flax import nnx

from sab_jax import distributed, export as export_lib, report, sharding as sharding_lib
from sab_jax.calib import calibrate, sensitivity
from sab_jax.data import datasets, pipeline, synthetic_vqa
from sab_jax.data import tokenizer as tokenizer_lib
from sab_jax.errors import MissingPrerequisite, UserError
from sab_jax.eval import metrics, vqa
from sab_jax.models import families, hf
from sab_jax.quant import providers, rules as rules_lib
from sab_jax.serve import packed
from sab_jax.train import checkpointing, distill, train as train_lib


class Context:
  """What the stages share within one run: config, workdir, results and built objects."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices: Sequence[Any] | None = None):
    """`devices`: what `config.mesh` spans (None: every device, as `main` runs)."""
    self.config, self.workdir, self.devices = config, workdir, devices
    self.results_path = os.path.join(workdir, "results.json")
    self.results: dict[str, Any] = {"methods": {}}
    if os.path.exists(self.results_path):
      with open(self.results_path) as f:
        self.results = json.load(f)
    dc, tc = config.data, config.teacher
    if not tc.init and (tc.format == "hf" or not tc.retrain or tc.warm_start):
      raise UserError("config.teacher.init is not set: pass --config.teacher.init=DIR (a Hugging Face LLaVA "
                      "checkpoint directory with teacher.format 'hf', a sab_jax checkpoint with 'orbax')")
    self.dataset = datasets.get(dc.name)
    if tc.format == "hf":  # the checkpoint's config.json defines the model; config.model is not used
      self.model_cfg = hf.read_config(tc.init)
    elif tc.format == "orbax":
      self.model_cfg = families.config_from_dict(config.model.to_dict())
    else:
      raise UserError(f"config.teacher.format={tc.format!r}: use 'orbax' (sab_jax checkpoints) or 'hf' "
                      f"(a Hugging Face LLaVA or Qwen2.5-VL directory)")
    self.family = families.of(self.model_cfg)
    try:
      self.model_cfg = families.with_image_size(self.model_cfg, dc.get("image_size"))
    except ValueError as e:
      raise UserError(f"config.data.image_size={dc.image_size}: {e}; leave it unset") from None
    path = tokenizer_lib.tokenizer_path(config)
    self.tokenizer = (tokenizer_lib.HFTokenizer(path, image_token=self.family.image_token) if path
                      else tokenizer_lib.WordTokenizer.for_synthetic_vqa())
    self.param_dtype = jnp.dtype(tc.param_dtype)
    problem = tokenizer_lib.mismatch(self.tokenizer, vocab_size=self.model_cfg.text.vocab_size,
                                     image_token_id=self.model_cfg.image_token_id)
    if problem:
      raise UserError(f"{problem}: point config.data.tokenizer at the checkpoint's own tokenizer (or, for a model "
                      f"trained here, raise config.model.text.vocab_size)")
    self.builders: dict[str, Any] = {}
    self.teacher: nnx.Module | None = None
    self.calib_batches: list[dict[str, np.ndarray]] = []
    # name -> (binarized model, layers, provider), from `binarize` until `export` writes it
    self.binarized: dict[str, tuple[Any, Any, Any]] = {}

  def save_results(self) -> None:
    if jax.process_index() != 0:  # every process holds the same results; one writes them
      return
    tmp = self.results_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.results, f, indent=1, sort_keys=True)
    os.replace(tmp, self.results_path)  # never leaves a half-written results.json

  def new_model(self, seed: int = 0) -> nnx.Module:
    return families.build(self.model_cfg, param_dtype=self.param_dtype, rngs=nnx.Rngs(seed))

  def abstract_model(self) -> nnx.Module:
    """The model's structure, shapes and dtypes without initialising any weight (a template)."""
    return families.abstract(self.model_cfg, param_dtype=self.param_dtype)

  def source(self, builder_config: str, split: str):
    if builder_config not in self.builders:
      dc = self.config.data
      build = lambda: datasets.load(dc.name, builder_config, self.data_dir, dc.manual_dir)
      if jax.process_index() == 0:  # process 0 prepares the files, the others then only read them
        build()
      distributed.barrier(f"{dc.name}/{builder_config} built")
      self.builders[builder_config] = build()
    sources = self.builders[builder_config].as_data_source()
    if split not in sources:
      raise UserError(f"{self.config.data.name}/{builder_config} has no split {split!r}; it has {sorted(sources)}")
    return sources[split]

  @functools.cached_property
  def mesh(self):
    return sharding_lib.make_mesh(dict(self.config.mesh), self.devices)

  @property
  def data_dir(self) -> str:
    return os.path.expanduser(self.config.data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))

  def question_types(self, builder_config: str, split: str) -> np.ndarray:
    """Every record's question type, read without decoding images (for curricula)."""
    self.source(builder_config, split)
    skip = self.builders[builder_config].as_data_source(decoders={"image": tfds.decode.SkipDecoding()})[split]
    types = [r["question_type"] for start in range(0, len(skip), 8192)
             for r in skip.__getitems__(range(start, min(start + 8192, len(skip))))]
    return np.asarray([t.decode() if isinstance(t, bytes) else str(t) for t in types])

  def batches(self, builder_config: str, split: str, *, batch_size: int, train: bool, seed: int = 0,
              max_records: int | None = None, phases: Any = ()):
    """Training batches (shuffled, endless; `phases`: a question-type curriculum, see
    pipeline.make_dataset) or one evaluation pass whose shards are padded to equal length
    (every process then runs the same steps)."""
    dc = self.config.data
    if phases:
      phases = [(int(n), dict(w)) for n, w in phases]
      extra = dict(phases=phases, record_types=self.question_types(builder_config, split))
    else:
      extra = {}
    return pipeline.make_dataset(
        self.source(builder_config, split), self.tokenizer, num_image_tokens=self.model_cfg.num_image_tokens,
        image_mean=pipeline.CLIP_MEAN, image_std=pipeline.CLIP_STD, batch_size=batch_size,
        max_prompt_len=dc.max_prompt_len, max_answer_len=dc.max_answer_len, shuffle=train, seed=seed,
        num_epochs=None if train else 1, drop_remainder=train, image_size=self.model_cfg.vision.image_size,
        prompt_template=families.prompt_template(self.model_cfg),
        question_types=self.dataset.question_types, max_records=max_records, pad_shards=not train, **extra)


def model_bytes(model: nnx.Module) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def evaluate(ctx: Context, model: nnx.Module, name: str, teacher: nnx.Module | None = None) -> dict[str, Any]:
  """Scores `model` on the eval split (and its teacher-forced answer losses, `vqa.evaluate`);
  its answers go to DIR/predictions/<name>.jsonl, one line per question in split order (with
  several processes, one file per process's shard)."""
  ec = ctx.config.eval
  batches = ctx.batches(ctx.config.data.config, ec.split, batch_size=ec.batch_size, train=False,
                        max_records=ec.max_examples if ec.max_examples > 0 else None)
  predictions: list[tuple[str, str, str]] = []
  table = vqa.evaluate(model, batches, ctx.tokenizer, question_types=ctx.dataset.question_types,
                       metric=ec.metric or ctx.dataset.metric, max_new_tokens=ctx.config.data.max_answer_len,
                       predictions=predictions, teacher=teacher)
  suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""
  path = os.path.join(ctx.workdir, "predictions", f"{name}{suffix}.jsonl")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    for question_type, prediction, answer in predictions:
      f.write(json.dumps({"question_type": question_type, "prediction": prediction, "answer": answer}) + "\n")
  os.replace(path + ".tmp", path)
  return table


# --- stages ------------------------------------------------------------------------------
def stage_data(ctx: Context) -> None:
  """Prepares the evaluation dataset (and the training one when a teacher is trained)."""
  t = time.time()
  dc = ctx.config.data
  configs = {dc.config}
  if ctx.config.teacher.retrain:
    configs.add(dc.train_config)
  for c in sorted(configs):
    ctx.source(c, ctx.config.eval.split)
  eval_src = ctx.source(dc.config, ctx.config.eval.split)
  if dc.name == "synthetic_vqa":  # reading a real training split's 100k+ images just for this would take long
    train_src = ctx.source(dc.config, "train")
    ctx.results["majority_baseline"] = synthetic_vqa.majority_baseline(
        (train_src[i] for i in range(len(train_src))), (eval_src[i] for i in range(len(eval_src))))
  ctx.results["dataset"] = f"{dc.name}/{dc.config}"
  ctx.results["split"] = ctx.config.eval.split
  print(f"[data] {dc.name} {sorted(configs)} ready in {ctx.data_dir} ({len(eval_src)} {ctx.config.eval.split} "
        f"questions, {time.time() - t:.1f} s)")


def _initial_teacher(ctx: Context) -> nnx.Module:
  """A Hugging Face checkpoint (placed straight onto the mesh); else the orbax `teacher.init`
  with `teacher.warm_start` (parameters it lacks keep their random init); else a random init."""
  tc = ctx.config.teacher
  if tc.format != "hf":
    model = ctx.new_model(ctx.config.seed)
    if tc.warm_start:
      meta = checkpointing.load_params(tc.init, model, partial=True)
      print(f"[teacher] warm start from {tc.init}; not in it (random init): {meta['not_in_checkpoint'] or 'none'}")
    return model
  return hf.from_pretrained(tc.init, param_dtype=ctx.param_dtype, mesh=ctx.mesh, rules=ctx.config.logical_axis_rules,
                            config=ctx.model_cfg)


def stage_teacher(ctx: Context) -> None:
  """The full-precision teacher: trained (or, from a Hugging Face checkpoint, fine-tuned)
  here when asked, otherwise loaded: the shipped orbax teacher or the HF checkpoint."""
  tc, dc = ctx.config.teacher, ctx.config.data
  out_dir = os.path.join(ctx.workdir, "teacher")
  if tc.retrain:
    if os.path.exists(os.path.join(out_dir, "meta.json")):
      print(f"[teacher] already trained in {out_dir}; loading it")
      model = ctx.new_model()
      checkpointing.load_params(out_dir, model)
    else:
      t = time.time()
      model = _initial_teacher(ctx)
      if ctx.config.train.zero_init:
        train_lib.zero_init(model, ctx.config.train.zero_init)
      data = ctx.batches(dc.train_config, "train", batch_size=ctx.config.train.batch_size,
                         train=True, seed=ctx.config.seed, phases=ctx.config.train.phases)
      model, history = train_lib.train(ctx.config.train, ctx.workdir, model, data, mesh=ctx.mesh,
                                       rules=ctx.config.logical_axis_rules, name="teacher")
      loss = history[-1][1] if history else float("nan")
      minutes = (time.time() - t) / 60
      checkpointing.save_params(out_dir, model, {
          "command": " ".join(["python -m sab_jax.main", *sys.argv[1:]]),
          "model": ctx.config.model.to_dict(),
          "tokenizer": tokenizer_lib.tokenizer_path(ctx.config) or tokenizer_lib.WORD_TOKENIZER,
          "final_loss": loss, "train": ctx.config.train.to_dict(), "train_minutes_this_run": minutes,
          "data": f"{dc.name}/{dc.train_config}", "max_answer_len": dc.max_answer_len,
          "init": tc.init if tc.format == "hf" or tc.warm_start else None})
      print(f"[teacher] trained in {minutes:.1f} min (this run), saved to {out_dir}")
  elif tc.format == "hf":
    t = time.time()
    model = _initial_teacher(ctx)
    print(f"[teacher] loaded the Hugging Face checkpoint {tc.init} ({time.time() - t:.1f} s)")
  else:
    model = ctx.new_model(ctx.config.seed)
    meta = checkpointing.load_params(tc.init, model)
    # On the mesh, as a Hugging Face or a freshly trained teacher is (FSDP may span processes).
    model = sharding_lib.place(model, ctx.mesh, ctx.config.logical_axis_rules)
    print(f"[teacher] loaded {tc.init} (trained on {meta.get('data')})")
  ctx.teacher = model


def stage_eval_fp(ctx: Context) -> None:
  if "fp" in ctx.results["methods"]:
    print("[eval_fp] already in results.json; skipping")
    return
  t = time.time()
  table = evaluate(ctx, ctx.teacher, "fp")
  nbytes = model_bytes(ctx.teacher)
  bits = 8 * nbytes / sum(x.size for x in jax.tree.leaves(nnx.state(ctx.teacher, nnx.Param)))
  ctx.results["methods"]["fp"] = {"accuracy": table["accuracy"], "per_type": table["per_type"],
                                  "count": table["count"], "answer_ce": table["answer_ce"], "bits_per_weight": bits,
                                  "nominal_bits": bits, "model_bytes": nbytes}
  print(metrics.format_table({"fp": table}, title=f"fp on {ctx.results.get('dataset')} {ctx.config.eval.split}"))
  print(f"[eval_fp] {time.time() - t:.1f} s")


def stage_calibrate(ctx: Context) -> None:
  """Draws the calibration set: `config.quant.calib_samples` training examples (seeded)."""
  qc = ctx.config.quant
  data = iter(ctx.batches(ctx.config.data.config, "train", batch_size=qc.calib_batch_size, train=True,
                          seed=ctx.config.seed + 1))
  n = max(1, qc.calib_samples // qc.calib_batch_size)
  ctx.calib_batches = [next(data) for _ in range(n)]
  image_id = ctx.model_cfg.image_token_id
  ids = np.concatenate([b["input_ids"] for b in ctx.calib_batches])
  real = np.concatenate([b["attention_mask"] for b in ctx.calib_batches]) > 0
  counts = np.array([len(ids), ((ids == image_id) & real).sum(), ((ids != image_id) & real).sum()])
  if jax.process_count() > 1:  # each process drew its own calibration batches; the Hessians see them all
    from jax.experimental import multihost_utils
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(axis=0)
  ctx.results["calibration"] = {"samples": int(counts[0]), "image_tokens": int(counts[1]),
                                "text_tokens": int(counts[2]),
                                "split": f"{ctx.config.data.name}/{ctx.config.data.config}:train"}
  print(f"[calibrate] {ctx.results['calibration']}")


def _binarize_runs(qc) -> list[tuple[str, str, dict[str, Any], str]]:
  """(name, method, provider options, results bucket) for every configured run."""
  runs = [(m, m, {}, "methods") for m in qc.methods]
  runs += [(name, v["method"], {k: x for k, x in v.items() if k != "method"}, "variants")
           for name, v in qc.variants.to_dict().items()]
  for name, method, _, _ in runs:
    if method not in providers.METHODS:
      raise UserError(f"unknown method {method!r} for {name!r} in config.quant; available: "
                      f"{sorted(providers.METHODS)}")
  return runs


def _pending(ctx: Context, stage: str, name: str, bucket: str, needs: str) -> bool:
  """True unless results[bucket][name] already has `needs` (a resumed run skips it)."""
  done = needs in ctx.results.get(bucket, {}).get(name, {})
  if done:
    print(f"[{stage}] {name} already in results.json; skipping")
  return not done


def stage_binarize(ctx: Context) -> None:
  """Every configured method and variant on the same calibration set and code path.

  Standard methods land in results["methods"], ablation variants (e.g. Λ², the
  <=1.2-stored-bit structured SAB) in results["variants"]. The binarized models stay in
  memory for the `export` stage; accuracy comes later, from the export (`eval`).
  """
  qc = ctx.config.quant
  mesh = ctx.mesh
  for name, method, options, bucket in _binarize_runs(qc):
    if not _pending(ctx, "binarize", name, bucket, "export_dir"):
      continue
    provider = providers.METHODS[method](**options)
    model = sharding_lib.place(nnx.clone(ctx.teacher), mesh, ctx.config.logical_axis_rules)
    t = time.time()
    layers = calibrate.binarize_model(model, ctx.calib_batches, provider, rules_lib.parse(qc.rules), mesh,
                                      progress=qc.progress)
    seconds = time.time() - t
    entry = {"method": method, "binarize_seconds": seconds, "provider": repr(provider),
             "layer_output_rel_error": {p: r.relative_output_error for p, r in layers.items()}}
    ctx.results.setdefault(bucket, {})[name] = entry
    ctx.binarized[name] = (model, layers, provider)
    errs = np.array(list(entry["layer_output_rel_error"].values()))
    print(f"[binarize] {name}: {len(layers)} layers, mean layer output error {errs.mean():.4f}, {seconds:.1f} s")


def _write_export(ctx: Context, name: str, model: nnx.Module, layers: dict[str, Any], provider: Any
                  ) -> dict[str, Any]:
  """Exports to `DIR/exports/<name>`; returns the results.json fields: the bit and byte
  totals as the writer counted them (bytes written; formula and nominal bits per weight)."""
  directory = os.path.join(ctx.workdir, "exports", name)
  info = export_lib.export(model, layers, name, provider, directory, config=ctx.config, overwrite=True,
                           int8_params=tuple(ctx.config.export.int8_params))
  fields = {k: info[k] for k in ("bits_per_weight", "formula_bits_per_weight", "nominal_bits", "binarized_weights",
                                 "binarized_bytes", "params_bytes", "model_bytes")}
  return dict(fields, binarized_layers=len(layers), export_dir=os.path.relpath(directory, ctx.workdir))


def stage_export(ctx: Context) -> None:
  """Writes each binarized model of this run as a packed export (`sab_jax.export`) and
  records the writer's totals: bits_per_weight and model_bytes from the bytes written,
  formula_bits_per_weight and nominal_bits from the layers' bit accounting."""
  for name, (model, layers, provider) in list(ctx.binarized.items()):
    bucket = "methods" if name in ctx.results.get("methods", {}) else "variants"
    t = time.time()
    entry = ctx.results[bucket][name]
    entry.update(_write_export(ctx, name, model, layers, provider))
    del ctx.binarized[name]
    ctx.save_results()
    print(f"[export] {name}: {entry['bits_per_weight']:.3f} bits/weight from bytes written "
          f"({entry['formula_bits_per_weight']:.3f} by formula), {entry['model_bytes']} bytes on disk, "
          f"{time.time() - t:.1f} s -> {entry['export_dir']}")


# Distillation settings a `config.distill.variants` entry may set (besides its `source`).
DISTILL_OPTIONS = ("temperature", "ce_weight", "hidden_weight", "clip", "significance_power", "significance_permuted")


def _distill_runs(dc) -> list[tuple[str, str, dict[str, Any], str]]:
  """(name, source export, distillation settings, results bucket): `<source>_kd` for each of
  `config.distill.sources` (methods), then each `config.distill.variants` entry (variants)."""
  defaults = {**{k: dc[k] for k in DISTILL_OPTIONS}, "train": dc.train.to_dict()}
  runs = [(f"{source}_kd", source, defaults, "methods") for source in dc.sources]
  for name, v in dc.variants.to_dict().items():
    unknown = sorted(set(v) - set(DISTILL_OPTIONS) - {"source", "train"})
    unknown += sorted(f"train.{k}" for k in set(v.get("train", {})) - set(defaults["train"]))
    if "source" not in v or unknown:
      raise UserError(f"config.distill.variants.{name}: needs 'source' (a method or variant with an export) and may "
                      f"set {DISTILL_OPTIONS} and 'train' (keys of config.distill.train); got {sorted(v)}, "
                      f"unknown {unknown}")
    options = {**defaults, **{k: x for k, x in v.items() if k not in ("source", "train")}}
    options["train"] = {**defaults["train"], **v.get("train", {})}
    runs.append((name, v["source"], options, "variants"))
  return runs


def _teacher_significance(ctx: Context, paths) -> dict[str, Any]:
  """The per-weight significance of the teacher's `paths` on this run's calibration batches
  (the pass SAB's plan runs: `calib.sensitivity`, same options), for significance-stepped QAT."""
  if not ctx.calib_batches:
    raise MissingPrerequisite(
        "config.distill significance_power != 0 steps the student's weights by the significance map, measured on "
        "the calibration batches of stage 'calibrate', which this run has not drawn: run "
        f"--config.stages=\"{_with_prerequisites(('calibrate', 'distill'))}\" (or set significance_power=0)")
  mesh = ctx.mesh
  # the teacher itself (placed in place, as distillation places it): the pass only wraps its
  # layers for the measurement and puts them back, so no copy of the model is needed
  model = sharding_lib.place(ctx.teacher, mesh, ctx.config.logical_axis_rules)
  batches = calibrate.on_mesh(ctx.calib_batches, mesh, loss_mask=True, reader="the distillation's significance map")
  return sensitivity.measure(model, batches, list(paths), mesh)


def stage_distill(ctx: Context) -> None:
  """Quantization-aware distillation of each `config.distill.sources` export into
  `<source>_kd` (and of each `config.distill.variants` entry's source, with its settings),
  written as a packed export (evaluated by `eval`)."""
  dc = ctx.config.distill
  significance = None
  for name, source, options, bucket in _distill_runs(dc):
    if not _pending(ctx, "distill", name, bucket, "export_dir"):
      continue
    src = ctx.results.get("methods", {}).get(source) or ctx.results.get("variants", {}).get(source)
    if not src or "export_dir" not in src:
      raise MissingPrerequisite(
          f"stage 'distill' needs the export of {source!r} (config.distill) from stage 'export', and "
          f"{ctx.results_path} lists none: add {source!r} to config.quant.methods (or variants) and run "
          f"--config.stages=\"{_with_prerequisites(('distill',), on_disk=True)}\" (or distill from another method)")
    manifest, layers, _ = export_lib.read(os.path.join(ctx.workdir, src["export_dir"]), ctx.abstract_model())
    provider = export_lib.provider_from_spec(manifest["provider"])
    power, carried = options["significance_power"], None
    if power:  # the map, measured once per run (per set of layers)
      if significance is None or set(significance) != set(layers):
        significance = _teacher_significance(ctx, layers)
      carried = distill.permuted(significance, seed=ctx.config.seed) if options["significance_permuted"] else significance
    student = distill.build_student(ctx.teacher, layers, clip=options["clip"], significance=carried,
                                    significance_power=power)
    data = ctx.batches(ctx.config.data.train_config, "train", batch_size=options["train"]["batch_size"], train=True,
                       seed=ctx.config.seed + 2)
    t = time.time()
    loss_fn = functools.partial(distill.kd_loss, temperature=options["temperature"], ce_weight=options["ce_weight"],
                                hidden_weight=options["hidden_weight"])
    run_name = f"distill_{source}" if bucket == "methods" else f"distill_{name}"
    tc = ml_collections.ConfigDict(options["train"])
    student, history = train_lib.train(tc, ctx.workdir, student, data, mesh=ctx.mesh,
                                       rules=ctx.config.logical_axis_rules, loss_fn=loss_fn,
                                       name=run_name, teacher=ctx.teacher, wrt=distill.TRAINABLE)
    seconds = time.time() - t
    bits = {layer["path"]: layer["bits"] for layer in manifest["layers"]}
    written = _write_export(ctx, name, nnx.clone(ctx.teacher), distill.binarized_layers(student, bits),
                            provider)
    final_loss = history[-1][1] if history else None
    ctx.results.setdefault(bucket, {})[name] = {
        "method": name, "distilled_from": source, "final_loss": final_loss, "distill_seconds_this_run": seconds,
        "distill_steps": tc.num_steps, "distill_options": options, "provider": repr(provider), **written}
    if bucket == "methods":
      ctx.results["final_loss"] = final_loss
    ctx.save_results()
    print(f"[distill] {name}: final loss {final_loss}, {seconds / 60:.1f} min, exported to {written['export_dir']}")


def stage_eval(ctx: Context) -> None:
  """Evaluates every exported model from its export, as a user would serve it
  (`serve.packed.from_export`: packed layers, the kernel on GPU)."""
  if not any("export_dir" in e for b in ("methods", "variants") for e in ctx.results.get(b, {}).values()):
    raise MissingPrerequisite(
        f"stage 'eval' needs exports from stage 'export' (none in {ctx.results_path}): run the stages that make "
        f"them on this workdir, e.g. --config.stages=\"{_with_prerequisites(('eval',), on_disk=True)}\", with at "
        f"least one method in config.quant.methods")
  for bucket in ("methods", "variants"):
    for name, entry in ctx.results.get(bucket, {}).items():
      if "export_dir" not in entry or not _pending(ctx, "eval", name, bucket, "accuracy"):
        continue
      t = time.time()
      model, _ = packed.from_export(os.path.join(ctx.workdir, entry["export_dir"]), ctx.abstract_model(),
                                    mode=ctx.config.eval.packed_mode)
      # KL from the teacher when this run has it in memory (not when only `eval` runs)
      table = evaluate(ctx, model, name, teacher=ctx.teacher)
      entry.update(accuracy=table["accuracy"], per_type=table["per_type"], count=table["count"],
                   answer_ce=table["answer_ce"], device_bytes=packed.packed_bytes(model))
      if "kl_from_teacher" in table:
        entry["kl_from_teacher"] = table["kl_from_teacher"]
      ctx.save_results()
      print(f"[eval] {name}: accuracy {table['accuracy']:.4f} from {entry['export_dir']} "
            f"({entry['bits_per_weight']:.3f} bits/weight), {time.time() - t:.1f} s")


STAGES: dict[str, Callable[[Context], None]] = {
    "data": stage_data,
    "teacher": stage_teacher,
    "eval_fp": stage_eval_fp,
    "calibrate": stage_calibrate,
    "binarize": stage_binarize,
    "export": stage_export,
    "distill": stage_distill,
    "eval": stage_eval,
}

# What each stage reads that an earlier stage makes: {stage: ((that stage, what), ...)}. The
# teacher, the calibration batches and the binarized models live in memory, so the stage that
# makes them must run earlier in the same run (`check_order`, before anything runs). Exports
# live on disk, listed in results.json by this run or an earlier one on the same workdir (a
# resume), so `distill` and `eval` look for them where they read them.
NEEDS: dict[str, tuple[tuple[str, str], ...]] = {
    "data": (),
    "teacher": (),
    "eval_fp": (("teacher", "the teacher model"),),
    "calibrate": (),  # draws training batches; the teacher is read by `binarize`
    "binarize": (("teacher", "the teacher model"), ("calibrate", "the calibration batches")),
    "export": (("binarize", "the binarized models"),),
    "distill": (("teacher", "the teacher model"), ("export", "exports")),
    "eval": (("export", "exports"),),
}
ON_DISK = ("export",)  # stages whose output outlives the run


def _with_prerequisites(stages, *, on_disk: bool = False) -> tuple[str, ...]:
  """`stages` and every stage they need (with `on_disk`, also those writing exports), in pipeline order."""
  want, todo = set(), list(stages)
  while todo:
    stage = todo.pop()
    if stage not in want:
      want.add(stage)
      todo += [before for before, _ in NEEDS[stage] if on_disk or before not in ON_DISK]
  return tuple(s for s in STAGES if s in want)


def check_order(stages) -> None:
  """Raises MissingPrerequisite for a stage whose in-memory inputs no earlier stage of the run makes."""
  stages = tuple(stages)
  for i, stage in enumerate(stages):
    for before, what in NEEDS[stage]:
      if before not in ON_DISK and before not in stages[:i]:
        raise MissingPrerequisite(
            f"stage {stage!r} needs {what} from stage {before!r}, which config.stages={stages} does not run "
            f"before it (kept in memory, not on disk): use --config.stages=\"{_with_prerequisites(stages)}\"")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config.stages` in order; returns the results dict (also in workdir/results.json)."""
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise UserError(f"unknown stage(s) {unknown} in config.stages; available: {list(STAGES)}")
  check_order(config.stages)
  os.makedirs(workdir, exist_ok=True)
  ctx = Context(config, workdir)
  for name in config.stages:
    STAGES[name](ctx)
    ctx.save_results()
  if jax.process_index() == 0 and ctx.results["methods"]:
    where = " ".join(str(ctx.results[k]) for k in ("dataset", "split") if ctx.results.get(k))
    print(report.for_run(ctx.results, workdir, title=f"Models on {where or 'the eval split'}"), end="")
    print(f"report: {os.path.join(workdir, 'report.md')}, {os.path.join(workdir, 'report.png')}")
  print(f"results: {ctx.results_path}")
  return ctx.results
