"""The package has no import circles, counting imports inside functions (DESIGN.md: lazy imports are for heavy
optional dependencies, never to dodge a circle), and no submodule imports the root package ``peftfx``.

The import graph is computed from the source with ``ast`` — nothing is imported. Every ``.py`` file under the
package is a module (a package's ``__init__.py`` is the module ``pkg.sub``). Every ``import`` / ``from … import``
anywhere in a file counts — module level, in functions, classes, ``try`` blocks — except inside an
``if TYPE_CHECKING:`` block (never executed). Resolution:

* ``import pkg.a.b`` → ``pkg.a.b``; ``from pkg.a import b`` / ``from .a import b`` / ``from . import b`` →
  ``pkg.a.b`` when that is a module (file or package), else ``pkg.a`` (``b`` is a name defined there);
  relative imports are resolved against the importing module's package. ``X`` in ``from X import …`` /
  ``import X`` must be a module (or a namespace folder): when no such file exists the import is broken (a
  module renamed, its importers not updated) and is reported by its own test rather than guessed at.
* ``importlib.import_module("pkg.x")`` with a literal string (or a literal relative name with ``package=`` the
  literal package or ``__name__``/``__package__``) counts too. A computed name whose known prefix is a package
  and a dot — discovery, ``import_module(f"{__name__}.{name}")`` over ``pkgutil.iter_modules`` — counts as
  importing every direct submodule of that package (the filter on names is not read; this may over-count).
  Other computed names (a user's model factory in the CLI) cannot be resolved and are skipped.
* Importing ``pkg.a.b`` also runs ``pkg.a`` (its ``__init__``), so the importer gets an edge to every parent
  package of the target too — except parents that are the importer's own ancestors: those are already being
  initialised when the importer runs, which Python cannot avoid and which is no circle. A *direct* import of an
  ancestor (``from . import register`` in ``pkg/methods/lora.py``, ``import pkg`` in a submodule) is an edge
  like any other, so ``methods/__init__`` importing ``methods.lora`` while ``methods.lora`` imports from
  ``methods/__init__`` is reported, and so is any submodule that imports the root package.
"""
from __future__ import annotations

import ast
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent / "peftfx"
MAX_CYCLES = 200      # simple cycles listed in a failure message (a dense tangle can have very many)


# ------------------------------------------------------------------------------------------------ analyser
@dataclass(frozen=True)
class Import:
    """One edge occurrence: ``src`` imports ``dst`` at ``file:line`` (``via``: the module actually named,
    when the edge is the implicit import of a parent package)."""

    src: str
    dst: str
    file: str
    line: int
    via: str | None = None

    def where(self) -> str:
        return f"{self.file}:{self.line}" + (f" (parent package of {self.via})" if self.via else "")


