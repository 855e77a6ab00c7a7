"""The public API: every name the README, the docs and the tutorials use resolves, and every module
path from before the package-per-stage layout still imports (the same module, not a copy)."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tl_modular as tlm

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tutorials").glob("[0-9]*.py"))]

# old path -> the module that holds its code now
OLD_PATHS = {
    "tl_modular.statistics": "tl_modular.compression.statistics",
    "tl_modular.fidelity": "tl_modular.compression.fidelity",
    "tl_modular.task": "tl_modular.tasks.task",
    "tl_modular.diff": "tl_modular.diffing",
    "tl_modular.toy.training": "tl_modular.toy.recipe",
}

# names imported from old paths before the move (a sample of each module's public names)
OLD_IMPORTS = {
    "tl_modular.compression": ["ChannelCompression", "Compression", "ReadSpace", "Side", "compress"],
    "tl_modular.statistics": ["InputStats", "PortStats", "Statistics", "WriteStats", "collect_statistics", "read_map",
                              "statistics_hook_names"],
    "tl_modular.fidelity": ["fidelity", "rank_fidelity_curve"],
    "tl_modular.graph": ["ChannelGraph", "Split", "build_graph", "spearman"],
    "tl_modular.task": ["MetricKind", "Task"],
    "tl_modular.tasks": ["IOI_TEMPLATES", "docstring", "greater_than", "induction", "ioi"],
    "tl_modular.diff": ["ChannelChange", "ModelDiff", "RouteChange", "diff", "diff_null", "principal_angles"],
    "tl_modular.circuits": ["Circuit", "CircuitSet", "adjusted_rand_index", "find_circuits"],
    "tl_modular.toy.training": ["TrainConfig", "TrainResult", "default_config", "eval_tasks", "evaluate", "train",
                                "training_tasks"],
    "tl_modular.toy": ["TrainConfig", "TrainResult", "default_config", "eval_tasks", "evaluate", "train",
                       "training_tasks", "load_model", "mixed_tokens", "GENERATORS"],
    "tl_modular.training": ["ModularityLoss", "build_interpretable", "graph_modularity", "train_modular"],
    "tl_modular.patching": ["capture_writes", "patch_routes", "path_effect", "route_effect", "valid_route"],
    "tl_modular.sae": ["SAESet", "save_atomic", "score_model", "train_sae"],
    "tl_modular.labeling": ["Labels", "OpenAILabeler", "label", "neurons"],
}


def _doc_imports() -> set[tuple[str, str]]:
    """(module, name) for every ``from tl_modular... import name`` in the docs and tutorials."""
    found = set()
    for path in DOCS:
        text = path.read_text()
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_modular"):
                    found |= {(node.module, a.name) for a in node.names}
                elif isinstance(node, ast.Import):
                    found |= {(a.name, "") for a in node.names if a.name.startswith("tl_modular")}
        else:
            for module, names in re.findall(r"from (tl_modular[\w.]*) import ([\w, ]+)", text):
                found |= {(module, n.strip()) for n in names.split(",") if n.strip()}
    return found


def _doc_attributes() -> set[str]:
    """Every ``tlm.a.b`` chain the docs and tutorials use."""
    chains = set()
    for path in DOCS:
        chains |= set(re.findall(r"\btlm((?:\.[A-Za-z_]\w*)+)", path.read_text()))
    return chains


def test_docs_use_names_that_exist():
    imports, chains = _doc_imports(), _doc_attributes()
    assert len(imports) >= 8 and len(chains) >= 20         # the scan itself found the docs' usage
    for module, name in sorted(imports):
        mod = importlib.import_module(module)
        if name:
            assert hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module}.{name}"
    for chain in sorted(chains):
        obj = tlm
        for part in chain.strip(".").split("."):
            assert hasattr(obj, part), f"tlm{chain}: no {part!r}"
            obj = getattr(obj, part)


def test_every_name_in_all_exists():
    for name in tlm.__all__:
        assert getattr(tlm, name) is not None, name


@pytest.mark.parametrize("old,new", sorted(OLD_PATHS.items()))
def test_old_module_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new   # the alias leaves the real module's spec alone


@pytest.mark.parametrize("module", sorted(OLD_IMPORTS))
def test_old_imports(module):
    mod = importlib.import_module(module)
    missing = [n for n in OLD_IMPORTS[module] if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}"


def test_diff_is_the_function_and_diffing_the_module():
    import tl_modular.diff  # noqa: F401  (must not rebind tlm.diff)
    from tl_modular.diff import ModelDiff

    assert callable(tlm.diff) and tlm.diff is tlm.diffing.diff
    assert ModelDiff is tlm.ModelDiff
    assert tlm.statistics is importlib.import_module("tl_modular.compression.statistics")
    assert tlm.fidelity.rank_fidelity_curve is tlm.compression.rank_fidelity_curve


def test_old_paths_in_a_fresh_interpreter():
    """Old paths imported first thing (before anything else of tl_modular) also resolve."""
    code = ("import tl_modular.statistics as s, tl_modular.toy.training as t; from tl_modular.diff import diff; "
            "from tl_modular.task import Task; import tl_modular as tlm; "
            "assert s.__name__ == 'tl_modular.compression.statistics' and t.__name__ == 'tl_modular.toy.recipe'; "
            "assert callable(tlm.diff) and Task is tlm.Task")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
