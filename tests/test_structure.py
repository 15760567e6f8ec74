"""The package's import structure, read with ``ast`` (nothing of the package is imported): no import cycle between
``instructjax`` modules, and every import of an ``instructjax`` module at the top of its file, where a reader sees
it (an import inside a function hides a cycle until the function runs).

Every ``.py`` file under ``instructjax/`` is a module (``foo.py`` and ``foo/__init__.py`` are both
``instructjax.foo``; where both exist, as while a module becomes a package, Python imports the package). Every
import of an ``instructjax`` module counts, at the top of a file or inside a function: ``import instructjax.x``,
``from instructjax import x`` (the submodule ``x`` if there is one, else a name of ``instructjax/__init__.py``),
``from instructjax.x import name`` and their relative forms. Importing a module also runs the ``__init__`` of
every package above it: that is an edge too, unless the importer is inside that package (a package's
``__init__`` that re-exports its own submodules is no cycle).
"""

import ast
import dataclasses
import importlib
import pathlib
import types
from collections import deque
from collections.abc import Iterable, Mapping

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO / "instructjax"


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's edge: ``importer`` loads ``target`` (both dotted module names)."""

    importer: str
    target: str
    path: pathlib.Path
    line: int
    statement: str
    scope: str | None  # "def f" / "class C" when not at the top of the file

    def where(self, root: pathlib.Path) -> str:
        inside = f" (inside {self.scope})" if self.scope else ""
        return f"{_relative(self.path, root)}:{self.line}{inside}: {self.statement}"


def _relative(path: pathlib.Path, root: pathlib.Path) -> str:
    return path.relative_to(root.parent).as_posix()


def module_files(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> its file, for every module and package under ``package_dir``."""
    out: dict[str, pathlib.Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if not all(p.isidentifier() for p in parts):
            continue  # not importable (e.g. a scratch file named with a dash)
        is_init = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_init else parts)
        if name not in out or is_init:  # a package beats a module of the same name
            out[name] = path
    return out


def _longest_module(name: str, modules: Mapping[str, pathlib.Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is a module of the package (None: not the package's)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


class _ImportCollector(ast.NodeVisitor):
    """Every import statement of one file, with the innermost function or class around it."""

    def __init__(self):
        self.found: list[tuple[ast.Import | ast.ImportFrom, str | None]] = []
        self._scopes: list[str] = []

    def _scoped(self, node, label):
        self._scopes.append(label)
        self.generic_visit(node)
        self._scopes.pop()

    def visit_FunctionDef(self, node):
        self._scoped(node, f"def {node.name}")

    def visit_AsyncFunctionDef(self, node):
        self._scoped(node, f"async def {node.name}")

    def visit_ClassDef(self, node):
        self._scoped(node, f"class {node.name}")

    def visit_Import(self, node):
        self.found.append((node, self._scopes[-1] if self._scopes else None))

    def visit_ImportFrom(self, node):
        self.found.append((node, self._scopes[-1] if self._scopes else None))


def collect_imports(package_dir: pathlib.Path) -> tuple[set[str], list[Import]]:
    """The package's modules and every import of one of them (one ``Import`` per edge a statement makes)."""
    root_name = package_dir.name
    modules = module_files(package_dir)
    edges: list[Import] = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own_package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        collector = _ImportCollector()
        collector.visit(tree)
        for node, scope in collector.found:
            targets: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if _inside(a.name, root_name)]
                targets = [t for t in (_longest_module(n, modules) for n in names) if t]
            else:
                if node.level:
                    base = own_package.split(".")
                    if node.level - 1 >= len(base):
                        raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not _inside(source, root_name):
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    target = submodule if submodule in modules else _longest_module(source, modules)
                    if target:
                        targets.append(target)
            for target in dict.fromkeys(targets):
                implied = [a for a in _ancestors(target) if a in modules and not _inside(importer, a)]
                for t in (target, *implied):
                    if t != importer:
                        edges.append(Import(importer, t, path, node.lineno, ast.unparse(node), scope))
    return set(modules), edges