def discover_modules(pkg_dir: Path) -> dict[str, Path]:
    """Module name → file, for every ``.py`` under ``pkg_dir`` (``__init__.py`` names the package itself)."""
    pkg_dir = Path(pkg_dir)
    root = pkg_dir.name
    out: dict[str, Path] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        rel = path.relative_to(pkg_dir).with_suffix("")
        parts = [root, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(not p.isidentifier() for p in parts):      # e.g. a stray folder with a dash: not importable
            continue
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


class _Collector(ast.NodeVisitor):
    """Raw imports of one file as (absolute dotted target or None, names imported, line)."""

    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, tuple[str, ...], int]] = []

    def _relative_base(self, level: int, module: str | None) -> str | None:
        parts = self.package.split(".") if self.package else []
        if level - 1 > len(parts) - 1:          # beyond the top-level package
            return None
        base = parts[: len(parts) - (level - 1)]
        if module:
            base += module.split(".")
        return ".".join(base)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:             # the else branch of `if TYPE_CHECKING:` does run
                self.visit(stmt)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((alias.name, (), node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._relative_base(node.level, node.module) if node.level else node.module
        if base is not None:
            self.found.append((base, tuple(a.name for a in node.names), node.lineno))

    def _static_prefix(self, e: ast.expr) -> tuple[str, bool]:
        """(the leading text of a string expression that is known statically, whether that is all of it):
        literals, ``__name__`` / ``__package__``, f-strings and ``+`` of those."""
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value, True
        if isinstance(e, ast.Name) and e.id in ("__name__", "__package__"):
            return (self.module if e.id == "__name__" else self.package), True
        if isinstance(e, ast.FormattedValue) and e.conversion == -1 and e.format_spec is None:
            return self._static_prefix(e.value)
        parts = e.values if isinstance(e, ast.JoinedStr) else \
            [e.left, e.right] if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add) else None
        if parts is None:
            return "", False
        text = ""
        for part in parts:
            t, whole = self._static_prefix(part)
            text += t
            if not whole:
                return text, False
        return text, True

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if fname == "import_module" and node.args:
            prefix, whole = self._static_prefix(node.args[0])
            if not whole and prefix.endswith(".") and not prefix.startswith("."):
                # f"{__name__}.{name}": some submodule of that package, decided at run time (discovery) —
                # count it as importing every submodule of the package
                self.found.append((prefix[:-1], ("*any*",), node.lineno))
        if fname == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = node.args[0].value
            if name.startswith("."):
                pkg = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "package"), None)
                if isinstance(pkg, ast.Constant) and isinstance(pkg.value, str):
                    anchor = pkg.value
                elif isinstance(pkg, ast.Name) and pkg.id in ("__name__", "__package__"):
                    anchor = self.module if pkg.id == "__name__" else self.package
                else:
                    anchor = None
                if anchor is not None:
                    level = len(name) - len(name.lstrip("."))
                    parts = anchor.split(".")
                    if level - 1 <= len(parts) - 1:
                        rest = name.lstrip(".")
                        base = parts[: len(parts) - (level - 1)] + (rest.split(".") if rest else [])
                        self.found.append((".".join(base), (), node.lineno))
            else:
                self.found.append((name, (), node.lineno))
        self.generic_visit(node)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_namespace(name: str, pkg_dir: Path) -> bool:
    """A folder of the package without ``__init__.py`` (a namespace package: importing it runs nothing)."""
    return (pkg_dir.parent.joinpath(*name.split("."))).is_dir()


def module_imports(pkg_dir: Path) -> tuple[dict[str, Path], list[Import], list[Import]]:
    """Every import between the package's own modules, as :class:`Import` occurrences (direct and implicit),
    and the imports of in-package names that are no module (``dst``: the dotted name as written, resolved)."""
    pkg_dir = Path(pkg_dir)
    root = pkg_dir.name
    modules = discover_modules(pkg_dir)
    base_dir = pkg_dir.parent
    imports: list[Import] = []
    unresolved: list[Import] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        col = _Collector(mod, path.name == "__init__.py")
        col.visit(tree)
        rel = os.path.relpath(path, base_dir)
        own_ancestors = set(_ancestors(mod))
        for target, names, line in col.found:
            if target != root and not target.startswith(root + "."):
                continue                                         # not this package
            if target not in modules and not _is_namespace(target, pkg_dir):
                # `from X import …` / `import X` needs X to be a module: a missing file is a broken import
                # (e.g. a module renamed but its importers not updated), not an import of X's parent
                unresolved.append(Import(mod, target, rel, line))
                continue
            if names == ("*any*",):       # a computed submodule name: every direct submodule of target
                names = tuple(m.rpartition(".")[2] for m in modules if m.rpartition(".")[0] == target)
                if not names:
                    continue
            if names and names != ("*",):
                direct = {f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names}
            else:
                direct = {target}
            for dst in sorted(d for d in direct if d in modules and d != mod):
                imports.append(Import(mod, dst, rel, line))
                for parent in _ancestors(dst):                   # running dst runs its parents' __init__
                    if parent in modules and parent != mod and parent not in own_ancestors:
                        imports.append(Import(mod, parent, rel, line, via=dst))
    return modules, imports, unresolved


