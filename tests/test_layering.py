"""The package's import structure: config -> data / parallel / the loss math -> model -> convert ->
train, never upwards and without a circle between modules; and megatron-core imported at module
level only by the two modules that subclass or patch its classes, so importing anything else stays
cheap (config checks, --help and the converters' argument errors answer without loading megatron)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "mmpo_megatron"

# A part of the package (a subpackage or a top-level module) and its layer: an import may only go to
# the same layer or a lower one.
LAYERS = {
    "config": 0,
    "data": 1, "parallel": 1, "pair_logprobs": 1, "logprobs": 1, "losses": 1, "signal_shield": 1, "memory": 1,
    "messages": 1,
    "model": 2,
    "convert": 3,
    "train": 4,
}
MEGATRON_AT_IMPORT = {"mmpo_megatron.parallel.cpu_shim", "mmpo_megatron.model.sdpa_attention"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_trees() -> dict[str, ast.AST]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(tree: ast.AST, module_level_only: bool = False) -> set[str]:
    """What ``tree`` imports (``from m import n`` gives m and m.n), skipping ``if TYPE_CHECKING:``
    blocks (annotations only: they never run); ``module_level_only`` skips function bodies too."""
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(block)}
    if module_level_only:
        nodes, pending = [], list(tree.body)
        while pending:  # what runs on import: module level, into if/try/with and class bodies, not functions
            node = pending.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
                pending.extend(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []))
                pending.extend(n for handler in getattr(node, "handlers", []) for n in handler.body)
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"relative import of {node.module}: the package imports absolutely"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    if module_level_only:  # importing a.b.c runs a/__init__ and a/b/__init__ first
        found |= {name.rsplit(".", depth)[0] for name in found for depth in range(1, name.count(".") + 1)}
    return found


def module_imports() -> dict[str, set[str]]:
    """Every mmpo_megatron module and the mmpo_megatron modules it imports at run time (module level
    or inside functions)."""
    trees = package_trees()
    return {name: {t for t in imported_names(tree) if t in trees and t != name} for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "mmpo_megatron"


def test_the_package_has_no_import_circle_and_imports_only_go_down():
    graph = module_imports()
    assert len(graph) > 40
    # Package __init__ files re-export their modules: an edge package -> its own module is no circle.
    edges = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the finder sees one
    for name, targets in graph.items():
        source = part_of(name)
        if source == "mmpo_megatron":
            continue
        assert source in LAYERS, f"{name}: add its part of the package to LAYERS"
        for target in targets:
            assert LAYERS[part_of(target)] <= LAYERS[source], f"{name} imports {target}, a higher layer"


def test_only_the_megatron_subclasses_import_megatron_when_loaded():
    trees = package_trees()
    at_import = {name: imported_names(tree, module_level_only=True) for name, tree in trees.items()}
    loads_megatron = {name for name, names in at_import.items() if any(n.split(".")[0] == "megatron" for n in names)}
    assert loads_megatron == MEGATRON_AT_IMPORT
    # Nor does any module load one of them when imported (directly or through other package modules).
    changed = True
    while changed:
        changed = False
        for name, names in at_import.items():
            if name not in loads_megatron and names & loads_megatron:
                loads_megatron.add(name)
                changed = True
    assert loads_megatron == MEGATRON_AT_IMPORT, sorted(loads_megatron - MEGATRON_AT_IMPORT)
