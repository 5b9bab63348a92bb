"""The package's shape stays what docs/ARCHITECTURE.md says: one-way layers, no import cycles, short functions,
every stage declared in the chain.

Imports are read from the source (every `import`, function-local ones included; those under
`if TYPE_CHECKING:` are not run, so they do not count)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# Lowest first. A module may import its own layer and the layers below, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.errors", "pipeline.request", "pipeline.proc", "pipeline.artifacts", "pipeline.targets",
     "pipeline.runner"),
    ("pipeline.models", "pipeline.data", "pipeline.latency", "pipeline.edgetpu", "pipeline.devices", "pipeline.bench",
     "pipeline.tflite", "pipeline.power", "pipeline.remote", "pipeline.ship", "pipeline.pruning", "pipeline.convert",
     "pipeline.train", "pipeline.verification", "pipeline.quantize"),
    ("pipeline.stages",),
    ("pipeline.report", "pipeline.bundle"),
    ("pipeline.deploy", "pipeline.api"),
    ("pipeline.cli", "pipeline.__main__",
     "pipeline.baseline", "pipeline.make_calibration", "pipeline.make_photo_set",
     "pipeline.make_args"),
    ("pipeline",),  # the package itself: the public API's names (pipeline/__init__.py); only the exact name
)  # fmt: skip
MAX_FUNCTION_LINES = 80
ARGPARSE_TABLES = {("pipeline/cli.py", "build_parser")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            inside = module.startswith(name + ".") and name != "pipeline"  # the package root covers only itself
            if (module == name or inside) and name.count(".") > depth:
                best, depth = i, name.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/ARCHITECTURE.md")
    return best


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The pipeline modules `module` imports at run time (resolved to modules that exist)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from pkg import submodule` needs the submodule; `from module import name` needs the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("pipeline") and name != module:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: imports_of(m, p, set(mods)) for m, p in mods.items()}


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{m} (layer {layer_of(m)}) imports {dep} (layer {layer_of(dep)})"
        for m, deps in _graph().items()
        for dep in sorted(deps)
        if dep != "pipeline" and layer_of(dep) > layer_of(m)
    ]
    assert not upward, "\n".join(upward)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = {m: {d for d in deps if d != "pipeline"} for m, deps in _graph().items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_request_imports_nothing_of_the_pipeline_at_run_time() -> None:
    mods = _modules()
    assert imports_of("pipeline.request", mods["pipeline.request"], set(mods)) == set()


def test_no_function_is_longer_than_the_bound() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in ARGPARSE_TABLES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_every_stage_module_declares_a_stage_in_the_chain() -> None:
    from pipeline.stages import CHAIN

    names = [s.name for s in CHAIN]
    assert len(names) == len(set(names))
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "base"}
    assert modules == set(names)
    doc = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert " -> ".join(names) in doc.replace("\n", " ")


@pytest.mark.parametrize("module", ["pipeline.deploy", "pipeline.cli", "pipeline.report.summary"])
def test_layer_table_covers_the_entry_points(module: str) -> None:
    assert layer_of(module) >= layer_of("pipeline.stages")


def test_layers_are_disjoint() -> None:
    seen: dict[str, int] = defaultdict(int)
    for names in LAYERS:
        for name in names:
            seen[name] += 1
    assert [n for n, c in seen.items() if c > 1] == []


def test_a_function_local_upward_import_is_seen(tmp_path: Path) -> None:
    src = tmp_path / "probe.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.cli import main\n"
        "def f():\n    from pipeline.deploy import deploy\n    from pipeline.report import figures\n"
    )
    known = set(_modules())
    found = imports_of("pipeline.models.probe", src, known)
    assert found == {"pipeline.deploy", "pipeline.report.figures"}  # the TYPE_CHECKING one does not count
    assert any(layer_of(d) > layer_of("pipeline.models.probe") for d in found)
