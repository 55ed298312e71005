"""The import contract of src/velotune, read from the source with `ast` (nothing is imported):

* layers, lowest first (LAYERS): a module imports only modules of its own layer or lower ones;
* no import cycles between modules (imports inside functions count: hiding one there is no fix);
* no module imports another module's private names (`from x import _name`).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A module belongs to the layer of its longest matching prefix ("velotune" matches only
# itself). The CLI commands
# (`*.command`) sit on top with the CLI: they drive the public API (loader) of the layers below.
LAYERS = [
    [
        "velotune.errors",
        "velotune.device",
        "velotune.distributed",
        "velotune.fsio",
        "velotune.safetensors_check",
        "velotune.model_folder",
        "velotune.fit",
        "velotune.log",
    ],
    ["velotune.kernels"],
    ["velotune.quant"],
    ["velotune.lora"],
    ["velotune.models"],
    ["velotune.memory"],
    ["velotune.data"],
    ["velotune.infer", "velotune.export"],
    # "velotune" alone: the package's __init__ (the public API)
    ["velotune", "velotune.loader", "velotune.loader_options", "velotune.trl_compat", "velotune.chat_templates"],
    ["velotune.train", "velotune.demo"],
    [
        "velotune.cli",
        "velotune.argtypes",
        "velotune.infer.command",
        "velotune.export.command",
        "velotune.train.command",
        "velotune.demo.command",
    ],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (SRC / "velotune").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every velotune import in module `name`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "velotune":
                continue
            names = [a.name for a in node.names]
            # `from package import module` imports the module itself
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            found += [(f"{target}.{n}", [], node.lineno) for n in subs]
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                found.append((target, rest, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "velotune"]
    return found


def _layer(name: str) -> int:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or (p != "velotune" and name.startswith(p + "."))) and len(p) > best:
                best, layer = len(p), i
    assert layer is not None, f"{name} is in no layer of tests/test_layering.py"
    return layer


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_a_higher_layer():
    bad = [
        f"{name}:{line} imports {target} (layer {_layer(target)} > {_layer(name)})"
        for name in MODULES
        for target, _, line in _imports(name)
        if _layer(target) > _layer(name)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in _imports(name) if t in MODULES and t != name} for name in MODULES}
    # a package's __init__ is imported with any of its submodules, but only what it imports itself counts
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_imported_from_another_module():
    bad = [
        f"{name}:{line} imports {n} from {target}"
        for name in MODULES
        for target, names, line in _imports(name)
        if target != name
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not bad, "\n".join(bad)
