"""`python -m sab_jax.ask --model=PATH --image=IMG --question="..."`: ask a model about an image.

PATH is any model sab_jax makes or reads:
  * a packed export, `DIR/exports/NAME` (manifest.json): served as `stage_eval` serves it
    (`serve.packed.from_export`, the kernels on GPU), tokenizer and answer length from the
    pipeline config in its manifest;
  * a sab_jax teacher checkpoint such as `experiments/teacher/demo` (meta.json + params/);
  * a Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json) of a
    family `models.hf` reads (LLaVA, Qwen2.5-VL).
Each model is asked the way it was evaluated, so an answer here is the answer its accuracy
counted: its own tokenizer, its family's evaluation prompt (`models.families`; `--prompt=chat`
gives a Hugging Face model its family's plain conversation turn instead), its own image
preprocessing (the pipeline's square resize; a Hugging Face checkpoint's
`preprocessor_config.json` when it ships one, `data.images`: CLIP's crop for LLaVA,
Qwen2.5-VL's dynamic resolution) and greedy decoding (`decoding.greedy_generate`).

`--questions=FILE.jsonl` (one {"image", "question", optional "id", ...} object per line; a
relative image path is read from the JSONL's directory) writes each object plus "answer",
in input order, to `--out` (default stdout), `--batch_size` questions per generate call.

Bad input (a directory that is no model, a damaged export, a missing or unreadable image, a
malformed JSONL line) ends with one `error: ...` line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Callable, Iterable, Sequence, TextIO

import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from flax import nnx
from PIL import Image
from tqdm import tqdm

from sab_jax import export as export_lib
from sab_jax.data import pipeline
from sab_jax.data import tokenizer as tokenizer_lib
from sab_jax.data import images as images_lib
from sab_jax.errors import UserError, one_line
from sab_jax.export.manifest import MANIFEST
from sab_jax.models import decoding, families, hf
from sab_jax.serve import packed
from sab_jax.train import checkpointing

# Answer budget (eos included) when the model's config does not name one (data.max_answer_len).
DEFAULT_MAX_NEW_TOKENS = 32
# Prompts are left-padded to a multiple of this: one compilation serves many prompt lengths.
PAD_MULTIPLE = 8
MODEL_FILES = ("manifest.json (a packed export, DIR/exports/NAME), meta.json (a sab_jax teacher checkpoint such "
               "as experiments/teacher/demo) or config.json (a Hugging Face LLaVA or Qwen2.5-VL checkpoint)")


@dataclasses.dataclass
class Asker:
  """A loaded model and how it is asked: tokenizer, image preprocessing, answer budget."""
  model: nnx.Module
  tokenizer: tokenizer_lib.Tokenizer
  # uint8 [H, W, 3] RGB -> float32 [h, w, 3] for the vision tower, or (a Qwen2.5-VL processor's
  # dynamic resolution) `(patches [n, C*T*P*P], grid_thw [1, 3])`.
  pixels: Callable[[np.ndarray], Any]
  max_new_tokens: int
  kind: str  # "export", "teacher" or "hf"

  def prompts(self, questions: Sequence[str], prompt: str = "vqa",
              num_image_tokens: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids and mask `[B, P]` (P: the longest prompt, rounded up to PAD_MULTIPLE);
    `num_image_tokens` per question (default: the model's fixed count)."""
    if prompt not in families.PROMPT_KINDS:
      raise UserError(f"--prompt={prompt!r}: use one of {list(families.PROMPT_KINDS)}")
    if prompt != "vqa" and isinstance(self.tokenizer, tokenizer_lib.WordTokenizer):
      raise UserError(f"--prompt={prompt} is for Hugging Face tokenizers; this model's word tokenizer has one "
                      f"prompt format: drop --prompt")
    counts = num_image_tokens or [self.model.cfg.num_image_tokens] * len(questions)
    template = families.prompt_template(self.model.cfg, prompt)
    rows = [tokenizer_lib.prompt_ids(self.tokenizer, q, n, template) for q, n in zip(questions, counts)]
    length = -(-max(map(len, rows)) // PAD_MULTIPLE) * PAD_MULTIPLE
    ids = np.full((len(rows), length), self.tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
      ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    return ids, mask

  def answer(self, images: Sequence[np.ndarray], questions: Sequence[str], *, prompt: str = "vqa",
             max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers to `questions`, one image each (uint8 RGB arrays), in one generate call."""
    if len(images) != len(questions) or not questions:
      raise ValueError(f"{len(images)} images for {len(questions)} questions")
    pixels = [self.pixels(im) for im in images]
    grid, counts = None, None
    if isinstance(pixels[0], tuple):  # dynamic resolution: transformers' patch layout, one grid per image
      grids = np.concatenate([g for _, g in pixels])
      grid = tuple(tuple(int(v) for v in g) for g in grids)
      counts = self.pixels.num_tokens(grids)
      pixels = np.concatenate([p for p, _ in pixels])
    else:
      pixels = np.stack(pixels)
    ids, mask = self.prompts(questions, prompt, counts)
    n = max_new_tokens or self.max_new_tokens
    longest, limit = int(mask.sum(1).max()), self.model.cfg.text.max_position_embeddings
    if longest + n > limit:  # positions count real tokens only (padding takes none)
      raise UserError(f"a prompt of {longest} tokens plus {n} new tokens exceeds the model's {limit} positions: "
                      f"shorten the question or lower --max_new_tokens")
    tok = self.tokenizer
    out = decoding.greedy_generate(self.model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pixels),
                                   max_new_tokens=n, eos_id=tok.eos_id, pad_id=tok.pad_id, image_grid_thw=grid)
    return [tok.decode(row) for row in np.asarray(out)]


# --- loading ---------------------------------------------------------------------------------

def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path} cannot be read ({type(e).__name__}: {one_line(e)[:120]}): {what}") from None
  if not isinstance(d, dict):
    raise UserError(f"{path} holds a JSON {type(d).__name__}, not an object: {what}")
  return d


def _tokenizer(path: str | None, where: str, cfg: Any) -> tokenizer_lib.Tokenizer:
  """The synthetic set's WordTokenizer (None or WORD_TOKENIZER), else a Hugging Face tokenizer at `path`."""
  if path is None or path == tokenizer_lib.WORD_TOKENIZER:
    return tokenizer_lib.WordTokenizer.for_synthetic_vqa()
  try:
    return tokenizer_lib.HFTokenizer(path, image_token=families.of(cfg).image_token)
  except Exception as e:  # the tokenizers library raises bare Exceptions for a bad file
    raise UserError(f"the tokenizer {path} ({where}) cannot be loaded ({one_line(e)[:160]}): pass "
                    f"--tokenizer=PATH (the checkpoint's tokenizer.json or its directory)") from None


def _check_tokenizer(tok: tokenizer_lib.Tokenizer, cfg: Any, path: str) -> None:
  """The check `stages.Context` makes."""
  problem = tokenizer_lib.mismatch(tok, vocab_size=cfg.text.vocab_size, image_token_id=cfg.image_token_id)
  if problem:
    raise UserError(f"{path}: {problem}: pass --tokenizer=PATH to the model's own tokenizer")


def _square_pixels(cfg: Any) -> Callable[[np.ndarray], np.ndarray]:
  """The pipeline's preprocessing (square resize, CLIP mean/std): how sab_jax trains and evaluates."""
  return functools.partial(pipeline.to_pixels, image_size=cfg.vision.image_size, mean=pipeline.CLIP_MEAN,
                           std=pipeline.CLIP_STD)


def _model_config(d: Any, path: str, where: str) -> Any:
  try:
    return families.config_from_dict(dict(d))
  except (TypeError, ValueError, KeyError) as e:
    raise UserError(f"{path}: {where} is not a model config ({one_line(e)[:160]})") from None


def load_export(path: str, *, mode: str = "auto", tokenizer: str | None = None) -> Asker:
  """A packed export, served as the pipeline's `eval` stage serves it."""
  manifest = export_lib.read_manifest(path)
  if not isinstance(manifest.get("model_config"), dict):
    raise UserError(f"{path}: the manifest has no model_config (an export of a model without one); re-export it "
                    f"with the pipeline")
  config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
  cfg = _model_config(manifest["model_config"], path, "the manifest's model_config")
  param_dtype = jnp.dtype((config.get("teacher") or {}).get("param_dtype") or "float32")
  template = families.abstract(cfg, param_dtype=param_dtype)
  if mode not in packed.MODES:
    raise UserError(f"--mode={mode!r}: use one of {packed.MODES}")
  model, _ = packed.from_export(path, template, mode=mode)
  tok = _tokenizer(tokenizer or tokenizer_lib.tokenizer_path(config),
                   "--tokenizer" if tokenizer else "the export's config.data.tokenizer / config.teacher.init", cfg)
  _check_tokenizer(tok, cfg, path)
  budget = (config.get("data") or {}).get("max_answer_len") or DEFAULT_MAX_NEW_TOKENS
  return Asker(model, tok, _square_pixels(cfg), int(budget), "export")


def load_teacher(path: str, *, tokenizer: str | None = None) -> Asker:
  """A sab_jax parameters checkpoint (`checkpointing.save_params`: meta.json + params/)."""
  meta = _read_json(os.path.join(path, "meta.json"), "a sab_jax teacher checkpoint has a meta.json object")
  if not isinstance(meta.get("model"), dict):
    raise UserError(f"{os.path.join(path, 'meta.json')} has no \"model\" config: not a sab_jax teacher checkpoint")
  cfg = _model_config(meta["model"], path, "meta.json's model")
  model = families.abstract(cfg)  # filled by the restore, never initialised
  try:
    checkpointing.load_params(path, model)
  except Exception as e:  # orbax / tensorstore raise many types for missing or damaged files
    raise UserError(f"{path}: the parameters do not restore ({one_line(e)[:200]}); the checkpoint is damaged "
                    f"or its meta.json describes another model") from None
  tok = _tokenizer(tokenizer or meta.get("tokenizer"), "--tokenizer" if tokenizer else "meta.json's tokenizer", cfg)
  _check_tokenizer(tok, cfg, path)
  budget = meta.get("max_answer_len") or DEFAULT_MAX_NEW_TOKENS  # recorded by stage_teacher since issue 17
  return Asker(model, tok, _square_pixels(cfg), int(budget), "teacher")


def load_hf(path: str, *, tokenizer: str | None = None) -> Asker:
  """A Hugging Face checkpoint directory of any family `models.hf` reads (config.json's model_type)."""
  config = _read_json(os.path.join(path, "config.json"), "a Hugging Face checkpoint has a config.json object")
  if config.get("model_type") not in hf.FAMILIES:
    raise UserError(f"{path}: config.json's model_type {config.get('model_type')!r} is not supported; sab_jax reads "
                    f"{sorted(hf.FAMILIES)}")
  try:
    model = hf.from_pretrained(path)
  except (OSError, ValueError, NotImplementedError) as e:
    raise UserError(f"{path}: not a checkpoint sab_jax reads ({one_line(e)[:240]})") from None
  tok = _tokenizer(tokenizer or path, "--tokenizer" if tokenizer else "the checkpoint's tokenizer.json", model.cfg)
  _check_tokenizer(tok, model.cfg, path)
  pixels = images_lib.processor_for(path, model.cfg) or _square_pixels(model.cfg)
  return Asker(model, tok, pixels, DEFAULT_MAX_NEW_TOKENS, "hf")


def load(path: str, *, mode: str = "auto", tokenizer: str | None = None) -> Asker:
  """The model at `path` (module doc), by the file that marks its kind; `tokenizer` overrides its own."""
  if not os.path.isdir(path):
    raise UserError(f"--model={path} is not a directory: pass a directory with {MODEL_FILES}")
  if os.path.exists(os.path.join(path, MANIFEST)):
    return load_export(path, mode=mode, tokenizer=tokenizer)
  if os.path.exists(os.path.join(path, "meta.json")):
    return load_teacher(path, tokenizer=tokenizer)
  if os.path.exists(os.path.join(path, "config.json")):
    return load_hf(path, tokenizer=tokenizer)
  raise UserError(f"{path} is not a model directory: expected {MODEL_FILES}")


# --- questions -------------------------------------------------------------------------------

def read_image(path: str, where: str = "") -> np.ndarray:
  """uint8 [H, W, 3] RGB (how the pipeline decodes its images); UserError naming `where` if unreadable."""
  at = f"{where}: " if where else ""
  if not os.path.isfile(path):
    raise UserError(f"{at}image {path} not found")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"))
  except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's UnidentifiedImageError is an OSError
    raise UserError(f"{at}image {path} cannot be read ({one_line(e)[:160]}): pass a PNG, JPEG or other image "
                    f"Pillow reads") from None


@dataclasses.dataclass
class Question:
  line: int  # in the JSONL file
  record: dict[str, Any]  # the input object, written back with "answer"
  image: str  # resolved path


def read_questions(path: str) -> list[Question]:
  """The JSONL's questions, every line checked (and every image found) before any model loads."""
  base = os.path.dirname(os.path.abspath(path))
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f"--questions={path} cannot be read ({one_line(e)[:160]})") from None
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{n}: not a JSON object ({e.msg}); write one "
                      f'{{"image": PATH, "question": TEXT}} object per line') from None
    if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
        or not isinstance(record.get("question"), str) or not record["question"].strip():
      raise UserError(f'{path}:{n}: expected an object with string "image" and "question" fields, got '
                      f"{line.strip()[:80]}")
    image = os.path.join(base, os.path.expanduser(record["image"]))
    if not os.path.isfile(image):
      raise UserError(f"{path}:{n}: image {image} not found")
    out.append(Question(n, record, image))
  if not out:
    raise UserError(f"--questions={path} holds no questions")
  return out


def answer_questions(asker: Asker, questions: Sequence[Question], out: TextIO, *, path: str = "",
                     batch_size: int = 8, prompt: str = "vqa", max_new_tokens: int | None = None,
                     progress: bool = True) -> None:
  """Writes each question's object plus "answer" to `out` as JSONL, in input order."""
  with tqdm(total=len(questions), desc="answering", unit="q", file=sys.stderr, disable=not progress) as bar:
    for start in range(0, len(questions), batch_size):
      batch = questions[start:start + batch_size]
      images = [read_image(q.image, f"{path}:{q.line}") for q in batch]
      answers = asker.answer(images, [q.record["question"] for q in batch], prompt=prompt,
                             max_new_tokens=max_new_tokens)
      for q, a in zip(batch, answers):
        out.write(json.dumps({**q.record, "answer": a}) + "\n")
      out.flush()
      bar.update(len(batch))


# --- command line ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m sab_jax.ask", description=__doc__.split("\n\n")[0])
  p.add_argument("--model", required=True,
                 help="a packed export, a sab_jax teacher or a Hugging Face LLaVA / Qwen2.5-VL directory")
  p.add_argument("--image", help="the image (with --question)")
  p.add_argument("--question", help="the question about --image")
  p.add_argument("--questions", help="a JSONL file of {image, question, [id]} objects, instead of --image/--question")
  p.add_argument("--out", help="where --questions' answers go (JSONL; default stdout)")
  p.add_argument("--batch_size", type=int, default=8, help="questions per generate call (--questions)")
  p.add_argument("--max_new_tokens", type=int, default=None,
                 help=f"answer budget, eos included (default: the config's data.max_answer_len, else "
                      f"{DEFAULT_MAX_NEW_TOKENS})")
  p.add_argument("--prompt", default="vqa", choices=families.PROMPT_KINDS,
                 help="vqa: the evaluation prompt (short answers); chat: the family's plain turn (Hugging Face "
                      "tokenizers)")
  p.add_argument("--mode", default="auto", choices=packed.MODES, help="how a packed export is served")
  p.add_argument("--tokenizer", help="a tokenizer.json (or its directory) instead of the model's own")
  return p


def run(args: argparse.Namespace, stdout: TextIO) -> None:
  """The command, UserError on bad input."""
  single = args.image is not None or args.question is not None
  if single == (args.questions is not None) or (single and (args.image is None or args.question is None)):
    raise UserError("pass --image=IMG and --question=TEXT, or --questions=FILE.jsonl")
  if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
    raise UserError("--batch_size and --max_new_tokens must be positive")
  if single:
    image = read_image(args.image)
    asker = load(args.model, mode=args.mode, tokenizer=args.tokenizer)
    (answer,) = asker.answer([image], [args.question], prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    print(answer, file=stdout, flush=True)
    return
  questions = read_questions(args.questions)
  asker = load(args.model, mode=args.mode, tokenizer=args.tokenizer)
  kw = dict(path=args.questions, batch_size=args.batch_size, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
  if not args.out:
    answer_questions(asker, questions, stdout, **kw)
    return
  tmp = args.out + ".tmp"
  try:
    f = open(tmp, "w", encoding="utf-8")
  except OSError as e:
    raise UserError(f"--out={args.out} cannot be written ({one_line(e)[:160]})") from None
  try:
    with f:
      answer_questions(asker, questions, f, **kw)
  except BaseException:
    os.remove(tmp)  # never leaves a half-written answer file
    raise
  os.replace(tmp, args.out)


def main(argv: Iterable[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it reads at INFO
  try:
    run(args, sys.stdout)
  except UserError as e:
    print("error: " + one_line(e), file=sys.stderr, flush=True)  # one line, whatever the message
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
