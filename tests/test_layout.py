"""The house's floors: dependencies point down (cli -> workflows -> lightning_modules ->
datamodules), so there is no import circle, and the data layer knows no method. Within the
library's packages, files and functions stay short enough to read at once, and no two modules
of one package import each other, even from inside a function."""

import ast
from pathlib import Path

import pytest
from conftest import REPOSITORY

# package (or sub-package) -> the suite's packages it must not import
FORBIDDEN = {
    "datamodules": ("cli", "workflows", "lightning_modules", "lightly"),
    "lightning_modules": ("cli", "workflows"),
    "lightning_modules/common": ("lightning_modules.diffusion", "lightning_modules.baselines",
                                 "lightning_modules.probes"),
    "lightning_modules/diffusion": ("lightning_modules.baselines", "lightning_modules.probes"),
    "lightning_modules/baselines": ("lightning_modules.diffusion", "lightning_modules.probes"),
    "workflows": ("cli",),
    "benchmarks": ("cli",),
}  # fmt: skip


# The library's packages, and how long their files and functions may grow.
PACKAGES = ("datamodules", "lightning_modules", "workflows")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _import_statements(path):
    """Per import statement of ``path``, wherever it sits: the absolute name of the module it
    names (relative imports resolved), the names it takes from that module (none for ``import
    x``), and its line."""
    package = path.relative_to(REPOSITORY).parent.parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module, tuple(alias.name for alias in node.names), node.lineno


def _imports(path):
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    return [
        name
        for module, names, _ in _import_statements(path)
        for name in [module, *(f"{module}.{name}" for name in names)]
    ]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPOSITORY).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_files(package: str) -> list[Path]:
    files = sorted((REPOSITORY / package).rglob("*.py"))
    assert files, f"{package}/ holds no Python file"
    return files


@pytest.mark.parametrize("folder", FORBIDDEN)
def test_dependencies_point_down(folder):
    files = _package_files(folder)
    wrong = [
        f"{path.relative_to(REPOSITORY)} imports {name}"
        for path in files
        for name in _imports(path)
        for forbidden in FORBIDDEN[folder]
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("package", PACKAGES)
def test_files_are_short(package):
    long = [
        f"{path.relative_to(REPOSITORY)}: {lines} lines"
        for path in _package_files(package)
        if (lines := len(path.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not long, f"files over {MAX_FILE_LINES} lines: {'; '.join(long)}"


def _functions(tree: ast.AST, prefix: str = ""):
    """``(qualified name, node)`` of every function and method below ``tree``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_are_short(package):
    long = [
        f"{path.relative_to(REPOSITORY)}:{node.lineno} {name}: {lines} lines"
        for path in _package_files(package)
        for name, node in _functions(ast.parse(path.read_text()))
        if (lines := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {'; '.join(long)}"


def _import_graph(package: str) -> dict[str, dict[str, str]]:
    """Each module of ``package`` (a package's own name for its ``__init__.py``) -> the modules
    of the package it imports, each with where (``file:line``). ``from a import b`` imports the
    module ``a.b`` when there is one, else ``a``."""
    files = {_module_name(path): path for path in _package_files(package)}
    graph: dict[str, dict[str, str]] = {}
    for name, path in files.items():
        graph[name] = {}
        for module, names, line in _import_statements(path):
            submodules = {f"{module}.{n}" for n in names} & files.keys()
            for target in submodules or {module} & files.keys():
                graph[name].setdefault(target, f"{path.relative_to(REPOSITORY)}:{line}")
        graph[name].pop(name, None)
    return graph


def _circles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def _describe(circle: list[str], graph: dict[str, dict[str, str]]) -> str:
    """The modules of ``circle``, then each import between them, with its file and line."""
    imports = [
        f"  {where} imports {target}"
        for module in circle
        for target, where in sorted(graph[module].items())
        if target in circle
    ]
    return "\n".join([f"among {', '.join(circle)}:", *imports])


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle_inside_a_package(package):
    graph = _import_graph(package)
    circles = _circles(graph)
    assert not circles, "import circles " + "\n".join(_describe(c, graph) for c in circles)
