"""Hugging Face export of a packed export: a directory transformers loads as the original
architecture (`LlavaForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`), so any harness that evaluates Hugging Face
checkpoints evaluates the binarized model.

  python -m sab_jax.export.hf --export=DIR/exports/NAME --out=OUT [--source=HF_DIR]
      [--overwrite] [--max_shard_bytes=5000000000]

NOT a small file: every binarized kernel is written dequantized (its parts' `dequantize()`,
rounded to bfloat16), so OUT is as large as the FP16 checkpoint (2 bytes a weight). The
packed export (about 1.2 bits a binarized weight) stays the small one to ship and serve.

What OUT holds:
  * safetensors, every tensor bfloat16: binarized kernels as above; every other param as the
    export stores it (its bf16 value; int8 params `float32(q) · float32(scale)` rounded to
    bf16). Tensor names come from the source checkpoint: each of its safetensors keys is
    written under its own name, so either transformers key layout round-trips; keys that are
    not ours (e.g. `position_ids` buffers) are copied unchanged, and a tied `lm_head` gets
    the token embedding. A source with only config.json (no safetensors) gets the new-layout
    names (`hf.hf_names`: LLaVA's `model.language_model.*`, `model.vision_tower.vision_model.*`,
    `model.multi_modal_projector.*`, `lm_head.weight`; Qwen2.5-VL's `model.language_model.*`,
    `model.visual.*`, `lm_head.weight`), which transformers >= 5 reads.
  * every non-weight file of the source (config.json, generation_config.json, tokenizer
    and processor files, chat template, ...), copied unchanged.
  * `sab_jax_export.json`: provenance (the export, its method and stored bits per weight,
    how the kernels were dequantized).
The source is `--source`, else the manifest's `config.teacher.init` when `teacher.format` is
'hf'. A model binarized from a sab_jax (orbax) teacher has no Hugging Face source (its
tokenizer is a word list), and a model with `image_coordinates` no Hugging Face architecture.

The safetensors files are written here (8-byte little-endian header length, a JSON header
padded with spaces to a multiple of 8, raw bytes) one tensor at a time, sharded at
`max_shard_bytes` with `model.safetensors.index.json` as transformers does, so no more than
one dequantized kernel is held at a time. The export is read with every check first, its
layers decoded one at a time as their kernels are written (`reader.read(lazy=True)`): the
packed arrays plus one layer's parts and kernel are in memory, never every layer decoded. Everything goes to a temporary directory next
to OUT that is renamed at the end: a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from sab_jax.errors import UserError, one_line
from sab_jax.export import manifest as manifest_lib
from sab_jax.export import reader, writer
from sab_jax.models import hf as hf_lib
from sab_jax.models import families, paths
from sab_jax.quant.providers.base import dequantize

PROVENANCE = "sab_jax_export.json"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 10 ** 9  # transformers' default max_shard_size, "5GB"
_BF16 = ml_dtypes.bfloat16
# Files of a checkpoint directory that hold weights (not copied: OUT has its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz",
                    ".index.json")
_EMBEDDING = "language_model.embed_tokens.embedding"
_SOURCE_FIX = "pass --source=HF_DIR, the Hugging Face checkpoint directory the model was binarized from"


def _itemsize(code: str) -> int:
  """Bytes per element of a safetensors dtype code (the import's table, `hf.SAFETENSORS_DTYPES`)."""
  return np.dtype(hf_lib.SAFETENSORS_DTYPES[code]).itemsize


class Tensor(NamedTuple):
  """One tensor of OUT: its name, safetensors dtype and shape, and how to compute it (when written)."""
  name: str
  dtype: str
  shape: tuple[int, ...]
  make: Callable[[], np.ndarray]

  @property
  def nbytes(self) -> int:
    return _itemsize(self.dtype) * math.prod(self.shape)


# --- safetensors, written one tensor at a time ------------------------------------------------

def _header(tensors: Sequence[Tensor]) -> bytes:
  """The length-prefixed JSON header, padded with spaces to a multiple of 8 bytes."""
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for t in tensors:
    header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: str, tensors: Sequence[Tensor]) -> int:
  """Writes one safetensors file, computing each tensor only when its bytes are due; returns bytes written."""
  with open(path, "wb") as f:
    f.write(_header(tensors))
    for t in tensors:
      a = np.ascontiguousarray(t.make())
      if tuple(a.shape) != t.shape or a.dtype.itemsize != _itemsize(t.dtype):
        raise RuntimeError(f"tensor {t.name}: computed {a.dtype}{list(a.shape)}, planned {t.dtype}{list(t.shape)}")
      f.write(memoryview(a.reshape(-1).view(np.uint8)))
      del a
    return f.tell()


