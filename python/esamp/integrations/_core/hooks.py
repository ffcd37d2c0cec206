"""Post-import hooks shared by the engine adapters: run a callback right after a module has executed, without
importing it ourselves, and wrap a method once.

An adapter's ``register()`` runs in every process an engine starts (API server, tokenizer, engine core, workers);
the patches target modules that only some of those processes import, so they are installed lazily: when (and only
when) the target module is imported.  Each adapter keeps its own :class:`PostImportHooks` (its own logger, its own
exceptions that must propagate); a failing callback is logged and never breaks the engine's import.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
from typing import Any, Callable, Dict, List, Tuple, Type


class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, callbacks: List[Callable[[Any], None]], run: Callable[[Callable, Any], None]):
        self._loader = loader
        self._callbacks = callbacks
        self._run = run

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for cb in self._callbacks:
            self._run(cb, module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ... of the real loader
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def __init__(self, run: Callable[[Callable, Any], None]):
        self.pending: Dict[str, List[Callable[[Any], None]]] = {}
        self._run = run

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
        spec.loader = _HookedLoader(spec.loader, self.pending.pop(fullname), self._run)
        return spec


class PostImportHooks:
    """``when_imported(name, callback)`` calls ``callback(module)`` now if ``name`` is imported, else right after
    it is.  Exceptions of a callback are logged on ``logger``, except those of the types in ``reraise``."""

    def __init__(self, logger: logging.Logger, reraise: Tuple[Type[BaseException], ...] = ()):
        self.logger = logger
        self.reraise = tuple(reraise)
        self.finder = _PostImportFinder(self.run_callback)

    def run_callback(self, cb: Callable[[Any], None], module) -> None:
        try:
            cb(module)
        except self.reraise:
            raise
        except Exception:  # a broken hook must never break the engine's import
            self.logger.exception("esamp: post-import hook %s for %s failed", getattr(cb, "__name__", cb),
                                  module.__name__)

    def when_imported(self, name: str, callback: Callable[[Any], None]) -> None:
        mod = sys.modules.get(name)
        if mod is not None:
            self.run_callback(callback, mod)
            return
        self.finder.pending.setdefault(name, []).append(callback)
        if self.finder not in sys.meta_path:
            sys.meta_path.insert(0, self.finder)


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
