"""The test tree itself: it mirrors the source packages, shares code only through ``tests/helpers/``
(never by importing another test module or a conftest) and never edits ``sys.path``.

pytest's rootdir-relative "prepend" import mode puts each test file's folder, and ``tests/`` (for
``tests/conftest.py``), on ``sys.path``; so test module basenames must be unique and only
``tests/helpers/`` is a package."""
from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src" / "instantstyle"

#: a module that is not a test module nor a conftest but a shared, importable builder
HELPERS = "helpers"
#: folders of tests that mirror no source package: diffusers' own tests with our processors
EXTRA_ROOMS = {"peer"}
#: test files that other work in flight is still editing; they move to tests/processors/core/ when it lands
NOT_YET_IN_A_ROOM: set = set()
SYS_PATH_EDITS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__delitem__", "__iadd__"}
LOADERS_BY_NAME = {"import_module", "__import__", "spec_from_file_location", "SourceFileLoader", "run_path"}


def _is_test_module(name: str) -> bool:
    return any(part.startswith("test_") or part == "conftest" for part in name.split("."))


def _is_sys_path(node) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) and node.value.id == "sys"


def _names_a_test_file(text: str) -> bool:
    return bool(re.search(r"(^|[/\\])(test_\w+|conftest)(\.py)?$", text)) or _is_test_module(text)


def problems(source: str, filename: str = "<string>") -> list[str]:
    """Every import of a test module or conftest, and every ``sys.path`` edit, in ``source``."""
    tree = ast.parse(source, filename)
    found = []

    def say(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_test_module(alias.name):
                    say(node, f"imports the test module {alias.name!r}")
                if alias.name == "sys.path":
                    say(node, "imports sys.path")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                say(node, f"imports from the test module {module!r}")
            for alias in node.names:
                if _is_test_module(alias.name):
                    say(node, f"imports the test module {alias.name!r} from {module!r}")
            if module == "sys" and any(alias.name == "path" for alias in node.names):
                say(node, "imports sys.path")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if isinstance(func, ast.Attribute) and _is_sys_path(func.value) and func.attr in SYS_PATH_EDITS:
                say(node, f"edits sys.path (sys.path.{func.attr})")
            if name in ("syspath_prepend", "addsitedir"):
                say(node, f"edits sys.path ({name})")
            if name in LOADERS_BY_NAME:
                for arg in ast.walk(node):
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _names_a_test_file(arg.value):
                        say(node, f"loads the test module or conftest {arg.value!r} with {name}")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            for target in targets:
                base = target.value if isinstance(target, ast.Subscript) else target
                if _is_sys_path(base):
                    say(node, "edits sys.path (assignment)")
    return found


def _source_rooms() -> set[str]:
    """Test folders (relative to tests/) that mirror a source package."""
    rooms = {""}
    for package in SRC.iterdir():
        if (package / "__init__.py").is_file() and package.name != "processors":
            rooms.add(package.name)
    for room in (SRC / "processors").iterdir():
        if (room / "__init__.py").is_file():
            rooms.add(f"processors/{room.name}")
    return rooms


def room_problems(relative_paths, rooms, exceptions=frozenset()) -> list[str]:
    """Test files outside a mirrored room (but for ``exceptions``), non-test modules outside
    helpers/ and peer/, packages other than helpers/, and test module basenames used twice."""
    found, seen = [], {}
    for rel in sorted(relative_paths):
        path = Path(rel)
        folder = path.parent.as_posix() if path.parent != Path(".") else ""
        top = path.parts[0] if len(path.parts) > 1 else ""
        if path.name == "__init__.py":
            if folder != HELPERS:
                found.append(f"{rel}: only tests/{HELPERS}/ is a package (pytest's prepend mode)")
        elif top == HELPERS:
            if path.name.startswith("test_") or path.name == "conftest.py":
                found.append(f"{rel}: tests/{HELPERS}/ holds builders, not tests or fixtures")
        elif path.name.startswith("test_"):
            if folder not in rooms and top not in EXTRA_ROOMS and rel not in exceptions:
                found.append(f"{rel}: tests/{folder}/ mirrors no source package (rooms: {sorted(rooms)})")
            if path.name in seen:
                found.append(f"{rel}: basename also used by {seen[path.name]}")
            seen.setdefault(path.name, rel)
        elif path.name != "conftest.py" and top not in EXTRA_ROOMS:
            found.append(f"{rel}: a shared module belongs in tests/{HELPERS}/")
    return found


def _files():
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_test_module_imports_another_and_nothing_edits_sys_path():
    found = [p for f in _files() for p in problems(f.read_text(encoding="utf-8"), str(f.relative_to(TESTS.parent)))]
    assert not found, "\n".join(found)


def test_every_test_file_lives_in_a_room_that_mirrors_the_source():
    rooms = _source_rooms()
    assert {"kernels", "loaders", "pipelines", "bench", "processors/core", "processors/dit"} <= rooms
    files = [f.relative_to(TESTS).as_posix() for f in _files()]
    found = room_problems(files, rooms, NOT_YET_IN_A_ROOM)
    assert not found, "\n".join(found)
    assert NOT_YET_IN_A_ROOM <= set(files), "moved: drop it from NOT_YET_IN_A_ROOM"


def test_the_checks_can_fail():
    bad = {
        "from test_hub import make_hub_cache": "test module 'test_hub'",
        "import test_numerics as n": "test module 'test_numerics'",
        "def f():\n    from conftest import PROJ": "test module 'conftest'",
        "from loaders import test_hub": "test module 'test_hub'",
        "import sys\nsys.path.insert(0, 'x')": "sys.path.insert",
        "import sys\nsys.path += ['x']": "assignment",
        "import sys\nsys.path[:0] = ['x']": "assignment",
        "def t(monkeypatch):\n    monkeypatch.syspath_prepend('x')": "syspath_prepend",
        "import importlib.util as u\nu.spec_from_file_location('m', ROOT / 'pipelines' / 'conftest.py')": "conftest.py",
        "import importlib\nimportlib.import_module('test_cuda')": "test_cuda",
    }
    for source, message in bad.items():
        found = problems(source)
        assert len(found) == 1 and message in found[0], (source, found)
    ok = "import sys\nfrom helpers.hub_cache import make_hub_cache\nprint(sys.path[0], 'conftest')\nimport testing"
    assert problems(ok) == []

    rooms = {"", "kernels", "processors/core"}
    assert room_problems(["test_a.py", "kernels/test_b.py", "processors/core/test_c.py", "helpers/__init__.py",
                          "helpers/cases.py", "kernels/conftest.py", "peer/plugin.py"], rooms) == []
    wrong = room_problems(["processors/test_flat.py", "kernels/cases.py", "kernels/__init__.py", "kernels/test_a.py",
                           "processors/core/test_a.py", "helpers/test_x.py"], rooms)
    assert [w.split(":")[0] for w in wrong] == ["helpers/test_x.py", "kernels/__init__.py", "kernels/cases.py",
                                               "processors/core/test_a.py", "processors/test_flat.py"], wrong
