"""The package's imports run one way: no module imports, at its top or inside a function, a module that imports it
back (docs/architecture.md). A cycle is how a low module (the schema, the family protocol) starts to depend on the
checks or formats built on it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pti_plugin"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it (a name imported from a package that is itself
    a module counts as that module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        trail.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    # a package's __init__ re-exporting its modules is how a package shows its face, not a dependency of theirs
    graph = {_module_name(p): {m for m in _imports(p, modules) if not _module_name(p).startswith(m + ".")}
             for p in files}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_a_cycle_is_found():
    """The search itself, on a known graph (a -> b -> c -> a, d apart)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# ----------------------------------------------------------------------------- packages
#: Module imports left out of the package check, each with why (docs/architecture.md, "Imports run one way"). None
#: now: the research protocol, which trains the research bench's own LoRA variants, is its own package above the
#: sweeps and the toy world (``pti_plugin.protocol``), so the bench can score its runs with the world's scorer.
PACKAGE_CYCLE_EXCEPTIONS: dict[tuple[str, str], str] = {}

#: Module imports left out of the check of cycles through top-level modules (below), each with why.
TOP_LEVEL_CYCLE_EXCEPTIONS = {
    ("pti_plugin.embedded_default", "pti_plugin.toy_world.world"):
        "`@embedded`'s dataset is the toy world's character set, written on first use (inside default_dataset_dir), "
        "while the world's run scorer measures through metrics/, whose run loader resolves `@embedded` through "
        "embedded_default; that the world reaches nothing above it is checked on its own "
        "(test_the_world_is_below_the_sweeps_the_protocol_and_training)",
}


def _part(module: str) -> str:
    """The part of the package ``module`` belongs to: its subpackage (``pti_plugin.models``) or itself (a top-level
    module such as ``pti_plugin.hooks``)."""
    return ".".join(module.split(".")[:2])


def _module_imports() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _parts_graph(imports: dict[str, set[str]], left_out=()) -> dict[str, set[str]]:
    """part -> the other parts its modules import (anywhere in them), but for the ``left_out`` module imports."""
    graph: dict[str, set[str]] = {}
    for module, targets in imports.items():
        if module == PACKAGE.name:
            continue
        graph.setdefault(_part(module), set()).update(
            _part(t) for t in targets if t != PACKAGE.name and (module, t) not in left_out and _part(t) != _part(module))
    return graph


