"""Module paths from before the package-per-stage layout, kept importable.

``import tl_modular.statistics`` and ``from tl_modular.task import Task`` still work: a finder in
``sys.meta_path`` (after the standard path finder, so a real module always wins) answers for exactly
the old paths below and hands back the module that now holds the code — the same object, not a copy, so everything in
it (private names too) is there. No file is left at the old paths, so that git follows each moved
file through merges. New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

__all__ = ["MOVED", "install"]

#: old module path → the module that holds its code now
MOVED = {
    "tl_modular.statistics": "tl_modular.compression.statistics",
    "tl_modular.fidelity": "tl_modular.compression.fidelity",
    "tl_modular.task": "tl_modular.tasks.task",
    "tl_modular.diff": "tl_modular.diffing",
    "tl_modular.toy.training": "tl_modular.toy.recipe",
}


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        # the import system sets module.__spec__ to the alias's spec next; exec_module puts it back
        self._specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__spec__.name if module.__spec__ is not None else None
        if alias in self._specs:
            module.__spec__ = self._specs.pop(alias)


def install() -> None:
    """Add the finder once, right after the standard path finder: real files win, and the finder of an
    editable install (which may point at another checkout) comes after it."""
    if any(type(f).__name__ == "_Moved" for f in sys.meta_path):
        return
    after = [i for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder]
    sys.meta_path.insert(after[0] + 1 if after else len(sys.meta_path), _Moved())
