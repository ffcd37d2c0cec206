"""Post-import hooks: run a callback right after a module has executed, without importing it ourselves.

SGLang's own ``HookRegistry`` resolves every target by importing its module when ``load_plugins()`` runs, i.e. in
every process (tokenizer manager, detokenizer, schedulers).  The ESamp patches target the scheduler's model runner,
so they are installed lazily instead: when (and only when) the target module is imported.
(A copy of the mechanism in esamp.integrations.vllm; to be shared once the adapters' common core is extracted.)
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any, Callable, Dict, List

logger = logging.getLogger("sglang.esamp")


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, callbacks: List[Callable[[Any], None]]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for cb in self._callbacks:
            run_callback(cb, module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.pending: Dict[str, List[Callable[[Any], None]]] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, self.pending.pop(fullname))
        return spec


_finder = _PostImportFinder()


def run_callback(cb, module) -> None:
    try:
        cb(module)
    except Exception:  # a broken hook must never break SGLang's import
        logger.exception("esamp: post-import hook %s for %s failed", getattr(cb, "__name__", cb), module.__name__)


def when_imported(name: str, callback: Callable[[Any], None]) -> None:
    """Calls ``callback(module)`` now if ``name`` is imported, else right after it is."""
    mod = sys.modules.get(name)
    if mod is not None:
        run_callback(callback, mod)
        return
    _finder.pending.setdefault(name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def wrap(owner: Any, name: str, make: Callable[[Callable], Callable]) -> bool:
    """Replace ``owner.name`` by ``make(original)`` once (idempotent).  Returns False if already wrapped or absent.
    Class-level staticmethod/classmethod descriptors are preserved."""
    raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
    if raw is None:
        return False
    kind = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
    orig = raw.__func__ if kind is not None else raw
    if getattr(orig, "_esamp_wrapped", False):
        return False
    new = make(orig)
    new._esamp_wrapped = True  # type: ignore[attr-defined]
    new.__wrapped__ = orig  # type: ignore[attr-defined]
    new.__name__ = getattr(orig, "__name__", name)
    new.__qualname__ = getattr(orig, "__qualname__", name)
    setattr(owner, name, kind(new) if kind is not None else new)
    return True
