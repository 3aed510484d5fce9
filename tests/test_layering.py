"""The package's import structure: config -> data / parallel / the loss math -> model -> convert ->
train, never upwards and without a circle; and megatron-core imported at module level only by the
two modules that subclass or patch its classes, so importing anything else stays cheap (config
checks, --help and the converters' argument errors answer without loading megatron)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmpo_megatron"

# A part of the package (a subpackage or a top-level module) and its layer: an import may only go to
# the same layer or a lower one.
LAYERS = {
    "config": 0,
    "data": 1, "parallel": 1, "pair_logprobs": 1, "logprobs": 1, "losses": 1, "signal_shield": 1, "memory": 1,
    "model": 2,
    "convert": 3,
    "train": 4,
}
MEGATRON_AT_IMPORT = {"mmpo_megatron.parallel.cpu_shim", "mmpo_megatron.model.sdpa_attention"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "mmpo_megatron"


def imports(tree: ast.AST, module_level_only: bool) -> set[str]:
    """Modules imported anywhere in ``tree`` (or only at module level, outside TYPE_CHECKING)."""
    found = set()
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    for node in nodes:
        if module_level_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if module_level_only and isinstance(node, (ast.If, ast.Try)):
            nodes.extend(node.body)
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def package_modules() -> dict[str, ast.AST]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_go_down_the_layers_and_form_no_circle():
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        source = part_of(name)
        if source == "mmpo_megatron":
            continue
        assert source in LAYERS, f"{name}: add its part of the package to LAYERS"
        for target in (part_of(m) for m in imports(tree, False) if m.startswith("mmpo_megatron.")):
            if target != source:
                assert LAYERS[target] <= LAYERS[source], f"{name} imports {target}, a higher layer than {source}"
                graph.setdefault(source, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        following = graph.get(start, ())
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in following)

    circles = sorted(part for part in graph if reaches(part, part, {part}))
    assert not circles, f"import circle through {circles}"


def test_only_the_megatron_subclasses_import_megatron_when_loaded():
    modules = package_modules()
    loads_megatron = {name for name, tree in modules.items()
                      if any(m.split(".")[0] == "megatron" for m in imports(tree, True))}
    assert loads_megatron == MEGATRON_AT_IMPORT
    # Nor does any module load one of them at import (directly or through another package module).
    at_import = {name: {m for m in imports(tree, True) if m in modules} for name, tree in modules.items()}
    changed = True
    while changed:
        changed = False
        for name, targets in at_import.items():
            if name not in loads_megatron and targets & loads_megatron:
                loads_megatron.add(name)
                changed = True
    assert loads_megatron == MEGATRON_AT_IMPORT, sorted(loads_megatron - MEGATRON_AT_IMPORT)
