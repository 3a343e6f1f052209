"""The import graph is the map in ARCHITECTURE.md: a pure core, layers that only import downwards, no cycles.

Read from the source with ``ast``, so every import counts: module level, inside
functions, and under ``if TYPE_CHECKING:`` (a type a module names is still a
dependency a reader follows).
"""

from __future__ import annotations

import ast
from pathlib import Path

import scratchd

PACKAGE = Path(scratchd.__file__).parent

# Lowest first. A module may import from its own layer and the layers below it.
LAYERS: list[tuple[str, set[str]]] = [
    (
        "core",
        {
            "reclaim",
            "units",
            "errors",
            "schema",
            "leases",
            "caches",
            "pools",
            "placement",
            "reclaim.policy",
            "ratelimit",
            "presets",
            "tenant",
            "csi",
            "csi.attributes",
        },
    ),
    (
        "edges",
        {
            "paths",
            "config",
            "mounts",
            "pool_dirs",
            "store",
            "offload",
            "walk",
            "scan",
            "reclaim.deleter",
            "reclaim.trash",
            "reclaim.procs",
            "reclaim.inotify",
            "reclaim.watcher",
            "sdnotify",
            "logs",
            "client",
            "csi.binds",
            "csi.proto",
            "csi.proto.csi_pb2",
            "csi.proto.csi_pb2_grpc",
        },
    ),
    ("manager", {"manager"}),
    ("daemon", {"usage", "reclaim.gc", "daemon"}),
    ("observability", {"metrics"}),
    (
        "api",
        {
            "api",
            "api.models",
            "api.identity",
            "api.errors",
            "api.routes",
            "api.hotpath",
            "api.pages",
            "api.app",
        },
    ),
    ("entry points", {"server", "cli", "completion", "__main__", "", "csi.plugin"}),
]
CORE = LAYERS[0][1]

# What the core may take from the standard library: no file, socket, process or database access.
# time gives default clocks (each one injectable) and lease ids; posixpath joins strings, like os.path;
# stat names mode bits.
CORE_STDLIB = {
    "__future__",
    "collections",
    "collections.abc",
    "dataclasses",
    "enum",
    "functools",
    "heapq",
    "itertools",
    "math",
    "posixpath",
    "re",
    "secrets",
    "stat",
    "time",
    "typing",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``name`` imports: ``scratchd.x`` as ``x``, anything else by its full dotted name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join(base + ([node.module] if node.module else []))
                module = f"scratchd.{module}" if module else "scratchd"
            else:
                module = node.module or ""
            # `from scratchd import units` imports the module units; `from scratchd.units import x`, units.
            found.update(_submodule(module, alias.name) for alias in node.names)
    return {_local(module) for module in found}


def _local(module: str) -> str:
    """The package's own modules by their names in ``MODULES`` (the package itself is ``""``)."""
    if module == "scratchd":
        return ""
    return module.removeprefix("scratchd.")


def _submodule(module: str, name: str) -> str:
    dotted = f"{module}.{name}"
    return dotted if dotted.removeprefix("scratchd.") in MODULES else module


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path, name) - {name} for name, path in MODULES.items()}
OWN = {name: {m for m in imports if m in MODULES} for name, imports in GRAPH.items()}


def test_every_module_has_a_layer():
    placed = set().union(*(modules for _, modules in LAYERS))
    assert set(MODULES) - placed == set(), "put each new module in a layer here and in ARCHITECTURE.md"
    assert placed - set(MODULES) == set(), "a layer names a module that does not exist"


def test_no_import_cycles():
    cycles = []
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for other in sorted(OWN[name]):
            if state.get(other) == "open":
                cycles.append([*path[path.index(other) :], other])
            elif other not in state:
                visit(other, [*path, other])
        state[name] = "done"

    for name in sorted(OWN):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_core_does_no_io():
    leaks = [
        f"{name} imports {other}"
        for name in sorted(CORE & set(GRAPH))
        for other in sorted(GRAPH[name])
        if other not in CORE and other not in CORE_STDLIB
    ]
    assert not leaks, "\n".join(leaks)


def test_no_import_runs_up_the_layers():
    rank = {module: i for i, (_, modules) in enumerate(LAYERS) for module in modules}
    upward = sorted(
        f"{name} ({LAYERS[rank[name]][0]}) imports {other} ({LAYERS[rank[other]][0]})"
        for name, imports in OWN.items()
        for other in imports
        if other in rank and name in rank and rank[other] > rank[name]
    )
    assert not upward, "\n".join(upward)
