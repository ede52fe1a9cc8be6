"""The package's shape, as a spec: imports flow one way and functions stay short.

Layers, lowest first; a module may import from its own layer or below, never above:
    model < checkpoints, decoding, partitioning, hosts, flops, hardware, storage, faults, platforms
          < trainer, fused_update, losses, optimizers, progress, data, distill, metrics, bench, gin, api
          < experiment < commands, cli, configurables
Every import counts, including those inside functions (the commands keep heavy imports inside
`run` so `doa --help` stays fast, which hides nothing from this walk).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "doa_jax"

LAYERS = [
    ["doa_jax.model"],
    ["doa_jax.checkpoints", "doa_jax.decoding", "doa_jax.partitioning", "doa_jax.hosts", "doa_jax.flops",
     "doa_jax.hardware", "doa_jax.storage", "doa_jax.faults", "doa_jax.platforms"],
    ["doa_jax.trainer", "doa_jax.fused_update", "doa_jax.losses", "doa_jax.optimizers", "doa_jax.progress", "doa_jax.data",
     "doa_jax.distill", "doa_jax.metrics", "doa_jax.bench", "doa_jax.gin_flags", "doa_jax.gin_utils",
     "doa_jax.api"],
    ["doa_jax.experiment"],
    ["doa_jax.commands", "doa_jax.cli", "doa_jax.configurables", "doa_jax.__main__", "doa_jax"],
]
MAX_FUNCTION_LINES = 80


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            nested = prefix != "doa_jax" and module.startswith(prefix + ".")  # the root counts alone
            if (module == prefix or nested) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it to LAYERS")
    return rank


def resolve(name: str) -> str:
    """The project module an import names (an imported attribute resolves to its module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def project_imports(module: str) -> set[tuple[str, int]]:
    """(imported project module, line) for every import in `module`, top-level or nested."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if name.startswith("doa_jax"):
                target = resolve(name)
                if target and target != module:
                    found.add((target, node.lineno))
    return found


GRAPH = {m: project_imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_reaches_up_a_layer():
    upward = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {t} "
              f"(layer {layer_of(t)} > {layer_of(m)})"
              for m, targets in GRAPH.items() for t, line in sorted(targets) if layer_of(t) > layer_of(m)
              and not t == "doa_jax"]
    assert not upward, "imports from a lower layer into a higher one:\n" + "\n".join(upward)


def _cycles() -> list[list[str]]:
    edges = {m: sorted({t for t, _ in targets if t != "doa_jax"}) for m, targets in GRAPH.items()}
    edges = {m: [t for t in ts if not m.startswith(t + ".")] for m, ts in edges.items()}  # a package's own parents
    cycles, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_imports_inside_functions():
    # `doa run` imports the experiment inside `run` (fast --help); the walk still sees the edge.
    assert "doa_jax.configurables" in {t for t, _ in GRAPH["doa_jax.commands.run"]}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_functions_are_at_most_80_lines(module):
    tree = ast.parse(MODULES[module].read_text())
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{MODULES[module].relative_to(PACKAGE.parent)}: functions over {MAX_FUNCTION_LINES} lines: {long}"
