"""
The layering the tree names, as a test: each package of ``wsgate`` may import only its own layer
and the layers below it, so dependencies run one way and no import cycle can cross layers.

From the bottom: ``config`` (the schema), ``core`` (decisions without I/O), ``net`` (TLS, PROXY
protocol), ``dataplane`` (legs, sessions, relay), ``control`` (health, discovery, reload), ``ops``
(console, admin, status, logs, check), ``process`` (workers, systemd), and the application on top
(``service``, ``cli``, the entry points).  ``core`` imports neither ``twisted.internet`` nor
Autobahn (but its C XOR masker, a pure function).

Every import counts, including those inside functions and under ``TYPE_CHECKING``.  Within a
layer, the modules' imports (those too) form no cycle either: where a module needs to name what
drives it, it declares the interface it uses (a ``Protocol``) instead of importing the class.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wsgate

PACKAGE = Path(wsgate.__file__).parent
LAYERS = ["config", "core", "net", "dataplane", "control", "ops", "process", "app"]
# The library imports core allows: Autobahn's C XOR masker and Twisted's logger, neither does I/O.
CORE_ALLOWED = {"autobahn.websocket.xormasker", "twisted.logger"}


def layer_of(module: str) -> str:
    """``wsgate.dataplane.bridge`` -> ``dataplane``; top-level modules are the application."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "app"


def module_name(path: Path, package: Path) -> str:
    relative = path.relative_to(package.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from wsgate import x`` gives ``wsgate.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "wsgate":
                found.update(f"wsgate.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
    return found


def violations(paths: list[Path], package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in paths:
        importer = module_name(path, package)
        own = LAYERS.index(layer_of(importer))
        for name in sorted(imports(path)):
            top = name.split(".")[0]
            if top == "wsgate" and name != "wsgate" and LAYERS.index(layer_of(name)) > own:
                problems.append(f"{importer} ({layer_of(importer)}) imports {name}")
            if layer_of(importer) == "core" and name not in CORE_ALLOWED:
                if top in ("autobahn", "txaio", "zope") or name.startswith("twisted"):
                    problems.append(f"{importer} (core) imports {name}")
    return problems


def test_layers_import_downwards() -> None:
    """No module imports a layer above its own; core does no I/O."""
    assert violations(sorted(PACKAGE.rglob("*.py"))) == []


def test_every_package_is_a_layer() -> None:
    """A new package under wsgate/ must be placed in the order (or it would count as the top)."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(LAYERS)


def test_the_check_sees_violations(tmp_path: Path) -> None:
    """The check finds an upward import, lazy or not, and I/O in core (else it passes vacuously)."""
    core = PACKAGE / "core" / "frames.py"
    assert "autobahn.websocket.xormasker" in imports(core)
    fake = tmp_path / "wsgate" / "core" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        "def f():\n    from wsgate.dataplane import bridge\nfrom twisted.internet import reactor\n"
    )
    assert violations([fake], tmp_path / "wsgate") == [
        "wsgate.core.fake (core) imports twisted.internet",
        "wsgate.core.fake (core) imports wsgate.dataplane",
    ]


def module_imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """The wsgate modules ``path`` imports (inside functions and under ``TYPE_CHECKING`` too);
    ``from wsgate.x import y`` counts as ``wsgate.x.y`` when that is a module.  A package's
    imports of its own submodules do not count."""
    tree = ast.parse(path.read_text(), str(path))
    known = {module_name(p, package) for p in package.rglob("*.py")}
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and node.module and node.module.split(".")[0] == "wsgate":
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in known else node.module)
    own = module_name(path, package)
    return {name for name in found if name != own and not name.startswith(own + ".")}


def cycles(package: Path = PACKAGE) -> list[list[str]]:
    """Every import cycle among the modules of ``package`` (as module_imports sees them)."""
    graph = {module_name(p, package): module_imports(p, package) for p in package.rglob("*.py")}
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles() == []


def test_the_cycle_check_sees_a_cycle(tmp_path: Path) -> None:
    """A lazy import closes a cycle, and so does one for type checking only."""
    package = tmp_path / "wsgate"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "ops" / "__init__.py").write_text("")
    (package / "ops" / "a.py").write_text("from wsgate.ops import b\n")
    (package / "ops" / "b.py").write_text("def f():\n    from wsgate.ops.a import x\n")
    typing_only = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from wsgate.ops import {}\n"
    )
    (package / "ops" / "c.py").write_text(typing_only.format("d"))
    (package / "ops" / "d.py").write_text("from wsgate.ops import c\n")
    (package / "ops" / "e.py").write_text(typing_only.format("a"))
    assert cycles(package) == [
        ["wsgate.ops.a", "wsgate.ops.b", "wsgate.ops.a"],
        ["wsgate.ops.c", "wsgate.ops.d", "wsgate.ops.c"],
    ]


def test_tests_import_helpers_not_tests() -> None:
    """A test module imports shared helpers (tests/helpers.py and the like), never another test
    module, whose tests would then run twice."""
    tests = Path(__file__).parent
    found = []
    for path in sorted(tests.rglob("*.py")):
        for name in imports(path):
            if name.split(".")[0] == "tests" and name.split(".")[-1].startswith("test_"):
                found.append(f"{path.relative_to(tests)} imports {name}")
    assert found == []
