"""Hooks that an interrupt cannot leave behind.

Every pass that adds hooks to the user's model runs inside :func:`hook_guard` (``model.hooks(...)``,
``run_with_cache``, ``run_with_hooks`` all inside one). The guard records which hooks each module held on
entry and, in a ``finally``, removes every hook added since, by its handle id, then restores
TransformerLens' ``context_level`` and ``is_caching``. TransformerLens removes its own hooks in a
``finally`` too, but a second ``KeyboardInterrupt`` arriving inside its removal loop stops it half way;
here a Ctrl-C during removal is deferred, removal is retried if one got through, and the interrupt
is re-raised after, so the caller still sees the ``KeyboardInterrupt``.

>>> from tl_modular import toy
>>> model = toy.load_model()
>>> with hook_guard(model), model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x)]):
...     _ = model(torch.tensor([[1, 2, 3]]))
>>> from tl_modular._models import count_hooks
>>> count_hooks(model)
0
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch

__all__ = ["func_guard", "hook_guard", "run_with_cache", "run_with_hooks"]

# Every per-module dict in which torch keeps hooks (keyed by handle id); absent ones are skipped.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")
_LENS_LISTS = ("fwd_hooks", "bwd_hooks")  # TransformerLens' per-HookPoint lists of LensHandles
# Config switches a pass may flip (patching.split_inputs) and must leave as it found them.
_UNSET = object()
_CFG_FLAGS = ("use_attn_in", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_result", "use_hook_tokens")


def _snapshot(model: torch.nn.Module) -> list[tuple[Any, dict[str, set[int]], dict[str, list[Any]]]]:
    # Only HookPoints: that is where TransformerLens and tl_modular attach hooks, while a TransformerBridge
    # installs private capture hooks on its wrapped modules at the first forward pass and must keep them.
    from transformer_lens.hook_points import HookPoint

    state = []
    for module in model.modules():
        if not isinstance(module, HookPoint):
            continue
        keys = {name: set(d) for name in _HOOK_DICTS if isinstance(d := getattr(module, name, None), dict)}
        lens = {name: list(v) for name in _LENS_LISTS if isinstance(v := module.__dict__.get(name), list)}
        state.append((module, keys, lens))
    return state


def _restore(model: torch.nn.Module, state: list, context_level: Any, is_caching: Any,
             flags: dict[str, Any]) -> None:
    """Remove every hook not in ``state``; idempotent, so it can be retried after an interrupt."""
    cfg = getattr(model, "cfg", None)
    for name, value in flags.items():
        setattr(cfg, name, value)
    for module, keys, lens in state:
        for name, before in keys.items():
            d = getattr(module, name)
            for key in [k for k in d if k not in before]:
                d.pop(key, None)
        for name, before in lens.items():
            module.__dict__[name] = list(before)
    if context_level is not None:
        model.context_level = context_level
    if is_caching is not None:
        model.is_caching = is_caching


def _restore_uninterruptibly(model: torch.nn.Module, state: list, context_level: Any, is_caching: Any,
                             flags: dict[str, Any]) -> None:
    """:func:`_restore` until it completes; a ``KeyboardInterrupt`` meanwhile is raised after."""
    pending: BaseException | None = None
    deferred: list[int] = []
    previous: Any = _UNSET  # the SIGINT handler, set aside while removing

    def defer(signum: int, frame: Any) -> None:
        deferred.append(signum)

    while True:
        try:
            if previous is _UNSET and threading.current_thread() is threading.main_thread() and \
                    signal.getsignal(signal.SIGINT) is not None:  # None: a handler Python cannot put back
                # Ctrl-C during removal is recorded, not raised (a signal masked in this thread would
                # still trip Python's handler through another thread); one raised before this line is
                # absorbed by the retry.
                previous = signal.signal(signal.SIGINT, defer)
            _restore(model, state, context_level, is_caching, flags)
            break
        except KeyboardInterrupt as e:  # retry: removal is idempotent
            pending = e
    while previous is not _UNSET:
        try:
            handler, previous = previous, _UNSET
            signal.signal(signal.SIGINT, handler)
            if deferred and pending is None and callable(handler):
                handler(signal.SIGINT, sys._getframe())  # the Ctrl-C that came during removal, now
        except KeyboardInterrupt as e:
            pending = e
    if pending is not None:
        raise pending


class hook_guard:  # noqa: N801 - used as a function: ``with hook_guard(model):``
    """Within it, hooks may be added to ``model`` freely: all are removed on exit, however it exits.

    A class rather than a ``@contextmanager`` generator: an interrupt inside contextlib's ``__exit__``
    would leave the generator suspended, its ``finally`` deferred to garbage collection.

    >>> from tl_modular import toy
    >>> model = toy.load_model()
    >>> with hook_guard(model):
    ...     _ = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    >>> from tl_modular._models import count_hooks
    >>> count_hooks(model)
    0
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._saved: tuple | None = None

    def __enter__(self) -> torch.nn.Module:
        model = self.model
        cfg = getattr(model, "cfg", None)
        flags = {name: getattr(cfg, name) for name in _CFG_FLAGS if hasattr(cfg, name)}
        self._saved = (_snapshot(model), getattr(model, "context_level", None),
                       getattr(model, "is_caching", None), flags)
        return model

    def __exit__(self, *exc: Any) -> None:
        if self._saved is not None:
            _restore_uninterruptibly(self.model, *self._saved)


def _func_outside() -> bool:
    """No torch.func transform and no forward-AD level open (the state between passes)."""
    import torch.autograd.forward_ad as fwAD

    return fwAD._current_level == -1 and torch._C._functorch.maybe_current_level() is None


def _reset_func_levels() -> None:
    """Close what an interrupted torch.func transform left open and put torch's Python-side level
    counters back in step with its C++ ones (idempotent)."""
    import torch._functorch.eager_transforms as eager
    import torch.autograd.forward_ad as fwAD

    while torch._C._functorch.maybe_current_level() is not None:
        torch._C._functorch._func_decrement_nesting()
    try:
        level = torch._C._enter_dual_level()
    except RuntimeError:  # "nested forward mode AD": the interrupted jvp's level is still open
        torch._C._exit_dual_level(level=0)
        level = torch._C._enter_dual_level()
    torch._C._exit_dual_level(level=level)
    fwAD._current_level = -1
    if hasattr(eager, "JVP_NESTING"):
        eager.JVP_NESTING = 0


class func_guard:  # noqa: N801 - used as a function: ``with func_guard():``
    """Around ``torch.func.jvp`` / ``vjp`` calls made outside any transform: an interrupt inside one
    can leave torch's level bookkeeping out of step (the Python counter is updated after the C++
    call), and every later ``jvp`` in the process then fails; on an exception, put it back.

    >>> with func_guard():
    ...     _ = torch.func.jvp(torch.sin, (torch.zeros(2),), (torch.ones(2),))
    """

    def __enter__(self) -> None:
        self._outside = _func_outside()

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None or not self._outside:
            return
        pending: BaseException | None = None
        while True:
            try:
                _reset_func_levels()
                break
            except KeyboardInterrupt as e:  # retry: the reset is idempotent
                pending = e
        if pending is not None:
            raise pending


def run_with_cache(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.run_with_cache(...)`` inside :func:`hook_guard`."""
    with hook_guard(model):
        return model.run_with_cache(*args, **kwargs)


def run_with_hooks(model: Any, *args: Any, **kwargs: Any) -> Any:
    """``model.run_with_hooks(...)`` inside :func:`hook_guard`."""
    with hook_guard(model):
        return model.run_with_hooks(*args, **kwargs)