def _shards(tensors: Sequence[Tensor], max_bytes: int) -> list[list[Tensor]]:
  """Consecutive tensors grouped into files of at most `max_bytes` (a bigger tensor alone), as transformers does."""
  shards: list[list[Tensor]] = [[]]
  size = 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def _write_weights(directory: str, tensors: Sequence[Tensor], max_bytes: int) -> list[str]:
  """model.safetensors, or model-0000i-of-0000n.safetensors + the index; returns the file names."""
  shards = _shards(tensors, max_bytes)
  if len(shards) == 1:
    names = ["model.safetensors"]
  else:
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
  for name, shard in zip(names, shards):
    write_safetensors(os.path.join(directory, name), shard)
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}}
    with open(os.path.join(directory, INDEX), "w") as f:
      json.dump(index, f, indent=2)
    names.append(INDEX)
  return names


# --- what goes into OUT ------------------------------------------------------------------------

def _model_config(directory: str, manifest: Mapping[str, Any]) -> Any:
  mc = manifest.get("model_config")
  if mc is None:
    raise UserError(f"{directory}: the manifest has no model_config (not an export of a sab_jax model); only exports "
                    f"of sab_jax LVLMs have a Hugging Face form")
  cfg = families.config_from_dict(mc)
  hf_lib.check_hf_architecture(cfg)
  return cfg


def _source_dir(directory: str, manifest: Mapping[str, Any], source: str | None) -> str:
  """--source, else the Hugging Face teacher the export was binarized from."""
  if source:
    where, src = "--source", source
  else:
    teacher = (manifest.get("config") or {}).get("teacher") or {}
    fmt, init = teacher.get("format"), teacher.get("init")
    if fmt != "hf":
      raise UserError(f"{directory} names no Hugging Face source (its config.teacher.format is {fmt!r}, not 'hf': "
                      f"a sab_jax orbax teacher's config and word tokenizer have no transformers form to copy); "
                      f"{_SOURCE_FIX} (same model config)")
    if not init:
      raise UserError(f"{directory}: the manifest's config.teacher.init is empty; {_SOURCE_FIX}")
    where, src = "the manifest's config.teacher.init", init
  src = os.path.abspath(src)
  if not os.path.isdir(src):
    raise UserError(f"source checkpoint {src} ({where}) does not exist; {_SOURCE_FIX}")
  if not os.path.isfile(os.path.join(src, "config.json")):
    raise UserError(f"source checkpoint {src} ({where}) has no config.json; {_SOURCE_FIX}")
  return src


def _check_source_config(directory: str, src: str, manifest: Mapping[str, Any]) -> None:
  """The source's config.json must describe the exported model (else its names, shapes and tokenizer do not fit)."""
  try:
    theirs = hf_lib.read_config(src)
  except (NotImplementedError, ValueError, json.JSONDecodeError) as e:
    raise UserError(f"source checkpoint {src}: config.json is not a supported config ({e}); {_SOURCE_FIX}") from e
  try:  # the square size a dynamic-resolution model was fed is the pipeline's choice, not the checkpoint's
    theirs = families.with_image_size(theirs, families.config_from_dict(manifest["model_config"]).vision.image_size)
  except ValueError:
    pass  # a fixed-size tower: the comparison below names the difference
  theirs = manifest_lib.jsonable(theirs)
  ours, theirs, diff = manifest_lib.differing_keys(manifest["model_config"], theirs)
  if diff:
    fields = ", ".join(f"{k} (source {theirs.get(k)}, export {ours.get(k)})" for k in diff[:6])
    raise UserError(f"source checkpoint {src} is another model than {directory}: its config.json differs in "
                    f"{fields}; {_SOURCE_FIX}")


def _has_safetensors(src: str) -> bool:
  return any(f.endswith(".safetensors") or f == INDEX for f in os.listdir(src))


