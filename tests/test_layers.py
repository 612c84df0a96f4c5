"""
The layering the tree names, as a test: each package of ``wsgate`` may import only its own layer
and the layers below it, so dependencies run one way and no import cycle can cross layers.

From the bottom: ``config`` (the schema), ``core`` (decisions without I/O), ``net`` (TLS, PROXY
protocol), ``dataplane`` (legs, sessions, relay), ``control`` (health, discovery, reload), ``ops``
(console, admin, status, logs, check), ``process`` (workers, systemd), and the application on top
(``service``, ``cli``, the entry points).  ``core`` imports neither ``twisted.internet`` nor
Autobahn (but its C XOR masker, a pure function).

Every import counts, including those inside functions and under ``TYPE_CHECKING``.
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
