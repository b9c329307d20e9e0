"""The package's shape: no import cycles (imports inside functions counted), the layers of the
architecture map import only downwards, and every module and test module says what it is for.

The import graph is read from the source with ``ast`` (nothing is imported), so a cycle hidden
behind an import inside a function is found as surely as one at module level.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
# folder -> the package name it installs as (pyproject's package-dir)
FOLDERS = {"qcompiler": "qcompiler", "passes": "qcompiler.passes", "lowering": "qcompiler.lowering",
           "runtimes": "qcompiler.runtimes"}
# what a layer must never import: passes know nothing of targets, lowerings never re-derive scales
# (no calibration or algorithm code), and the compiler proper never reads the bundled models
FORBIDDEN = {
    "qcompiler.passes": ("qcompiler.lowering", "qcompiler.runtimes", "qcompiler.api", "qcompiler.algorithms",
                         "qcompiler.deploy"),
    "qcompiler.lowering": ("qcompiler.passes", "qcompiler.calibration", "qcompiler.algorithms", "qcompiler.api",
                           "qcompiler.deploy"),
    "qcompiler.runtimes": ("qcompiler.passes", "qcompiler.lowering", "qcompiler.calibration",
                           "qcompiler.algorithms", "qcompiler.api", "qcompiler.deploy"),
    "qcompiler.ir": ("qcompiler.passes", "qcompiler.lowering", "qcompiler.runtimes", "qcompiler.calibration",
                     "qcompiler.algorithms", "qcompiler.api", "qcompiler.deploy"),
    # a scheme is numerics and graph emission: the IR below it, nothing that runs or calibrates
    "qcompiler.schemes": ("qcompiler.passes", "qcompiler.lowering", "qcompiler.runtimes", "qcompiler.calibration",
                          "qcompiler.algorithms", "qcompiler.api", "qcompiler.deploy", "qcompiler.recipes"),
    # training stands on the schemes' numerics and the quantization state; it never compiles or lowers
    "qcompiler.qat": ("qcompiler.passes", "qcompiler.lowering", "qcompiler.runtimes", "qcompiler.api",
                      "qcompiler.deploy"),
    # torch's private names, wrapped: it stands on torch alone
    "qcompiler.torch_compat": ("qcompiler",),
}
COMPILER = ("qcompiler.passes", "qcompiler.lowering", "qcompiler.runtimes", "qcompiler.ir", "qcompiler.calibration",
            "qcompiler.algorithms", "qcompiler.deploy", "qcompiler.api.backend", "qcompiler.api.calibrate",
            "qcompiler.api.explain", "qcompiler.api.options", "qcompiler.recipes", "qcompiler.recipe_specs",
            "qcompiler.schemes", "qcompiler.torch_compat")


def _modules() -> dict:
    mods = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set:
    """The package's modules that ``name`` imports anywhere in its source (``from a import b``
    counts as importing module ``a.b`` when that is a module, else ``a``)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert len(MODULES) > 40 and GRAPH["qcompiler.api.backend"] >= {"qcompiler.passes.pipeline",
                                                                     "qcompiler.torch_compat"}
    assert GRAPH["qcompiler.recipes"] >= {"qcompiler.recipe_specs", "qcompiler.schemes.registry"}


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_downwards(layer):
    bad = sorted((m, t) for m, targets in GRAPH.items() if m == layer or m.startswith(layer + ".")
                 for t in targets if any(t == f or t.startswith(f + ".") for f in FORBIDDEN[layer]))
    assert bad == []


@pytest.mark.parametrize("package", ["qcompiler.bundled", "qcompiler.qat"])
def test_the_compiler_never_imports_the_bundled_models_or_training(package):
    bad = sorted((m, t) for m, targets in GRAPH.items() if m.startswith(COMPILER)
                 for t in targets if t.startswith(package))
    assert bad == []


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(ROOT)) for p in MODULES.values() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []


def test_every_test_module_says_what_it_guards():
    paths = sorted((ROOT / "tests").rglob("*.py"))
    missing = [str(p.relative_to(ROOT)) for p in paths if not ast.get_docstring(ast.parse(p.read_text()))]
    assert len(paths) > 20 and missing == []