def _plan(src: str, cfg: Any, shapes: Mapping[str, tuple[int, ...]],
          value: Callable[[str | None, str], np.ndarray]) -> tuple[list[Tensor], list[str]]:
  """The tensors of OUT in the source's names and order; returns (tensors, source keys copied unchanged).

  `shapes`: our param paths and shapes; `value(hf_key, path)`: the bf16 HF tensor of a param (hf_key None: our layout).
  """
  if not _has_safetensors(src):
    names = hf_lib.hf_names(cfg)
    return [Tensor(k, "BF16", hf_lib.hf_shape(k, shapes[p], cfg), lambda k=k, p=p: value(k, p))
            for k, p in names.items()], []
  try:
    source = hf_lib.open_checkpoint(src)
  except ValueError as e:
    raise UserError(f"source checkpoint {src}: {e}; {_SOURCE_FIX}") from e
  tied = cfg.text.tie_word_embeddings
  tensors, copied, used, unexpected, misshaped = [], [], set(), [], []
  for key, st in source.items():
    mapped = hf_lib.map_key(key, cfg)
    if mapped is None:  # not ours: copied as the source has it
      tensors.append(Tensor(key, st.header[key]["dtype"], st.shape(key), lambda key=key, st=st: st.get(key)))
      copied.append(key)
      continue
    path = mapped[0]
    if path == "lm_head.kernel" and tied:  # a tied head saved anyway: the embedding, as transformers ties it
      want = tuple(shapes[_EMBEDDING])
      tensors.append(Tensor(key, "BF16", want, lambda key=key: value(None, _EMBEDDING)))
    elif path not in shapes or path in used:
      unexpected.append(key)
      continue
    else:
      want = hf_lib.hf_shape(key, shapes[path], cfg)
      tensors.append(Tensor(key, "BF16", want, lambda key=key, path=path: value(key, path)))
      used.add(path)
    if want != st.shape(key):
      misshaped.append(f"{key} {list(st.shape(key))} (the export's is {list(want)})")
  missing = sorted(set(shapes) - used)
  if missing or unexpected or misshaped:
    raise UserError(f"source checkpoint {src} does not fit the exported model: no tensor for {missing[:4]}, "
                    f"unexpected {unexpected[:4]}, mis-shaped {misshaped[:4]}; {_SOURCE_FIX}")
  return tensors, copied


def _copy_files(src: str, dst: str) -> list[str]:
  """Copies every top-level non-weight file of the source (config, tokenizer, processor, templates)."""
  copied = []
  for name in sorted(os.listdir(src)):
    path = os.path.join(src, name)
    if (not os.path.isfile(path) or name.startswith(".") or name == PROVENANCE
        or name.endswith(_WEIGHT_SUFFIXES)):
      continue
    shutil.copy2(path, os.path.join(dst, name))
    copied.append(name)
  return copied


def _check_out(out: str, overwrite: bool, protected: Sequence[str]) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} is a file; choose a directory")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out {out} is not empty; pass --overwrite to replace it, or choose another directory")
  for p in protected:
    if p == out or p.startswith(out + os.sep):
      raise UserError(f"--out {out} would replace {p}, which this export reads; choose another directory")


def _replace_dir(tmp: str, out: str) -> None:
  """Puts the finished `tmp` in place of `out` (renames, so `out` is never half-written)."""
  if os.path.isdir(out):
    old = tmp + ".old"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out)


