"""Types at module boundaries: every ``if TYPE_CHECKING:`` import names something that exists (they
never run, so nothing else would notice a stale one), and none of them runs at import time."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _type_checking_imports() -> list[tuple[str, str, str]]:
    """(file, module, name) of every import inside an ``if TYPE_CHECKING:`` block of tl_modular."""
    found = []
    for path in sorted((ROOT / "tl_modular").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for stmt in node.body:
                    if isinstance(stmt, ast.ImportFrom):
                        found += [(path.relative_to(ROOT).as_posix(), stmt.module, a.name) for a in stmt.names]
    return found


def test_type_checking_imports_resolve():
    found = _type_checking_imports()
    assert len(found) >= 10                                   # the scan itself sees them
    for file, module, name in found:
        assert hasattr(importlib.import_module(module), name), f"{file}: {module} has no {name}"


def test_type_checking_imports_do_not_run():
    """Importing the package and its stages loads no module only a TYPE_CHECKING block names
    (sae_lens stays unloaded until an SAE is used)."""
    code = ("import sys, tl_modular, tl_modular.graph, tl_modular.compression, tl_modular.diffing; "
            "print('sae_lens' in sys.modules, 'tl_modular.labeling' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}).stdout
    assert out.split() == ["False", "False"], out