def import_graph(pkg_dir: Path) -> nx.DiGraph:
    """Directed graph module → module; each edge's ``imports`` lists its :class:`Import` occurrences."""
    modules, imports, unresolved = module_imports(pkg_dir)
    g = nx.DiGraph(unresolved=unresolved)
    g.add_nodes_from(modules)
    for imp in imports:
        if not g.has_edge(imp.src, imp.dst):
            g.add_edge(imp.src, imp.dst, imports=[])
        g.edges[imp.src, imp.dst]["imports"].append(imp)
    return g


def cycles(g: nx.DiGraph, limit: int = MAX_CYCLES) -> list[list[str]]:
    """Simple cycles, shortest first, each rotated to start at its smallest module name."""
    found = []
    for c in nx.simple_cycles(g):
        i = c.index(min(c))
        found.append(c[i:] + c[:i])
        if len(found) >= 20 * limit:
            break
    found.sort(key=lambda c: (len(c), c))
    return found[:limit]


def format_cycle(g: nx.DiGraph, cycle: list[str]) -> str:
    path = cycle + [cycle[0]]
    lines = [" -> ".join(path)]
    for a, b in zip(path, path[1:]):
        occ = g.edges[a, b]["imports"]
        direct = [i for i in occ if i.via is None] or occ
        lines.append(f"    {a} -> {b}: " + ", ".join(i.where() for i in direct[:4])
                     + (f" (+{len(direct) - 4} more)" if len(direct) > 4 else ""))
    return "\n".join(lines)


def cycle_report(g: nx.DiGraph) -> str:
    cs = cycles(g)
    sccs = sorted((sorted(s) for s in nx.strongly_connected_components(g) if len(s) > 1), key=len, reverse=True)
    head = [f"{len(sccs)} import tangle(s) (strongly connected components):"]
    head += [f"  {{{', '.join(s)}}}" for s in sccs]
    head.append(f"{len(cs)} simple cycle(s){' (first ' + str(MAX_CYCLES) + ')' if len(cs) >= MAX_CYCLES else ''}:")
    return "\n".join(head + [format_cycle(g, c) for c in cs])


def unresolved_imports(g: nx.DiGraph) -> list[Import]:
    return list(g.graph["unresolved"])


def root_imports(g: nx.DiGraph, root: str) -> list[Import]:
    """Direct imports of the root package by any other module of the package."""
    return [i for _, dst, d in g.in_edges(root, data=True) for i in d["imports"] if i.via is None]