def export_hf(export_dir: str, out: str, *, source: str | None = None, overwrite: bool = False,
              max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, Any]:
  """Writes the Hugging Face checkpoint of a packed export (module doc).

  Args:
    export_dir: the packed export (`DIR/exports/NAME`), read with the strict `reader.read`.
    out: the directory to write; must be absent or empty unless `overwrite`.
    source: the Hugging Face checkpoint that gives names, config and tokenizer files
      (default: the manifest's config.teacher.init when teacher.format is 'hf').
    overwrite: replace a non-empty `out` (only once the new one is complete).
    max_shard_bytes: the largest safetensors file (a larger single tensor gets a file of its own).

  Returns:
    {"out", "bytes" (every file of OUT), "tensor_bytes", "export_bytes" (the packed export on
    disk), "files", "source", "names" ('source' or 'new layout'), "read_s" (`reader.read`: restore
    and checks; each layer is decoded later, as it is written), "seconds" (all of it)}.

  Raises:
    UserError: a model with no Hugging Face form, no or a mismatched source, a non-empty
      `out`; DamagedExport (a UserError) from the reader for a damaged export.
  """
  t0 = time.perf_counter()
  export_dir, out = os.path.abspath(export_dir), os.path.abspath(out)
  manifest = manifest_lib.read_manifest(export_dir)
  cfg = _model_config(export_dir, manifest)
  src = _source_dir(export_dir, manifest, source)
  _check_out(out, overwrite, (src, export_dir))
  _check_source_config(export_dir, src, manifest)
  if max_shard_bytes <= 0:
    raise UserError(f"--max_shard_bytes must be positive, got {max_shard_bytes}")

  template = families.abstract(cfg)
  shapes = {p: tuple(v.get_value().shape) for p, v in paths.params(template).items()}
  layers: Mapping[str, Any] = {}  # the export's, read below once the source's names are planned
  params: dict[str, np.ndarray] = {}

  def value(key: str | None, path: str) -> np.ndarray:
    """The bf16 HF tensor of one param: a binarized kernel dequantized (its parts dropped after), else the export's."""
    layer = path.removesuffix(".kernel")
    if path.endswith(".kernel") and layer in layers:
      w = np.asarray(jnp.asarray(dequantize(layers.pop(layer))).astype(jnp.bfloat16))
    else:
      w = np.asarray(params[path]).astype(_BF16)
    return w if key is None else hf_lib.to_hf(key, w, cfg)

  tensors, copied_tensors = _plan(src, cfg, shapes, value)
  t_read = time.perf_counter()
  manifest, decoded, stored = reader.read(export_dir, template, lazy=True)
  read_s = time.perf_counter() - t_read
  layers = decoded
  params.update(stored)
  del stored

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)
    weight_files = _write_weights(tmp, tensors, max_shard_bytes)
    files = _copy_files(src, tmp)
    totals = manifest.get("totals") or {}
    provenance = {
        "what": "a Hugging Face checkpoint of a sab_jax packed export, written by sab_jax.export.hf",
        "export": export_dir, "method": manifest["method"], "provider": manifest["provider"].get("repr"),
        "format_version": manifest["format_version"], "binarized_layers": len(manifest["layers"]),
        "binarized_weights": totals.get("binarized_weights"),
        "stored_bits_per_weight": totals.get("bits_per_weight"),
        "formula_bits_per_weight": totals.get("formula_bits_per_weight"),
        "int8_params": manifest.get("int8_params", []),
        "kernels": "each binarized kernel is its parts' dequantize() (float32) rounded to bfloat16: this checkpoint "
                   "is as large as FP16; the packed export is the small one",
        "params": "every other param: the export's bfloat16 value (int8 params: float32(q) * float32(scale), "
                  "rounded to bfloat16)",
        "source": src, "names": "source" if _has_safetensors(src) else "new layout",
        "copied_unchanged": copied_tensors, "copied_files": files, "weight_files": weight_files,
        "tensor_bytes": sum(t.nbytes for t in tensors),
    }
    with open(os.path.join(tmp, PROVENANCE), "w") as f:
      json.dump(provenance, f, indent=1)
    _replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"out": out, "bytes": writer.dir_bytes(out), "tensor_bytes": provenance["tensor_bytes"],
          "export_bytes": writer.dir_bytes(export_dir), "files": len(os.listdir(out)), "source": src,
          "names": provenance["names"], "read_s": read_s, "seconds": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(prog="python -m sab_jax.export.hf", description=__doc__.split("\n\n")[0])
  ap.add_argument("--export", required=True, help="the packed export, DIR/exports/NAME")
  ap.add_argument("--out", required=True, help="the Hugging Face checkpoint directory to write")
  ap.add_argument("--source", default=None,
                  help="Hugging Face LLaVA directory giving names, config and tokenizer (default: the manifest's "
                       "config.teacher.init when teacher.format is 'hf')")
  ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  ap.add_argument("--max_shard_bytes", type=int, default=MAX_SHARD_BYTES, help="largest safetensors file")
  args = ap.parse_args(argv)
  try:
    info = export_hf(args.export, args.out, source=args.source, overwrite=args.overwrite,
                     max_shard_bytes=args.max_shard_bytes)
  except UserError as e:
    print("error: " + one_line(e), file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"wrote {info['bytes']:,} bytes to {info['out']} in {info['seconds']:.1f} s: a bf16 Hugging Face checkpoint, "
        f"as large as FP16; the packed export {os.path.abspath(args.export)} ({info['export_bytes']:,} bytes) is "
        f"the small one")
  return info


if __name__ == "__main__":
  main()