def _package_cycles(graph: dict[str, set[str]]) -> list[str]:
    """A cycle among the subpackages, and each subpackage and top-level module that import each other."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    packages = {f"{PACKAGE.name}.{name}" for name in packages}
    among = {a: graph.get(a, set()) & packages for a in packages}
    found = []
    while cycle := _cycle(among):  # each one, its first edge taken away to look for the next
        found.append(" -> ".join(cycle))
        among[cycle[0]] = among[cycle[0]] - {cycle[1]}
    return found + [f"{a} <-> {b}" for a in sorted(packages) for b in sorted(graph.get(a, set()) - packages)
                    if a in graph.get(b, set())]


def _culprits(imports: dict[str, set[str]], cycle: str) -> list[str]:
    """The module imports that make the package cycle ``cycle`` (its parts in order, ``->`` or ``<->``)."""
    parts = cycle.replace("<->", "->").split(" -> ")
    steps = list(zip(parts, parts[1:])) + ([(parts[1], parts[0])] if "<->" in cycle else [])
    return [f"{m} imports {t}" for a, b in steps for m, targets in sorted(imports.items()) for t in sorted(targets)
            if _part(m) == a and _part(t) == b]


def test_no_subpackage_imports_one_that_imports_it_back():
    """Between the package's parts the imports run one way too: no cycle among its subpackages (``models``,
    ``formats``, ``plugins``, ``sweeps``, ``toy_world``, ``protocol`` ...), and no subpackage and top-level module
    (``hooks``, ``embedded_default`` ...) that import each other, at the top of a module or inside a function; but for
    the listed exceptions, each still an import (a stale one is named)."""
    imports = _module_imports()
    cycles = _package_cycles(_parts_graph(imports, PACKAGE_CYCLE_EXCEPTIONS))
    assert not cycles, "\n".join(f"{c}: {'; '.join(_culprits(imports, c))}" for c in cycles)
    stale = [f"{m} -> {t}" for m, t in PACKAGE_CYCLE_EXCEPTIONS if t not in imports.get(m, set())]
    assert not stale, f"listed as exceptions but no longer imports: {stale}"


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every part ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), set()) - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_cycle_through_top_level_modules():
    """The parts' imports as one graph, top-level modules as parts of their own: no cycle among them, so none between
    subpackages that runs through top-level modules either (``toy_world -> cli -> trainer -> embedded_default ->
    toy_world`` was one, while the protocol lived in the toy world); but for the listed exceptions, each still an
    import."""
    imports = _module_imports()
    cycle = _cycle(_parts_graph(imports, TOP_LEVEL_CYCLE_EXCEPTIONS))
    assert cycle is None, f"{' -> '.join(cycle)}: {'; '.join(_culprits(imports, ' -> '.join(cycle)))}"
    stale = [f"{m} -> {t}" for m, t in TOP_LEVEL_CYCLE_EXCEPTIONS if t not in imports.get(m, set())]
    assert not stale, f"listed as exceptions but no longer imports: {stale}"


def test_the_world_is_below_the_sweeps_the_protocol_and_training():
    """The toy world (its world, detectors, recipe, weights and run scorer) imports nothing from the sweeps, the
    research protocol, the command line or the trainer, directly or through any other part, with no exception; and
    nothing in the package imports the protocol, the top of it."""
    imports = _module_imports()
    above = {f"{PACKAGE.name}.{name}" for name in ("sweeps", "protocol", "cli", "trainer")}
    reached = _reach(_parts_graph(imports), f"{PACKAGE.name}.toy_world") & above
    assert not reached, f"the toy world reaches {sorted(reached)}"
    protocol = f"{PACKAGE.name}.protocol"
    users = [f"{m} imports {t}" for m, targets in sorted(imports.items()) for t in sorted(targets)
             if _part(t) == protocol and _part(m) != protocol]
    assert not users, users


def test_a_package_cycle_is_found_through_any_of_its_modules():
    """The package check itself, on known imports: a function-level import closing a cycle counts; a module importing
    its own package's modules does not; a top-level module and a subpackage importing each other do."""
    imports = {
        "pti_plugin.models.family": {"pti_plugin.models.sd15"},
        "pti_plugin.models.sd15": {"pti_plugin.formats.kohya_lora"},
        "pti_plugin.formats.kohya_lora": {"pti_plugin.models.family"},
        "pti_plugin.hooks": {"pti_plugin.plugins"},
        "pti_plugin.plugins.pivot_norm": {"pti_plugin.hooks"},
    }
    cycles = _package_cycles(_parts_graph(imports))
    assert "pti_plugin.formats -> pti_plugin.models -> pti_plugin.formats" in cycles
    assert "pti_plugin.plugins <-> pti_plugin.hooks" in cycles
    assert _culprits(imports, "pti_plugin.plugins <-> pti_plugin.hooks") == [
        "pti_plugin.plugins.pivot_norm imports pti_plugin.hooks", "pti_plugin.hooks imports pti_plugin.plugins"]
    left_out = {("pti_plugin.hooks", "pti_plugin.plugins"), ("pti_plugin.models.sd15", "pti_plugin.formats.kohya_lora")}
    assert _package_cycles(_parts_graph(imports, left_out)) == []


def test_a_cycle_through_top_level_modules_is_found():
    """The checks above on known imports: the cycle the protocol made while it lived in the toy world, between one
    subpackage and itself through three top-level modules, which the package check does not see."""
    imports = {
        "pti_plugin.toy_world.premise": {"pti_plugin.cli"},
        "pti_plugin.cli": {"pti_plugin.trainer"},
        "pti_plugin.trainer": {"pti_plugin.embedded_default"},
        "pti_plugin.embedded_default": {"pti_plugin.toy_world.world"},
        "pti_plugin.toy_world.world": set(),
    }
    assert not [c for c in _package_cycles(_parts_graph(imports)) if "toy_world" in c]
    cycle = " -> ".join(_cycle(_parts_graph(imports)))
    assert cycle == "pti_plugin.cli -> pti_plugin.trainer -> pti_plugin.embedded_default -> pti_plugin.toy_world -> " \
                    "pti_plugin.cli"
    assert _culprits(imports, cycle)[-1] == "pti_plugin.toy_world.premise imports pti_plugin.cli"
    assert "pti_plugin.cli" in _reach(_parts_graph(imports), "pti_plugin.toy_world")
