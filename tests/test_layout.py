"""The house's floors: dependencies point down (cli -> workflows -> lightning_modules ->
datamodules), so there is no import circle, and the data layer knows no method."""

import ast

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


def _imports(path):
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    package = path.relative_to(REPOSITORY).parent.parts
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("folder", FORBIDDEN)
def test_dependencies_point_down(folder):
    files = sorted((REPOSITORY / folder).rglob("*.py"))
    assert files
    wrong = [
        f"{path.relative_to(REPOSITORY)} imports {name}"
        for path in files
        for name in _imports(path)
        for forbidden in FORBIDDEN[folder]
        if name == forbidden or name.startswith(forbidden + ".")
    ]
    assert not wrong, wrong
