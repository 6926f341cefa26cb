"""Imports point down: every compress module imports only its own layer or lower ones, at the
top of the file, and the module graph has no cycle. The CLI, the top layer, may import a heavy
command's modules when that command runs (nothing imports the CLI, so no cycle can hide there)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "compress"

# Lowest first. A module belongs to the longest prefix listed; it may import its own layer or lower.
LAYERS = [
    ["compress", "compress.errors", "compress.heap"],
    ["compress.primitives"],
    ["compress.models.arch", "compress.models.experts", "compress.models.source", "compress.data"],
    ["compress.formats"],
    ["compress.models"],
    ["compress.runtime"],
    ["compress.export"],
    ["compress.calibrate", "compress.method"],
    [
        "compress.quant.method",
        "compress.quant.schemes",
        "compress.quant.mixed",
        "compress.prune.method",
        "compress.distill",
    ],
    ["compress.quant.methods", "compress.prune.methods"],
    ["compress.quant.table", "compress.prune.table"],
    ["compress.recipe"],
    ["compress.report", "compress.eval"],
    ["compress.stages", "compress.quant.stage", "compress.prune.stage", "compress.distill.stage"],
    ["compress.plan"],
    ["compress.api"],
    ["compress.search"],
    ["compress.cli", "compress.__main__"],
]
RANK = {prefix: i for i, names in enumerate(LAYERS) for prefix in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def rank(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in RANK:
            return RANK[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py")


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported compress module, imported at the top of the file)."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "compress":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.append((full if full in MODULES else node.module, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.split(".")[0] == "compress"]
    return out


def test_every_module_has_a_layer():
    for m in MODULES:
        rank(m)


def test_imports_point_down_and_sit_at_the_top():
    wrong = []
    for m, path in MODULES.items():
        for target, at_top in imports(path):
            if target != m and rank(target) > rank(m):
                wrong.append(f"{m} imports {target} from a higher layer")
            if not at_top and not m.startswith("compress.cli"):
                wrong.append(f"{m} imports {target} inside a function")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = {
        m: {t for t, _ in imports(p) if t in MODULES and t != m and not m.startswith(t + ".")}
        for m, p in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            assert state.get(t) != 1, "import cycle: " + " -> ".join([*trail, m, t])
            if t not in state:
                visit(t, [*trail, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