# ----------------------------------------------------------------------------------------- self-test
def _write(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp / next(iter(files)).split("/")[0]


def test_analyser_finds_a_circle_through_a_function_level_import(tmp_path):
    pkg = _write(tmp_path, {
        "toy/__init__.py": "from .a import f\nfrom .meth import REGISTRY\n",
        "toy/a.py": "import os\nfrom . import b\n\ndef f():\n    return b.g()\n",
        "toy/b.py": "def g():\n    from .a import f   # lazy, still a circle\n    return f\n",
        "toy/meth/__init__.py": "REGISTRY = {}\n\ndef _load():\n    from . import lora  # noqa\n\n_load()\n",
        "toy/meth/lora.py": "from . import REGISTRY\nfrom ..c import thing\n",
        "toy/disc/__init__.py": "import importlib, pkgutil\nREG = {}\nfor m in pkgutil.iter_modules(__path__):\n"
                                "    importlib.import_module(f'{__name__}.{m.name}')  # discovery\n",
        "toy/disc/one.py": "from . import REG  # back into the package that discovers it\n",
        "toy/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\nthing = 1\n",
        "toy/d.py": "import toy\n",
        "toy/e.py": "def h():\n    from .. import toy  # noqa (relative beyond the package: ignored)\n"
                    "    from . import a  # plain edge\n    from .gone import x  # a renamed module\n",
    })
    g = import_graph(pkg)
    assert set(g.nodes) == {"toy", "toy.a", "toy.b", "toy.c", "toy.d", "toy.e", "toy.meth", "toy.meth.lora",
                            "toy.disc", "toy.disc.one"}
    found = {tuple(c) for c in cycles(g)}
    assert found == {("toy.a", "toy.b"), ("toy.meth", "toy.meth.lora"), ("toy.disc", "toy.disc.one")}, found
    assert g.edges["toy.disc", "toy.disc.one"]["imports"][0].line == 4          # the discovery import
    # type-checking imports are not edges; the implicit edge to an own ancestor (toy) is not either
    assert not g.has_edge("toy.c", "toy.a") and not g.has_edge("toy.meth.lora", "toy")
    assert g.has_edge("toy.meth.lora", "toy.meth") and g.has_edge("toy.meth.lora", "toy.c")
    assert [(i.src, i.line) for i in root_imports(g, "toy")] == [("toy.d", 1)]
    assert [(i.src, i.dst, i.line) for i in unresolved_imports(g)] == [("toy.e", "toy.gone", 4)]
    report = cycle_report(g)
    assert "toy.a -> toy.b -> toy.a" in report and "toy/b.py:2" in report and "toy/a.py:2" in report
    assert "toy.meth -> toy.meth.lora -> toy.meth" in report and "toy/meth/__init__.py:4" in report


def test_analyser_accepts_a_clean_package_and_counts_parent_packages(tmp_path):
    pkg = _write(tmp_path, {
        "tidy/__init__.py": "from .api import run\nfrom .sub.x import X\n",
        "tidy/api.py": "def run():\n    from .sub import x\n    import importlib\n"
                       "    importlib.import_module('tidy.sub.y')\n    return x\n",
        "tidy/sub/__init__.py": "'''nothing imported here'''\n",
        "tidy/sub/x.py": "from ..util import helper\nX = helper\n",
        "tidy/sub/y.py": "from tidy.util import helper as _h\n",
        "tidy/util.py": "helper = 1\n",
    })
    g = import_graph(pkg)
    assert cycles(g) == [] and root_imports(g, "tidy") == [] and unresolved_imports(g) == []
    # api → sub.x also runs sub/__init__ (an implicit edge); sub.x → sub is not added (its own package)
    assert g.has_edge("tidy.api", "tidy.sub") and g.has_edge("tidy.api", "tidy.sub.y")
    assert not g.has_edge("tidy.sub.x", "tidy.sub") and g.has_edge("tidy.sub.y", "tidy.util")
    # a circle appears as soon as the package __init__ imports a module that imports it back
    (pkg / "sub" / "__init__.py").write_text("from ..api import run\n")
    assert [tuple(c) for c in cycles(import_graph(pkg))] == [("tidy.api", "tidy.sub")]


# ----------------------------------------------------------------------------------------- the package
@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph(ROOT)


def test_package_has_no_import_cycles(graph):
    assert len(graph) > 10, f"the analyser found only {len(graph)} modules under {ROOT}"
    assert graph.number_of_edges() > 10
    cs = cycles(graph)
    assert not cs, ("import circles in peftfx (imports inside functions count; `if TYPE_CHECKING:` does not):\n"
                    + cycle_report(graph))


def test_no_submodule_imports_the_root_package(graph):
    bad = root_imports(graph, "peftfx")
    assert not bad, ("these modules import the root package `peftfx` (which imports everything), so they can only "
                     "run once `peftfx/__init__` has finished — import from the defining module instead:\n"
                     + "\n".join(f"  {i.src}: {i.where()}" for i in bad))


def test_every_import_of_the_package_names_a_module(graph):
    bad = unresolved_imports(graph)
    assert not bad, ("these imports name a module of peftfx that has no file (renamed or moved?); the cycle "
                     "check cannot see through them:\n"
                     + "\n".join(f"  {i.src} imports {i.dst}: {i.where()}" for i in bad))
