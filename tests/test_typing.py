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


def _annotation_namespace(module: str) -> dict[str, object]:
    """The names a module's ``if TYPE_CHECKING:`` block imports, imported now (as a type checker sees them)."""
    path = (ROOT / module.replace(".", "/")).with_suffix(".py")
    return {name: getattr(importlib.import_module(mod), name)
            for file, mod, name in _type_checking_imports() if file == path.relative_to(ROOT).as_posix()}


# (module, function or Class.method, {parameter: the domain type it must name})
_TYPED = [
    ("tl_modular.labeling._run", "label", {"target": "Compression", "graph": "ChannelGraph", "circuits": "CircuitSet"}),
    ("tl_modular.circuits", "find_circuits", {"graph": "ChannelGraph"}),
    ("tl_modular.circuits", "CircuitSet.plot", {"graph": "ChannelGraph"}),
    ("tl_modular.circuits", "CircuitSet.load", {"graph": "ChannelGraph"}),
    ("tl_modular.circuits", "plot_circuits", {"circuits": "CircuitSet", "graph": "ChannelGraph"}),
    ("tl_modular.graph.routes", "readers", {"comp": "Compression"}),
    ("tl_modular.graph.routes", "writers", {"comp": "Compression"}),
    ("tl_modular.compression.fidelity", "fidelity", {"comp": "Compression"}),
    ("tl_modular.compression.fidelity", "rank_fidelity_curve", {"comp": "Compression"}),
    ("tl_modular.compression.restriction", "restriction_hooks", {"comp": "Compression"}),
]


def test_domain_parameters_are_typed():
    """Each annotation resolves (``typing.get_type_hints`` with the TYPE_CHECKING names) and names its
    domain type instead of ``Any``."""
    import typing

    for module, qualname, expected in _TYPED:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        hints = typing.get_type_hints(obj, localns=_annotation_namespace(module))
        assert "return" in hints, qualname
        for param, type_name in expected.items():
            assert hints[param] is not typing.Any, f"{module}.{qualname}({param}) is typed Any"
            assert type_name in str(hints[param]) or getattr(hints[param], "__name__", "") == type_name, \
                f"{module}.{qualname}({param}): {hints[param]}"
