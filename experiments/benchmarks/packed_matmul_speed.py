"""Decode-shape speed of the packed 1-bit kernel against bf16 (cuBLAS, XLA) and unpack-in-XLA.

  python experiments/benchmarks/packed_matmul_speed.py [--out packed_matmul_speed.json] [--quick] [--sweep]

Shapes: x[M, K] @ W[K, N] for (K, N) = (4096, 11008) and (11008, 4096), M = 1 and 16.
Rows of the table:
  cublas_bf16     torch.nn.functional.linear, bf16 (timed with CUDA events; skipped without torch/CUDA)
  xla_bf16        jnp.dot in bf16
  xla_unpack      the sign bits unpacked to bf16 inside XLA, then the GEMM (one plane, XNOR layout)
  kernel_xnor     the Pallas kernel on an XNOR layer (one plane, B ⊙ α_out) as served (`apply_planes`)
  xla_trivial_op  `x * 2`: what one XLA launch costs inside the timing loop
  kernel_sab_s    the whole structured-SAB layer as served (`serve.packed.apply_planes`: the
                  sign plane with two row-scale sets + the gathered residual plane + glue)
  *_fused         the same layer through `kernels.packed_layer` (one launch for all planes,
                  K splits summed by XLA); *_fused_atomic: K splits added atomically
  *_int8          the fused layer with int8 activations: the bit-serial popcount kernel
                  (an approximation: activations rounded to 8 bits per 128-input chunk; M <= 4)
  *_xla_gather*   the salient rows gathered by XLA before the kernel, not inside it (M <= 4)
`--sweep` adds, at M = 1, the fused kernel's tilings on the SAB layer (JSON `sweep`).

Every JAX row is amortised over many calls inside one jit (a fori_loop whose input depends
on the previous sum, so nothing is hoisted), cycling through enough weight copies that they
do not sit in L2 (≥ 4× the 50 MB of an H100's L2); the figure is the median over repeats of
(wall time / calls). Inside such a loop every XLA launch costs several µs (the
`xla_trivial_op` row), so each row is also timed as **device time**: one more run of the
same compiled loop under `jax.profiler` (CUPTI), the summed kernel durations per call
(the harness's per-call sum included: read rows against `xla_trivial_op`'s device time)
and, in the JSON, per kernel (`*_kernels`: the Pallas kernel's own time is there by name).
The cuBLAS row is traced the same way. Correctness is
checked first on the device (kernels vs float32 references).
Needs only jax/numpy (and torch for the cuBLAS row): runs on the GPU machine as is.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch

import argparse
import collections
import glob
import json
import platform
import statistics
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sab_jax.export import packing
from sab_jax.kernels import packed_layer, packed_matmul
from sab_jax.serve import packed
from sab_jax.quant import providers

SHAPES = ((4096, 11008), (11008, 4096))
L2_BYTES = 50 * 2**20


def structured_parts(rng, n_in, n_out, group=512, n_salient=41):
  """Random parts in the structured SAB layout (what `Sab(structured=True)` stores)."""
  sal = np.zeros(n_in, bool)
  for s in range(0, n_in, group):
    r = np.arange(s, min(s + group, n_in))
    sal[rng.choice(r, min(n_salient, len(r)), replace=False)] = True
  a_in = rng.uniform(0.5, 1.5, (n_in, 2)).astype(np.float32)
  a_in[~sal, 1] = 1.0
  return providers.SalientSplitParts(
      signs=rng.random((n_in, n_out)) < 0.5, residual_signs=(rng.random((n_in, n_out)) < 0.5) & sal[:, None],
      salient_rows=sal, alpha_in=a_in.astype(jnp.bfloat16),
      alpha_out=(rng.uniform(0.005, 0.02, (-(-n_in // group), 3, n_out))).astype(jnp.bfloat16), group=group, mode="rc")


def amortised_us(fn, copies, x, *, calls_target, repeats, trace=False):
  """Median µs per `fn(copy, x)` call, cycling through `copies` inside one jit; with
  `trace`, also the device time per call of one more run, from a profiler trace:
  (µs per call, {kernel: µs per call}). That counts every kernel of the loop, the
  harness's own per-call sum among them (the `xla_trivial_op` row measures those)."""
  n_rounds = max(1, calls_target // len(copies))

  @jax.jit
  def run(copies, x):
    def body(_, acc):
      xx = x + (acc * 1e-30).astype(x.dtype)
      ys = [fn(c, xx) for c in copies]
      return acc + sum(jnp.sum(y.astype(jnp.float32)) for y in ys)
    return jax.lax.fori_loop(0, n_rounds, body, jnp.float32(0))

  jax.block_until_ready(run(copies, x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(copies, x))
    times.append((time.perf_counter() - t) / (n_rounds * len(copies)))
  device = (None, {})
  if trace:
    try:
      with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
          jax.block_until_ready(run(copies, x))
        events = _kernel_events(d)
      device = _per_call(events, n_rounds * len(copies)) if events else device
    except Exception:  # noqa: BLE001 (the wall-clock figure stands)
      traceback.print_exc()
  return 1e6 * statistics.median(times), device


def _kernel_events(trace_dir):
  """(name, duration ns) of every GPU kernel in a `jax.profiler.trace` directory."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  events = []
  for path in files:
    for plane in jax.profiler.ProfileData.from_file(path).planes:
      if not plane.name.startswith("/device:GPU"):
        continue
      lines = [ln for ln in plane.lines if ln.name.startswith("Stream")] or list(plane.lines)
      events += [(e.name, e.duration_ns) for ln in lines for e in ln.events
                 if "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
  return events


def _per_call(events, calls):
  """(µs of kernel time per call, {kernel: µs per call}) from the events of `calls` calls."""
  by_name = collections.defaultdict(float)
  for name, ns in events:
    by_name[name[:80]] += ns / 1e3 / calls
  return sum(by_name.values()), dict(sorted(by_name.items(), key=lambda t: -t[1]))


MAX_COPIES = [64]


def n_copies(bytes_per_copy):
  """Weight copies to cycle through so that they do not fit in L2."""
  return min(MAX_COPIES[0], max(2, -(-4 * L2_BYTES // bytes_per_copy)))


def cublas_us(m, k, n, *, calls_target, repeats):
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return None, (None, {})
  if not torch.cuda.is_available():
    return None, (None, {})
  ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(n_copies(2 * k * n))]
  x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
  rounds = max(1, calls_target // len(ws))
  for w in ws:
    F.linear(x, w)
  torch.cuda.synchronize()
  times = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
      for w in ws:
        F.linear(x, w)
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) * 1e3 / (rounds * len(ws)))
  device = (None, {})
  try:  # the same kernels under the profiler (CUPTI sees the whole process)
    with tempfile.TemporaryDirectory() as d:
      with jax.profiler.trace(d):
        for w in ws:
          F.linear(x, w)
        torch.cuda.synchronize()
      events = _kernel_events(d)
    device = _per_call(events, len(ws)) if events else device
  except Exception:  # noqa: BLE001 (the event timing above stands)
    traceback.print_exc()
  del ws
  torch.cuda.empty_cache()
  return statistics.median(times), device


ROWS = ("cublas_bf16", "xla_trivial_op", "xla_bf16", "xla_unpack", "kernel_xnor", "kernel_xnor_fused",
        "kernel_xnor_fused_atomic", "kernel_xnor_int8", "kernel_sab_s", "kernel_sab_s_fused",
        "kernel_sab_s_fused_atomic", "kernel_sab_s_fused_xla_gather", "kernel_sab_s_int8",
        "kernel_sab_s_fused_xla_gather_int8")


def print_row(entry):
  """One line per timed row: amortised µs, device µs, speed-up over cuBLAS (device time if known)."""
  base = entry.get("cublas_bf16_device") or entry.get("cublas_bf16") or entry.get("xla_bf16")
  print(f"{entry['M']:>3}x{entry['K']}x{entry['N']}:")
  for name in ROWS:
    wall, dev = entry.get(name), entry.get(name + "_device")
    if not isinstance(wall, float):
      if wall is not None:
        print(f"  {name:28s} {wall}")
      continue
    ref = dev if isinstance(dev, float) else wall
    dev_s = f"{dev:8.2f}" if isinstance(dev, float) else "       -"
    print(f"  {name:28s} amortised {wall:8.2f} us  device {dev_s} us  ({base / ref:5.2f}x)", flush=True)


def sweep(layers, parts, n_copies_, x, n, kd, *, calls, on_gpu):
  """Device time of the fused kernel's tilings on the structured-SAB layer."""
  out = {}
  planes = packed.planes_for(parts, one_lhs=True)
  sizes, planes = [s.group_size for s, _ in planes], [a for _, a in planes]
  for bn in (32, 64, 128):
    for splits in (4, 8, 16):
      layout, arr = packed_layer.prepare(planes, sizes, n, block_n=bn, k_splits=splits)
      arr = [{kk: jnp.asarray(v) for kk, v in a.items()} for a in arr]
      cs = [jax.tree.map(lambda a: jnp.array(a, copy=True), arr) for _ in range(n_copies_)]
      for nw in (2, 4, 8):
        for reduce, act in (("sum", "bf16"), ("atomic", "bf16"), ("sum", "int8")):
          name = f"sab_fused/{bn}x{splits}/w{nw}/{reduce}/{act}"
          fn = lambda a, x, layout=layout, nw=nw, reduce=reduce, act=act: packed_layer.layer_matmul(
              x, a, layout, dtype=kd, num_warps=nw, reduce=reduce, activations=act)
          try:
            wall, (dev, _) = amortised_us(fn, cs, x, calls_target=calls // 2, repeats=3, trace=on_gpu)
            out[name] = {"amortised": wall, "device": dev}
          except Exception as e:  # a tiling Triton rejects: record and go on
            out[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
  ok = sorted(((v["device"] or v["amortised"], k) for k, v in out.items() if isinstance(v, dict)))
  print("  sweep (device us, else amortised): " + ", ".join(f"{k} {v:.2f}" for v, k in ok[:8]), flush=True)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="packed_matmul_speed.json")
  ap.add_argument("--batches", default="1,16")
  ap.add_argument("--calls", type=int, default=400, help="calls per timed jit")
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--quick", action="store_true", help="tiny shapes, few calls (CPU smoke test)")
  ap.add_argument("--sweep", action="store_true", help="also sweep the plane kernel's tilings (M = 1)")
  args = ap.parse_args()
  on_gpu = jax.default_backend() == "gpu"
  interpret = not on_gpu
  shapes = ((256, 384), (384, 256)) if args.quick else SHAPES
  batches = [int(b) for b in args.batches.split(",")]
  calls, repeats = (4, 2) if args.quick else (args.calls, args.repeats)
  if args.quick:
    MAX_COPIES[0] = 2
  rng = np.random.default_rng(0)
  kd = jnp.bfloat16 if on_gpu else jnp.float32
  device = jax.devices()[0].device_kind
  print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}")
  rows, checks = [], {}

  for k, n in shapes:
    signs = rng.random((k, n)) < 0.5
    bits = jnp.asarray(packing.pack_bits(signs))
    col = jnp.asarray(rng.uniform(0.005, 0.02, (1, 1, n)).astype(jnp.bfloat16).astype(np.float32))
    parts = structured_parts(rng, k, n)
    xparts = providers.XnorParts(signs=signs, alpha_out=np.asarray(col[0, 0]).astype(jnp.bfloat16))
    layers = {  # row name -> the layer as the packed model serves it
        "kernel_xnor": (xparts, "per_plane", "bf16"), "kernel_sab_s": (parts, "per_plane", "bf16"),
        "kernel_xnor_fused": (xparts, "fused", "bf16"), "kernel_sab_s_fused": (parts, "fused", "bf16"),
        # int8 activations: the popcount kernel (an approximation; M <= 4 rows only)
        "kernel_xnor_int8": (xparts, "fused", "int8"), "kernel_sab_s_int8": (parts, "fused", "int8")}
    layers = {name: packed.PackedDense(pa, bias=None, dtype=jnp.float32, mode="kernel", kernel_dtype=kd,
                                       kernel=kern, activations=act)
              for name, (pa, kern, act) in layers.items()}
    auto_mode = packed.PackedDense(parts, bias=None, dtype=jnp.float32, mode="auto").mode
    dq = packed.PackedDense(parts, bias=None, dtype=jnp.float32, mode="dequant")
    arrays = {name: [{kk: v[...] for kk, v in p.items()} for p in layer.planes] for name, layer in layers.items()}
    nbytes = {name: sum(int(v.nbytes) for p in a for v in p.values()) for name, a in arrays.items()}

    def served(name, **kw):
      """fn(arrays, x) of a layer row (kw: the fused kernel's reduce / vector)."""
      layer = layers[name]
      if layer.kernel == "fused":
        return lambda a, x: packed_layer.layer_matmul(x, a, layer.layout, interpret=interpret, dtype=kd,
                                                      activations=layer.activations, **kw)
      return lambda a, x: packed.apply_planes(x, layer.specs, a, n, kernel_dtype=kd, interpret=interpret, **kw)

    rows_fns = {name: (served(name), name) for name in layers}
    # the salient rows gathered by XLA before the kernel instead of by the kernel (M <= 4 rows)
    rows_fns["kernel_sab_s_fused_xla_gather_int8"] = (served("kernel_sab_s_int8", gather_in_kernel=False),
                                                      "kernel_sab_s_int8")
    rows_fns["kernel_sab_s_fused_xla_gather"] = (served("kernel_sab_s_fused", gather_in_kernel=False, vector=True),
                                                 "kernel_sab_s_fused")
    rows_fns["kernel_sab_s_fused_atomic"] = (served("kernel_sab_s_fused", reduce="atomic"), "kernel_sab_s_fused")
    rows_fns["kernel_xnor_fused_atomic"] = (served("kernel_xnor_fused", reduce="atomic"), "kernel_xnor_fused")

    # correctness on this device: XNOR rows against the float32 unpack-in-XLA reference, SAB
    # rows against the exactly dequantized layer; a row that fails is dropped, the rest go on
    x16 = jnp.asarray(rng.standard_normal((16, k)).astype(np.float32)).astype(kd)
    ref_x = packed_matmul.plane_matmul_reference(x16.astype(jnp.float32)[None], bits, col, group_size=k)
    ref_s = dq(x16.astype(jnp.float32))
    for name, (fn, arr) in list(rows_fns.items()):
      ref = ref_x if "xnor" in name else ref_s
      if name.endswith("_int8"):  # against its own XLA twin (the same quantized sum)
        ref = packed_layer.int8_reference(x16[:1].astype(jnp.float32), arrays[arr], layers[arr].layout)
      try:
        for m_ in ((1,) if name.endswith("_int8") or "xla_gather" in name else (16, 1)):
          y = fn(arrays[arr], x16[:m_])
          checks[f"{name} {k}x{n} M={m_} rel err"] = float(jnp.abs(y - ref[:m_]).max() / jnp.abs(ref[:m_]).max())
      except Exception as e:  # keep the other rows if one kernel does not compile here
        traceback.print_exc()
        checks[f"{name} {k}x{n}"] = f"failed: {type(e).__name__}: {str(e)[:500]}"
        del rows_fns[name]
    checks["mode='auto' picks"] = auto_mode
    print("checks:", json.dumps(checks, indent=1), flush=True)

    # Copies live at different addresses (that is all L2 sees); their values may repeat.
    w0 = jnp.asarray(rng.standard_normal((k, n)).astype(np.float32) * 0.02).astype(kd)
    wb = [jnp.array(w0, copy=True) for _ in range(n_copies(2 * k * n))]
    cb = [(jnp.array(bits, copy=True), col) for _ in range(n_copies(k * n // 8))]
    dup = lambda tree, nb: [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(n_copies(nb))]
    copies = {name: dup(a, nbytes[name]) for name, a in arrays.items()}
    for m in batches:
      x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32)).astype(kd)
      entry = {"K": k, "N": n, "M": m}
      timed = {  # row -> (fn(copy, x), copies)
          "xla_trivial_op": (lambda w, x: x * 2, wb),  # what one more XLA launch costs in the loop
          "xla_bf16": (lambda w, x: jnp.dot(x, w), wb),
          "xla_unpack": (lambda c, x: packed_matmul.plane_matmul_reference(x[None], c[0], c[1], group_size=k), cb)}
      timed.update({name: (fn, copies[arr]) for name, (fn, arr) in rows_fns.items()
                    if m <= packed_matmul.VECTOR_MAX_ROWS or not (name.endswith("_int8") or "xla_gather" in name)})
      if on_gpu:
        entry["cublas_bf16"], (entry["cublas_bf16_device"], entry["cublas_bf16_kernels"]) = cublas_us(
            m, k, n, calls_target=calls, repeats=repeats)
      for name, (fn, cs) in timed.items():
        try:
          entry[name], (entry[name + "_device"], entry[name + "_kernels"]) = amortised_us(
              fn, cs, x, calls_target=calls, repeats=repeats, trace=on_gpu)
        except Exception as e:  # noqa: BLE001 (record and go on: the other rows still count)
          traceback.print_exc()
          entry[name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
      if on_gpu and args.sweep and m == 1:
        entry["sweep"] = sweep(layers, parts, len(copies["kernel_sab_s_fused"]), x, n, kd, calls=calls, on_gpu=on_gpu)
      entry.update(bf16_bytes=2 * k * n, bits_bytes=k * n // 8, **{f"{name}_bytes": b for name, b in nbytes.items()})
      rows.append(entry)
      print_row(entry)

  out = {"device": device, "backend": jax.default_backend(), "jax": jax.__version__, "host": platform.node(),
         "checks": checks, "rows": rows, "calls_per_jit": calls, "repeats": repeats}
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
