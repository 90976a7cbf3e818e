"""The package's import graph runs one way: numerics -> providers -> models -> export -> serve -> stages.

Read from the source (ast), so a function-local import cannot hide a cycle: every import of
a `sab_jax` module counts wherever it stands, and only the listed ones may stand inside a
function.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sab_jax")

# Lowest first; a module may import modules of its own or a lower layer only.
LAYERS = [
    ("base", ("sab_jax.errors", "sab_jax.config_utils", "sab_jax.distributed", "sab_jax.sharding")),
    ("numerics", ("sab_jax.quant.core", "sab_jax.kernels")),
    ("providers", ("sab_jax.quant.providers", "sab_jax.quant.binary_dense")),
    ("models", ("sab_jax.models", "sab_jax.data", "sab_jax.eval", "sab_jax.quant.rules", "sab_jax.quant",
                "sab_jax.calib", "sab_jax.train")),
    ("export", ("sab_jax.export",)),
    ("serve", ("sab_jax.serve",)),
    ("pipeline", ("sab_jax.stages", "sab_jax.main", "sab_jax")),
]
# Imports allowed inside functions, with why.
LOCAL_OK = {
    ("sab_jax.main", "sab_jax.distributed"),  # after flag parsing (fast --help), before anything touches JAX
    ("sab_jax.main", "sab_jax.errors"),
    ("sab_jax.main", "sab_jax.stages"),
    ("sab_jax.data.datasets", "sab_jax.data.vqav2"),  # a real dataset's TFDS builder registers only when asked for
    ("sab_jax.data.datasets", "sab_jax.data.gqa"),
    ("sab_jax.data.vqav2", "sab_jax.data.vqav2"),  # `python -m` runs the file as __main__: register the builder
    ("sab_jax.data.gqa", "sab_jax.data.gqa"),
}


def _modules():
  for root, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        yield rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path


def _imports(path, module):
  """(imported sab_jax module, inside a function?) for every import in the file."""
  tree = ast.parse(open(path).read())
  out = []

  def visit(node, local):
    for child in ast.iter_child_nodes(node):
      inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, inner) for a in child.names if a.name.startswith("sab_jax"))
      elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("sab_jax"):
        for a in child.names:  # `from sab_jax.x import y` may name a submodule y
          sub = f"{child.module}.{a.name}"
          out.append((sub if os.path.exists(os.path.join(os.path.dirname(ROOT), *sub.split(".")) + ".py")
                      or os.path.isdir(os.path.join(os.path.dirname(ROOT), *sub.split("."))) else child.module,
                      inner))
      visit(child, inner)

  visit(tree, False)
  return out


def _layer(module):
  best = None
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if module == p or module.startswith(p + "."):
        if best is None or len(p) > best[1]:
          best = (i, len(p))
  assert best is not None, f"{module} is in no layer of {__file__}"
  return best[0]


MODULES = dict(_modules())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
  for imported, _ in _imports(MODULES[module], module):
    assert _layer(imported) <= _layer(module), (
        f"{module} ({LAYERS[_layer(module)][0]}) imports {imported} ({LAYERS[_layer(imported)][0]})")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_function_local_imports_to_dodge_cycles(module):
  local = [m for m, inner in _imports(MODULES[module], module) if inner and (module, m) not in LOCAL_OK]
  assert not local, f"{module} imports {local} inside a function"


def test_models_and_numerics_never_import_quantization_integration():
  for module, path in MODULES.items():
    if module.startswith(("sab_jax.models", "sab_jax.quant.core", "sab_jax.kernels")):
      bad = [m for m, _ in _imports(path, module)
             if m.startswith(("sab_jax.quant.providers", "sab_jax.quant.binary_dense", "sab_jax.export",
                              "sab_jax.serve", "sab_jax.calib"))]
      assert not bad, f"{module} imports {bad}"


def test_no_import_cycles():
  graph = {m: {i for i, _ in _imports(p, m) if i in MODULES and i != m} for m, p in MODULES.items()}
  state = {}

  def visit(m, stack):
    state[m] = "open"
    for n in graph[m]:
      if state.get(n) == "open":
        raise AssertionError(f"import cycle: {' -> '.join(stack + [m, n])}")
      if n not in state:
        visit(n, stack + [m])
    state[m] = "done"

  for m in graph:
    if m not in state:
      visit(m, [])
