"""Every package's docstring names each of its modules, and names no module that is gone: a newcomer reads
the tree from these listings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ray_calib"
PACKAGES = sorted([ROOT, *(p.parent for p in ROOT.glob("*/__init__.py"))])
LISTED = re.compile(r"^ {0,4}([a-z][a-z0-9_]*) {2,}\S", re.M)  # "    name   what it is" lines


def children(package: Path) -> set[str]:
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    return modules | {p.parent.name for p in package.glob("*/__init__.py")}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_package_docstring_lists_its_modules(package):
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    missing = sorted(m for m in children(package) if not re.search(rf"(?<![\w.]){m}(?!\w)", doc))
    assert not missing, f"{package.name}/__init__.py does not name {missing}"
    gone = sorted(set(LISTED.findall(doc)) - children(package))
    assert not gone, f"{package.name}/__init__.py lists {gone}, which it does not hold"
