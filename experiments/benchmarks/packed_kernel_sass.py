"""Static cost of the packed kernels on sm_90, without a GPU: SASS instructions per weight.

  pip install triton   # any recent release; it brings ptxas and nvdisasm
  python experiments/benchmarks/packed_kernel_sass.py [--out packed_kernel_sass.json]

At decode the packed kernels read 16x fewer bytes than bf16, so what bounds them is how
many instructions it takes to turn a sign bit into a multiply-add. This script lowers each
kernel variant for CUDA (Pallas -> Triton IR, on this CPU machine), compiles the Triton IR
with the `triton` package to a cubin for sm_90 (H100/H200), disassembles it and counts the
SASS instructions of each loop body. With the trip counts of the 7B decode shapes that gives
the warp instructions one call issues (straight-line code once per program, loop bodies
times their trips), and an **issue bound**: the time an H200 (132 SMs,
4 schedulers each, 1.98 GHz) needs just to issue them. It is a lower bound on the kernel's
time, not a measurement: memory stalls, latency and tails come on top (GPU timings:
`packed_matmul_speed.py`). For the int8-activation (popcount) kernel the POPC pipe (16
per clock per SM) is the tighter bound and is reported too.

Caveats: the `triton` package's compiler is not the one XLA bundles on the GPU machine
(versions differ); the XLA glue around the kernels (gathers, sums) is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sab_jax.kernels import packed_layer, packed_matmul
from sab_jax.quant import providers
from sab_jax.serve import packed

H200_WARP_ISSUE_PER_S = 132 * 4 * 1.98e9
# POPC results per second: 16 per clock per SM on compute capability 9.0 (CUDA C++
# Programming Guide, arithmetic instruction throughput table)
H200_POPC_PER_S = 132 * 16 * 1.98e9


def triton_ir(fn, *args) -> str:
  """The Triton IR (text) of the one pallas_call in `fn(*args)`, lowered for CUDA."""
  buf = io.StringIO()
  original = pl.pallas_call
  pl.pallas_call = functools.partial(original, debug=True)  # prints the Triton module
  try:
    with contextlib.redirect_stdout(buf):
      jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    pl.pallas_call = original
  text = buf.getvalue()
  text = text[text.index("module @"):]
  text = text[:text.rindex("\n}") + 2]
  text = re.sub(r" \[unknown\]", "", text)  # debug locations: the triton parser wants none
  text = re.sub(r"\s*\"[^\"\n]*\"\(#loc\d+\)", "", text)
  return re.sub(r" loc\([^\n]*\)", "", text)


def compile_sass(ttir: str, num_warps: int, num_stages: int = 3) -> str:
  """Triton IR -> cubin for sm_90 (the `triton` package) -> SASS text (nvdisasm)."""
  from triton._C.libtriton import ir
  from triton.backends.compiler import GPUTarget
  from triton.backends.nvidia.compiler import CUDABackend
  from triton.compiler.compiler import Language
  backend = CUDABackend(GPUTarget("cuda", 90, 32))
  options = backend.parse_options({"num_warps": num_warps, "num_stages": num_stages})
  ctx = ir.context()
  ir.load_dialects(ctx)
  backend.load_dialects(ctx)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "kernel.ttir")
    with open(path, "w") as f:
      f.write(ttir)
    module = ir.parse_mlir_module(path, ctx)
    module.context = ctx
    stages, metadata = {}, {}
    backend.add_stages(stages, options, Language.TRITON)
    for stage in stages.values():
      module = stage(module, metadata)
    cubin = os.path.join(d, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(module)
    nvdisasm = os.path.join(os.path.dirname(sys.modules["triton"].__file__), "backends", "nvidia", "bin", "nvdisasm")
    return subprocess.run([nvdisasm, "-c", cubin], check=True, capture_output=True, text=True).stdout


def _instructions(lines: list[str]) -> list[str]:
  return [ln for ln in lines if re.match(r"^\s+/\*[0-9a-f]+\*/", ln)]


def loops(sass: str) -> list[tuple[int, int]]:
  """(instructions, POPC instructions) of each loop body (label .. backward branch), in code order."""
  lines = sass.splitlines()
  label_at = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", ln))}
  out = []
  for i, ln in enumerate(lines):
    m = re.search(r"BRA `?\(?(\.L_x_\d+)\)?", ln)
    if m and m.group(1) in label_at and label_at[m.group(1)] < i - 1:  # not the trap `BRA` to itself
      body = _instructions(lines[label_at[m.group(1)]:i + 1])
      out.append((len(body), sum("POPC" in b for b in body)))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="packed_kernel_sass.json")
  args = ap.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from packed_matmul_speed import structured_parts  # the benchmark's random structured-SAB layer

  rng = np.random.default_rng(0)
  results = []
  for k, n in ((4096, 11008), (11008, 4096)):
    signs = rng.random((k, n)) < 0.5
    xparts = providers.XnorParts(signs=signs, alpha_out=rng.uniform(0.005, 0.02, n).astype(jnp.bfloat16))
    sparts = structured_parts(rng, k, n)
    for m in (1, 16):
      x = jnp.zeros((m, k), jnp.bfloat16)
      for name, parts in (("xnor", xparts), ("sab_structured", sparts)):
        variants = {}
        planes = packed.planes_for(parts)
        specs, arrays = [s for s, _ in planes], [{kk: jnp.asarray(v) for kk, v in a.items()} for _, a in planes]
        # per_plane: one launch per plane, as `apply_planes` calls it
        for idx, (spec, a) in enumerate(zip(specs, arrays)):
          rows = a["bits"].shape[0] * 32
          bn, splits = packed_matmul.tiling(n, rows // spec.chunk)
          xl = jnp.zeros((spec.n_lhs, m, rows), jnp.bfloat16)
          fn = functools.partial(packed_matmul.plane_matmul, group_size=spec.group_size, chunk=spec.chunk,
                                 block_n=bn, k_splits=splits, vector=m <= packed_matmul.VECTOR_MAX_ROWS)
          per_program = -(-(rows // spec.chunk) // splits)
          variants[f"per_plane/plane{idx}"] = (fn, (xl, a["bits"], a["col_scale"]), bn, splits,
                                               [(per_program, spec.chunk, spec.n_lhs)])
        planes = packed.planes_for(parts, one_lhs=True)  # as PackedDense(kernel="fused")
        layout, fa = packed_layer.prepare([a for _, a in planes], [s.group_size for s, _ in planes], n)
        fa = [{kk: jnp.asarray(v) for kk, v in a.items()} for a in fa]
        variants["fused"] = (functools.partial(packed_layer.layer_matmul, layout=layout), (x, fa), layout.block_n,
                             layout.k_splits, [(p.chunks_per_split, p.chunk, p.n_lhs) for p in layout.planes])
        if m <= packed_matmul.VECTOR_MAX_ROWS:  # with the column tile PackedDense(activations="int8") uses
          layout8, fa8 = packed_layer.prepare([a for _, a in planes], [s.group_size for s, _ in planes], n,
                                              block_n=packed_layer.INT8_BLOCK_N)
          fa8 = [{kk: jnp.asarray(v) for kk, v in a.items()} for a in fa8]
          variants["fused_int8"] = (functools.partial(packed_layer.layer_matmul, layout=layout8, activations="int8"),
                                    (x, fa8), layout8.block_n, layout8.k_splits,
                                    [(p.chunks_per_split, p.chunk, p.n_lhs) for p in layout8.planes])
        for vname, (fn, fargs, bn, splits, trips) in variants.items():
          warps = 4
          sass = compile_sass(triton_ir(fn, *fargs), warps)
          bodies = loops(sass)
          programs = -(-n // bn) * splits
          # loops with one trip are unrolled by the compiler: pair the loop bodies found with
          # the planes that loop
          looping = [t for t in trips if t[0] > 1]
          detail = [dict(body=b, popc=pc, trips=t, chunk=c, n_lhs=l, instr_per_weight_lhs=b * warps * 32 / (c * bn * l))
                    for (b, pc), (t, c, l) in zip(bodies, looping)]
          # dynamic count per warp: straight-line code (prologue, unrolled planes, epilogue)
          # once, each loop body `trips` times
          instr = _instructions(sass.splitlines())
          per_warp = len(instr) + sum(d["body"] * (d["trips"] - 1) for d in detail)
          popc_per_warp = sum("POPC" in ln for ln in instr) + sum(d["popc"] * (d["trips"] - 1) for d in detail)
          warp_instr = per_warp * programs * warps
          weights = k * n
          entry = dict(K=k, N=n, M=m, layer=name, kernel=vname, block_n=bn, k_splits=splits, num_warps=warps,
                       loops=detail, unmatched_loops=len(bodies) != len(looping), sass_instructions=len(instr),
                       dynamic_warp_instructions=warp_instr, instr_per_weight=warp_instr * 32 / weights,
                       issue_bound_us=1e6 * warp_instr / H200_WARP_ISSUE_PER_S,
                       popc_bound_us=1e6 * popc_per_warp * programs * warps * 32 / H200_POPC_PER_S)
          results.append(entry)
          print(f"{m:>2}x{k}x{n} {name:15s} {vname:16s} bn {bn:3d} splits {splits}: "
                f"{entry['instr_per_weight']:.2f} instr/weight, issue bound {entry['issue_bound_us']:.2f} us"
                + (f", POPC bound {entry['popc_bound_us']:.2f} us" if entry["popc_bound_us"] else ""), flush=True)
  with open(args.out, "w") as f:
    json.dump({"target": "sm_90 (triton package " + sys.modules["triton"].__version__ + ")",
               "issue_rate_warp_instr_per_s": H200_WARP_ISSUE_PER_S, "popc_per_s": H200_POPC_PER_S,
               "rows": results}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
