"""The architecture, checked: dependencies point one way,

    kernels <- processors.core <- processors.targets <- processors.unet | processors.dit
            | processors.wan <- processors (the front door) <- processors.methods
            <- loaders <- pipelines | bench <- training <- CLI (root)

and no module imports from a higher layer, not even inside a function (a lazy import
is still a cycle).  Rooms that share a layer (the UNet and DiT families; pipelines and
bench) never import each other.  Every import statement of every module is read from
its source."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = "src/instantstyle"
#: package -> (folder, layer)
PACKAGES = {
    "instantstyle.kernels": (f"{SRC}/kernels", 0),
    "instantstyle.processors.core": (f"{SRC}/processors/core", 1),
    "instantstyle.processors.targets": (f"{SRC}/processors/targets", 2),
    "instantstyle.processors.unet": (f"{SRC}/processors/unet", 3),
    "instantstyle.processors.dit": (f"{SRC}/processors/dit", 3),
    "instantstyle.processors.wan": (f"{SRC}/processors/wan", 3),
    "instantstyle.processors": (f"{SRC}/processors", 4),
    "instantstyle.processors.methods": (f"{SRC}/processors/methods", 5),
    "instantstyle.loaders": (f"{SRC}/loaders", 6),
    "instantstyle.pipelines": (f"{SRC}/pipelines", 7),
    "instantstyle.bench": (f"{SRC}/bench", 7),
    "instantstyle.training": (f"{SRC}/training", 8),
    "instantstyle": (SRC, 9),
}
MAX_LINES = 600


def _package_of(module: str) -> str:
    """The most specific package of PACKAGES that ``module`` belongs to."""
    best = ""
    for name in PACKAGES:
        if (module == name or module.startswith(name + ".")) and len(name) > len(best):
            best = name
    return best


def _modules():
    for package, (folder, _) in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            yield name, path


def _imports(name: str, path: pathlib.Path):
    """Absolute names of everything ``path`` imports (any depth, functions included)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target
            for alias in node.names:  # ``from . import x`` imports the submodule x
                yield node.lineno, f"{target}.{alias.name}"
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and \
                any(isinstance(t, ast.Name) and t.id in ("_EXPORTS", "_LAZY") for t in node.targets):
            # lazy re-exports: ``{"name": ".module"}`` imports that module on first use
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    relative = value.value
                    level = len(relative) - len(relative.lstrip("."))
                    if level:
                        base = package.split(".")
                        base = base[: len(base) - level + 1]
                        relative = ".".join(base + [relative.lstrip(".")])
                    yield node.lineno, relative


MODULES = list(_modules())


@pytest.mark.parametrize("name, path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_point_down_the_layers(name, path):
    mine = _package_of(name)
    layer = PACKAGES[mine][1]
    bad = []
    for line, target in _imports(name, path):
        if not target.startswith("instantstyle"):
            continue
        theirs = _package_of(target)
        if not theirs or theirs == mine:
            continue
        if PACKAGES[theirs][1] > layer or (PACKAGES[theirs][1] == layer and theirs != mine):
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (layer {theirs})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name, path", MODULES, ids=[m for m, _ in MODULES])
def test_modules_stay_small(name, path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_every_package_is_checked():
    """A new folder of modules can't slip past the rules: every package under src/ is a room above."""
    folders = {str(p.parent.relative_to(ROOT)) for p in (ROOT / SRC).rglob("__init__.py")}
    assert folders == {folder for folder, _ in PACKAGES.values()}


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from ..pipelines import content\n_EXPORTS = {'x': '.methods'}\n")
    assert {t for _, t in _imports("instantstyle.processors.bad", bad)} == {
        "instantstyle.pipelines", "instantstyle.pipelines.content", "instantstyle.processors.methods"}
    assert _package_of("instantstyle.pipelines.content") == "instantstyle.pipelines"
