"""The house keeps its plan: packages by role, imports only downward, no cycles, small
modules. Read from the source with ``ast`` (imports inside functions count too), so a
lazy import cannot hide an upward arrow."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "meddx"
MAX_LINES = 500

# What each part of meddx may import besides itself. The top-level modules are shared
# vocabulary (errors, names, secrets, configs); each package says the same in its
# docstring.
BASE = {"meddx", "meddx.names"}
ALLOWED = {
    "meddx": set(),
    "meddx.names": {"meddx"},
    "meddx.secret": {"meddx"},
    "meddx.imaging": BASE,
    "meddx.inputs": BASE | {"meddx.secret", "meddx.imaging"},
    "meddx.config": BASE | {"meddx.secret", "meddx.inputs"},
    "meddx.store": BASE | {"meddx.inputs", "meddx.imaging"},
    "meddx.model": BASE | {"meddx.secret", "meddx.config", "meddx.inputs", "meddx.imaging"},
    "meddx.synthetic": BASE | {"meddx.config", "meddx.inputs", "meddx.imaging"},
    "meddx.analysis": BASE
    | {"meddx.config", "meddx.inputs", "meddx.imaging", "meddx.model", "meddx.store"},
    "meddx.pacs": BASE
    | {
        "meddx.secret",
        "meddx.config",
        "meddx.inputs",
        "meddx.imaging",
        "meddx.model",
        "meddx.store",
        "meddx.analysis",
    },
}
ABOVE_ALL = {"meddx.pipelines", "meddx.cli", "meddx.__main__"}


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The meddx modules ``path`` imports (a name imported from a package counts as its
    submodule when it is one)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "meddx"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if base.split(".")[0] != "meddx":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    out.discard(name)
    return out


def part_of(module: str) -> str:
    """The package (or top-level module) a module belongs to."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, name, set(found)) for name, path in found.items()}


def test_each_part_imports_only_what_lies_below_it():
    wrong = []
    for module, targets in graph().items():
        part = part_of(module)
        if part in ABOVE_ALL:
            if part != "meddx.cli" and part != "meddx.__main__":
                wrong += [f"{module} -> {t}" for t in targets if part_of(t) == "meddx.cli"]
            continue
        assert part in ALLOWED, f"{part} is not placed in the plan (tests/test_layout.py)"
        allowed = ALLOWED[part] | {part}
        wrong += [f"{module} -> {t}" for t in targets if part_of(t) not in allowed]
    assert not wrong, "imports that run upward or sideways:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt in edges and not state.get(nxt):
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if not state.get(start):
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_over_the_limit():
    long = {
        str(p.relative_to(ROOT.parent)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize(
    "package", sorted(p.parent.name for p in ROOT.glob("*/__init__.py")), ids=str
)
def test_each_package_says_what_it_is_for_and_what_it_must_not_import(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and len(doc.split()) >= 20, f"meddx/{package} has no docstring"
    assert "must not import" in " ".join(doc.split()), doc
