"""The package's modules import one another without a circle, so each can be read (and imported) on its own.

The graph is read from the source with ``ast``, nothing is imported. It holds every ``import`` and ``from ... import``
of a ``recbole_mllm`` module, relative ones resolved, and ``importlib.import_module("recbole_mllm...")`` with a
literal name; imports inside functions count too: deferring an import hides a circle from Python, not from a reader.
``from package import name`` is an edge to the submodule ``package.name`` where one exists, else to the package. The
package ``__init__`` files that Python runs on the way to a submodule are no edges (a package importing its own
submodules is no circle).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "recbole_mllm"


def module_files(package: Path = PACKAGE) -> dict:
    """``{dotted module name: (file, is a package)}`` of every ``.py`` file below ``package``."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _known(name: str, modules) -> str:
    """``name``, or its nearest enclosing module (``pkg.mod.attr`` -> ``pkg.mod``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def imported_modules(tree: ast.AST, module: str, is_package: bool, modules) -> set:
    """The package's modules that ``tree`` (the source of ``module``) imports, anywhere in it."""
    root = PACKAGE.name
    here = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_known(alias.name, modules) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = here
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            source = ".".join(filter(None, [base, node.module])) if node.level else node.module or ""
            if source.split(".")[0] == root:
                found |= {f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else _known(source, modules)
                          for alias in node.names}
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(_known(node.args[0].value, modules))
    return {name for name in found if name and name.split(".")[0] == root} - {module}


def import_graph(package: Path = PACKAGE) -> dict:
    """``{module: set of the package's modules it imports}``."""
    modules = module_files(package)
    return {name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, is_package, modules)
            for name, (path, is_package) in modules.items()}


def find_cycle(graph: dict):
    """One circle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, modules in name order)."""
    state, path = {}, []  # state: 1 while on the current path, 2 when finished

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walk_reads_the_package():
    graph = import_graph()
    assert len(graph) > 50 and "recbole_mllm.config_check" in graph["recbole_mllm.config"]
    assert "recbole_mllm.trainer" in graph["recbole_mllm.utils"]  # an import inside a function counts


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found_and_named(tmp_path):
    package = tmp_path / "recbole_mllm"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from recbole_mllm.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    assert find_cycle(import_graph(package)) == ["recbole_mllm.a", "recbole_mllm.sub.b", "recbole_mllm.a"]
