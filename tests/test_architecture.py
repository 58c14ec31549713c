"""The import rules of docs/architecture.md, checked on the source."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "positioning": {"zmq", "PySide6", "scanner_bridge", "gui"},
    "scanner_bridge": {"torch", "PySide6", "positioning", "gui", "sim", "open3d", "smplx"},
    "calibration": {"zmq", "PySide6", "gui", "scanner_bridge"},
    "sim": {"PySide6", "gui"},
    "ctpos": {"gui"},
}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_rules(package):
    broken = {str(f.relative_to(ROOT)): sorted(imports(f) & FORBIDDEN[package])
              for f in (ROOT / package).rglob("*.py") if imports(f) & FORBIDDEN[package]}
    assert not broken, broken


def test_gui_is_imported_by_nothing():
    users = [str(f.relative_to(ROOT)) for pkg in FORBIDDEN for f in (ROOT / pkg).rglob("*.py") if "gui" in imports(f)]
    assert not users