def import_graph(package_dir: pathlib.Path) -> tuple[dict[str, set[str]], list[Import]]:
    """Module -> the modules it imports (every module a node), and the statements behind the edges."""
    modules, edges = collect_imports(package_dir)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        graph[e.importer].add(e.target)
    return graph, edges


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (each sorted); nodes only named as targets count too."""
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    succ = {n: sorted(set(graph.get(n, ()))) for n in nodes}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    for root in nodes:
        if root in index:
            continue
        # iterative DFS: (node, iterator over its successors)
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        work = [(root, iter(succ[root]))]
        while work:
            node, it = work[-1]
            child = next(it, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return sorted(out)


def _shortest_cycle_through(start: str, succ: Mapping[str, Iterable[str]], allowed: set[str]) -> list[str]:
    """Breadth-first: the shortest path start -> ... -> start inside ``allowed`` (ties: alphabetical)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(set(succ.get(node, ())) & allowed):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in seen:
                seen.add(child)
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Every import cycle, as ``[a, b, ..., a]``: per strongly connected component, the shortest cycle through
    each of its members (the same cycle found from two members is listed once, starting at its least node)."""
    cycles: list[list[str]] = []
    for component in strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in set(graph.get(component[0], ())):
            continue  # a single module that does not import itself
        found: dict[tuple[str, ...], list[str]] = {}
        for start in component:
            cycle = _shortest_cycle_through(start, graph, members)[:-1]
            i = cycle.index(min(cycle))
            canonical = cycle[i:] + cycle[:i]
            found.setdefault(tuple(canonical), [*canonical, canonical[0]])
        cycles.extend(found[k] for k in sorted(found))
    return cycles


def format_cycle(cycle: list[str]) -> str:
    return " -> ".join(cycle)


def _describe_cycles(cycles: list[list[str]], edges: list[Import], root: pathlib.Path) -> str:
    lines = [f"{len(cycles)} import cycle(s) between {root.name} modules:"]
    for cycle in cycles:
        lines.append(f"  {format_cycle(cycle)}")
        for a, b in zip(cycle, cycle[1:], strict=False):
            for e in edges:
                if (e.importer, e.target) == (a, b):
                    lines.append(f"      {a} -> {b}: {e.where(root)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the package


def test_no_import_cycles_between_package_modules():
    graph, edges = import_graph(PACKAGE_DIR)
    assert "instructjax.model" in graph and "instructjax.data.formats" in graph  # it read the package
    cycles = find_cycles(graph)
    assert not cycles, _describe_cycles(cycles, edges, PACKAGE_DIR)


def test_package_imports_are_at_the_top_of_their_file():
    _, edges = collect_imports(PACKAGE_DIR)
    nested = list(dict.fromkeys(e.where(PACKAGE_DIR) for e in sorted(edges, key=lambda e: (e.path, e.line)) if e.scope))
    assert not nested, (
        f"{len(nested)} import(s) of instructjax modules inside a function or class body; move each to the top "
        "of its file (a cycle it hides shows up there):\n  " + "\n  ".join(nested)
    )


# ------------------------------------------------------------------------------- the checker checks itself


def test_cycle_finder_reports_known_cycles_and_passes_acyclic_graphs():
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": [], "e": ["e"], "f": ["a"]}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert format_cycle(find_cycles(graph)[0]) == "a -> b -> c -> a"
    # two cycles through one module (the shape of evaluate -> reward -> rollout -> reward -> evaluate)
    assert find_cycles({"ev": ["rw"], "rw": ["ev", "ro"], "ro": ["rw"]}) == [["ev", "rw", "ev"], ["ro", "rw", "ro"]]
    assert find_cycles({"x": ["y", "z"], "y": ["z"], "z": [], "w": ["x"]}) == []
    assert strongly_connected({"p": ["q"], "q": ["p", "r"]}) == [["p", "q"], ["r"]]


@pytest.fixture
def fake_package(tmp_path):
    """A small package with a cycle hidden by a function-level relative import, a subpackage, and a module
    that is also a package (mid-refactor)."""
    files = {
        "__init__.py": '__version__ = "0"\n',
        "a.py": "from instructjax import __version__, b\n",
        "b.py": "import os\n\n\ndef f():\n    from . import a\n\n    return a, os\n",
        "sub/__init__.py": "from .c import X\n",
        "sub/c.py": "import instructjax.a as A\nfrom instructjax.sub import d\n\nX = 1\n",
        "sub/d.py": "from .. import b\n",
        "e.py": "import json\n\nfrom instructjax.sub.d import b\n",
        "hf.py": "from instructjax import a\n",
        "hf/__init__.py": "from instructjax import sub\n",
        "hf/load.py": "class Loader:\n    from instructjax.hf import helper\n",
        "hf/helper.py": "",
    }
    for name, text in files.items():
        path = tmp_path / "instructjax" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "instructjax"


def test_import_graph_sees_every_form_of_import(fake_package):
    graph, edges = import_graph(fake_package)
    p = "instructjax"
    assert graph == {
        p: set(),
        f"{p}.a": {f"{p}.b", p},  # a submodule and a name of __init__
        f"{p}.b": {f"{p}.a"},  # inside a function, relative
        f"{p}.sub": {f"{p}.sub.c"},
        f"{p}.sub.c": {f"{p}.a", f"{p}.sub.d"},  # its own package's __init__ is no edge
        f"{p}.sub.d": {f"{p}.b"},
        f"{p}.e": {f"{p}.sub.d", f"{p}.sub"},  # importing sub.d from outside runs sub/__init__.py
        f"{p}.hf": {f"{p}.sub"},  # the package, not the stale hf.py
        f"{p}.hf.load": {f"{p}.hf.helper"},
        f"{p}.hf.helper": set(),
    }
    cycles = find_cycles(graph)
    assert cycles == [[f"{p}.a", f"{p}.b", f"{p}.a"]]
    message = _describe_cycles(cycles, edges, fake_package)
    assert "instructjax.a -> instructjax.b -> instructjax.a" in message
    assert "instructjax/b.py:5 (inside def f): from . import a" in message
    nested = sorted(e.where(fake_package) for e in edges if e.scope)
    assert nested == [
        "instructjax/b.py:5 (inside def f): from . import a",
        "instructjax/hf/load.py:2 (inside class Loader): from instructjax.hf import helper",
    ]


# ---------------------------------------------------------------------------------------------------------------
# References that resolve: after code moves between modules, ``module.name`` must still name something.


def _module_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the ``instructjax`` module it is bound to by the file's imports (``import instructjax.x as y``,
    ``from instructjax import x``, ``from instructjax.data import x``); names that are not modules are left out
    here and skipped by the caller (it checks ``hasattr`` only on modules)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "instructjax":
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "instructjax" and alias.asname:
                    aliases[alias.asname] = alias.name
    return aliases


def test_every_module_attribute_that_code_uses_exists():
    """``stages.finished_summary`` after ``finished_summary`` moved to ``stage.py`` is an AttributeError only when
    that line runs (in a slow test, or a user's run). Every ``x.name`` in the package, scripts, benchmarks and
    tests, where ``x`` is an imported ``instructjax`` module, must name an attribute of that module."""
    files = [*PACKAGE_DIR.rglob("*.py"), *(REPO / "scripts").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    files += (REPO / "tests").glob("*.py")
    missing = []
    for path in sorted(files):
        tree = ast.parse(path.read_text(), str(path))
        modules = {}
        for local, dotted in _module_aliases(tree).items():
            try:
                module = importlib.import_module(dotted)
            except ImportError:
                continue  # a name imported from a module, not a module
            if isinstance(module, types.ModuleType):
                modules[local] = module
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                continue
            module = modules.get(node.value.id)
            if module is not None and isinstance(node.ctx, ast.Load) and not hasattr(module, node.attr):
                missing.append(f"{_relative(path, PACKAGE_DIR)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not missing, "references to names their module does not have:\n" + "\n".join(missing)
