"""The package's shape, kept by tests: imports go one way through the layers (a lower layer never
imports a higher one, lazily or not), no import cycle, small modules and functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tlextract"
# Lowest first. A module may import modules of its own layer or below.
LAYERS = [
    ("errors", "store", "inputs", "locks", "screen_data"),
    ("traits",),
    ("config",),
    ("settings",),
    ("model",),
    ("ops",),
    ("engines",),
    ("judge",),
    ("stages",),
    ("evaluation",),
    ("steering", "monitoring"),
    ("report",),
    ("backends", "benchmarks", "cli"),
    ("__init__", "__main__", "plots"),
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_REASON = "# long:"  # a function over the limit says why in a comment starting with this


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"):
        p for p in PACKAGE.rglob("*.py")
    }  # fmt: skip


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return LAYER_OF[top]


def _imports(module: str, path: Path) -> set[str]:
    """tlextract modules ``module`` imports anywhere in its body (lazy imports included)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tlextract")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("tlextract"):
                found.add(base)
                # "from tlextract.ops import methods" imports a module
                found |= {f"{base}.{a.name}" for a in node.names}
    modules = _modules()
    return {m for m in found if m in modules and m != module}


def test_every_module_has_a_layer() -> None:
    for module in _modules():
        _layer(module)  # KeyError names a module no layer holds


def test_imports_never_go_up_a_layer() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, path in _modules().items()
        for target in sorted(_imports(module, path))
        if _layer(target) > _layer(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = {m: _imports(m, p) - {"tlextract"} for m, p in _modules().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_are_small() -> None:
    big = {
        m: n
        for m, p in _modules().items()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"


def test_long_functions_say_why() -> None:
    long = []
    for module, path in _modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = node.lineno - 1
                n = (node.end_lineno or node.lineno) - start
                own = lines[max(0, start - 2) : node.end_lineno]
                if n > MAX_FUNCTION_LINES and not any(LONG_REASON in x for x in own):
                    long.append(f"{module}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines without '{LONG_REASON}': {long}"


ACCEL = "tlextract.model.accel"
# What only the accelerator may do: private torch ops and hook dicts, libc, swapping classes.
ACCEL_ONLY = ("torch.ops.mkldnn", "_global_forward", "ctypes", ".__class__ =", "mallopt")


def test_the_accelerator_has_one_door() -> None:
    """Outside tlextract/model/accel/ nothing imports its modules (only the package) and nothing
    calls private torch ops or libc or swaps a class."""
    inside = [m for m in _modules() if m == ACCEL or m.startswith(ACCEL + ".")]
    assert inside, "no accelerator subpackage"
    found = []
    for module, path in _modules().items():
        if module in inside:
            continue
        private = [t for t in _imports(module, path) if t in inside and t != ACCEL]
        found += [f"{module} imports {t}" for t in private]
        text = path.read_text()
        found += [f"{module} uses {word}" for word in ACCEL_ONLY if word in text]
    assert not found, "\n".join(found)
