"""ESamp as a vLLM general plugin (vLLM 0.33, Model Runner V2).

Entry point (group ``vllm.general_plugins``): ``esamp = "esamp.integrations.vllm:register"``.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers).  It is cheap and
harmless: it imports no torch extension and no model-runner code, validates the ``esamp`` keys of
``SamplingParams.extra_args`` (so a bad value is a 400 at the API, not a worker crash) and arranges, through an
import hook, that when vLLM's Model Runner V2 resolves its model-state class the class is wrapped -- but only
if ESamp is enabled for that engine:

* ``ESAMP_VLLM=1`` (defaults), or ``ESAMP_VLLM_CONFIG='{"beta": 0.3, ...}'``, or
* ``additional_config={"esamp": {...}}`` / ``--additional-config '{"esamp": {...}}'``.

``ESAMP_VLLM=0`` forces it off.  Per request: ``SamplingParams(extra_args={"esamp": {"beta": 0.5}})``,
``{"esamp": False}`` to opt out (``{"esamp": True}`` to opt in when ``default_on`` is false).

See docs/vllm.md.
"""
from __future__ import annotations

import importlib.abc
import logging
import sys
import threading
from typing import Any, Callable, Dict, List

from ._config import (ENV_CONFIG, ENV_ENABLE, ConfigError, EngineConfig, RequestConfig,  # noqa: F401
                      request_config, resolve_engine_config, validate_extra_args)

__all__ = ["register", "get_stats", "worker_stats", "EngineConfig", "RequestConfig", "ConfigError",
           "resolve_engine_config", "request_config", "validate_extra_args"]

logger = logging.getLogger("vllm.esamp")

MODEL_STATES_MODULE = "vllm.v1.worker.gpu.model_states"
V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"

_lock = threading.Lock()
_registered = False


# ---------------------------------------------------------------------------------------------------------
# Post-import hooks: run a callback right after a module has executed, without importing it ourselves.
# ---------------------------------------------------------------------------------------------------------
class _HookedLoader(importlib.abc.Loader):
    def __init__(self, loader, callbacks: List[Callable[[Any], None]]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for cb in self._callbacks:
            _run_callback(cb, module)

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


def _run_callback(cb, module) -> None:
    try:
        cb(module)
    except ConfigError:
        raise
    except Exception:  # a broken hook must never break vLLM's import
        logger.exception("esamp: post-import hook %s for %s failed", getattr(cb, "__name__", cb), module.__name__)


def when_imported(name: str, callback: Callable[[Any], None]) -> None:
    """Calls ``callback(module)`` now if ``name`` is imported, else right after it is."""
    mod = sys.modules.get(name)
    if mod is not None:
        _run_callback(callback, mod)
        return
    _finder.pending.setdefault(name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


# ---------------------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------------------
def _patch_model_states(module) -> None:
    orig = module.resolve_model_state_cls
    if getattr(orig, "_esamp_wrapped", False):
        return

    def resolve_model_state_cls(vllm_config, model):
        cls = orig(vllm_config, model)
        if resolve_engine_config(vllm_config.additional_config) is None:
            return cls
        from ._runtime import esamp_model_state_cls
        return esamp_model_state_cls(cls)

    resolve_model_state_cls._esamp_wrapped = True  # type: ignore[attr-defined]
    resolve_model_state_cls.__wrapped__ = orig  # type: ignore[attr-defined]
    module.resolve_model_state_cls = resolve_model_state_cls


def _patch_v1_runner(module) -> None:
    runner = getattr(module, "GPUModelRunner", None)
    if runner is None or getattr(runner.load_model, "_esamp_wrapped", False):
        return
    orig = runner.load_model

    def load_model(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        try:
            on = resolve_engine_config(self.vllm_config.additional_config) is not None
        except ConfigError:
            on = True
        if on:
            logger.warning("ESamp is enabled but inactive: this engine runs the V1 model runner; ESamp supports "
                           "Model Runner V2 (vLLM's default; unset VLLM_USE_V2_MODEL_RUNNER=0).")
        return out

    load_model._esamp_wrapped = True  # type: ignore[attr-defined]
    runner.load_model = load_model


def _patch_sampling_params(module) -> None:
    sp = module.SamplingParams
    orig = sp._verify_args
    if getattr(orig, "_esamp_wrapped", False):
        return

    def _verify_args(self):
        orig(self)
        try:
            validate_extra_args(self.extra_args)
        except ConfigError as e:
            err = getattr(module, "VLLMValidationError", None)
            if err is not None:
                raise err(str(e), parameter="extra_args") from None
            raise ValueError(str(e)) from None

    _verify_args._esamp_wrapped = True  # type: ignore[attr-defined]
    sp._verify_args = _verify_args


def register() -> None:
    """vLLM general-plugin entry point (idempotent; safe in every process)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    # Surface a malformed engine config early (in the process that parses it), not deep in a worker.
    resolve_engine_config(None)
    when_imported("vllm.sampling_params", _patch_sampling_params)
    when_imported(MODEL_STATES_MODULE, _patch_model_states)
    when_imported(V1_RUNNER_MODULE, _patch_v1_runner)


# ---------------------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------------------
def get_stats() -> List[Dict[str, Any]]:
    """Counters of every ESamp runtime in THIS process (one per model runner; empty when none).

    With vLLM's default multiprocessing the runners live in worker processes: use :func:`worker_stats`
    through ``llm.collective_rpc(worker_stats)`` instead, or read the periodic "ESamp:" log lines.
    """
    if "esamp.integrations.vllm._runtime" not in sys.modules:
        return []
    from ._runtime import runtimes
    return [rt.stats() for rt in runtimes()]


def worker_stats(worker: Any = None) -> Dict[str, Any]:
    """For ``llm.collective_rpc(worker_stats)``: the counters of that worker's runtime ({} when inactive)."""
    state = getattr(getattr(worker, "model_runner", None), "model_state", None)
    rt = getattr(state, "esamp", None)
    return rt.stats() if rt is not None else {}
