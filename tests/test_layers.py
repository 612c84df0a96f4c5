"""
The layering rule the tree already keeps: ``wsgate/core`` (decisions without I/O) imports neither
Twisted nor Autobahn's protocol machinery, nor any other wsgate module outside ``core``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wsgate.core

CORE = Path(wsgate.core.__file__).parent
# The one library import core allows: Autobahn's C XOR masker, a pure function.
ALLOWED = {"autobahn.websocket.xormasker"}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_core_does_no_io() -> None:
    """No module of wsgate/core imports twisted, autobahn (but the masker) or a higher layer."""
    problems = []
    for path in sorted(CORE.glob("*.py")):
        for name in imports(path):
            top = name.split(".")[0]
            if name in ALLOWED:
                continue
            if top in ("twisted", "autobahn", "txaio", "zope") or (
                top == "wsgate" and not name.startswith("wsgate.core")
            ):
                problems.append(f"{path.name}: {name}")
    assert problems == []


def test_the_check_sees_imports() -> None:
    """The check itself finds imports (it would pass vacuously otherwise)."""
    assert "autobahn.websocket.xormasker" in imports(CORE / "frames.py")
