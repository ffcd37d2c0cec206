"""ESamp as a vLLM general plugin: vLLM 0.32 / 0.33, the V1 model runner family (``GPUModelRunner`` and the CPU
runner) and Model Runner V2.

Entry point (group ``vllm.general_plugins``): ``esamp = "esamp.integrations.vllm:register"``.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers).  It is cheap and
harmless: it imports no torch extension and no model-runner code, validates the ``esamp`` keys of
``SamplingParams.extra_args`` (so a bad value is a 400 at the API, not a worker crash) and arranges, through
import hooks, that ESamp attaches where vLLM builds its model runner -- but only if ESamp is enabled for that
engine:

* ``ESAMP_VLLM=1`` (defaults), or ``ESAMP_VLLM_CONFIG='{"beta": 0.3, ...}'``, or
* ``additional_config={"esamp": {...}}`` / ``--additional-config '{"esamp": {...}}'``.

``ESAMP_VLLM=0`` forces it off.  Per request: ``SamplingParams(extra_args={"esamp": {"beta": 0.5}})``,
``{"esamp": False}`` to opt out (``{"esamp": True}`` to opt in when ``default_on`` is false).

Where ESamp is enabled but cannot attach (an unknown runner, an unsupported configuration), every worker says so
once (a warning with the reason), ``esamp_stats`` reports it, and requests that ask for ESamp are rejected at the
front end with an error naming the reason -- unless the engine config says ``"fallback": true``.

See docs/vllm.md.
"""
from __future__ import annotations

import functools
import logging
import sys
import threading
from typing import Any, Callable, Dict, List

from .._core.hooks import PostImportHooks
from ._config import (ENV_CONFIG, ENV_ENABLE, ConfigError, EngineConfig, RequestConfig,  # noqa: F401
                      request_config, resolve_engine_config, validate_extra_args)

__all__ = ["register", "get_stats", "worker_stats", "EngineConfig", "RequestConfig", "ConfigError",
           "resolve_engine_config", "request_config", "validate_extra_args"]

logger = logging.getLogger("vllm.esamp")

MODEL_STATES_MODULE = "vllm.v1.worker.gpu.model_states"
V1_RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
WORKER_BASE_MODULE = "vllm.v1.worker.worker_base"
LLM_ENGINE_MODULE = "vllm.v1.engine.llm_engine"
ASYNC_LLM_MODULE = "vllm.v1.engine.async_llm"

_lock = threading.Lock()
_registered = False


# Post-import hooks (esamp.integrations._core.hooks): a ConfigError raised by a patch propagates (a bad setting is
# the user's error, not a broken hook); any other exception is logged and never breaks vLLM's import.
_hooks = PostImportHooks(logger, reraise=(ConfigError,))
_finder = _hooks.finder
_run_callback = _hooks.run_callback
when_imported = _hooks.when_imported


# ---------------------------------------------------------------------------------------------------------
# Patches
# ---------------------------------------------------------------------------------------------------------
def _after(method: Callable, after: Callable[[Any], None]) -> Callable:
    """``method`` followed by ``after(self)`` (exceptions of ``after`` other than ConfigError are logged)."""
    if getattr(method, "_esamp_wrapped", False):
        return method

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        try:
            after(self)
        except ConfigError:
            raise
        except Exception:  # never break vLLM
            logger.exception("esamp: %s after %s.%s failed", getattr(after, "__name__", after),
                             type(self).__name__, method.__name__)
        return out

    wrapper._esamp_wrapped = True  # type: ignore[attr-defined]
    return wrapper


def _after_in_class_tree(base: type, name: str, after: Callable[[Any], None]) -> None:
    """Wraps ``name`` of ``base`` and of every subclass that defines its own (those already defined, and through
    ``__init_subclass__`` those defined later): vLLM's CPU runner overrides ``load_model`` without calling the
    base class's, so wrapping the base alone would miss it.  ``after`` must be idempotent (an override that calls
    super() runs it twice)."""
    def patch(cls: type) -> None:
        f = cls.__dict__.get(name)
        if callable(f) and not getattr(f, "_esamp_wrapped", False):
            setattr(cls, name, _after(f, after))

    stack, seen = [base], set()
    while stack:
        c = stack.pop()
        if c in seen:
            continue
        seen.add(c)
        patch(c)
        stack.extend(c.__subclasses__())
    if base.__dict__.get("_esamp_subclass_hooks") is not None:
        base._esamp_subclass_hooks.append(patch)  # type: ignore[attr-defined]
        return
    hooks = [patch]
    prev = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kwargs):
        if prev is not None:
            prev.__func__(cls, **kwargs)
        else:
            super(base, cls).__init_subclass__(**kwargs)
        for h in hooks:
            h(cls)

    base._esamp_subclass_hooks = hooks  # type: ignore[attr-defined]
    base.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]


def _patch_model_states(module) -> None:
    orig = module.resolve_model_state_cls
    if getattr(orig, "_esamp_wrapped", False):
        return

    def resolve_model_state_cls(vllm_config, model):
        cls = orig(vllm_config, model)
        if resolve_engine_config(vllm_config.additional_config) is None:
            return cls
        from ._v2 import esamp_model_state_cls
        return esamp_model_state_cls(cls)

    resolve_model_state_cls._esamp_wrapped = True  # type: ignore[attr-defined]
    resolve_model_state_cls.__wrapped__ = orig  # type: ignore[attr-defined]
    module.resolve_model_state_cls = resolve_model_state_cls


def _attach_v1(runner) -> None:
    if resolve_engine_config(getattr(getattr(runner, "vllm_config", None), "additional_config", None)) is None:
        return
    from ._v1 import attach
    attach(runner)


def _patch_v1_runner(module) -> None:
    runner = getattr(module, "GPUModelRunner", None)
    if runner is not None:
        _after_in_class_tree(runner, "load_model", _attach_v1)


def _check_worker(worker) -> None:
    """After a worker loaded its model: ESamp enabled, but no adapter recorded a status -> an unknown runner."""
    cfg = resolve_engine_config(getattr(getattr(worker, "vllm_config", None), "additional_config", None))
    if cfg is None:
        return
    from ._common import mark_inactive, status_of
    if status_of(worker) is not None:
        return
    runner = getattr(worker, "model_runner", None)
    mark_inactive(runner if runner is not None else worker, cfg,
                  f"the model runner {type(runner).__name__} ({type(runner).__module__}) is not one ESamp attaches "
                  f"to (supported: vLLM's V1 GPUModelRunner and its subclasses, and Model Runner V2)",
                  type(runner).__name__)


def _esamp_stats(self, sync: bool = True) -> Dict[str, Any]:
    """Worker RPC (``collective_rpc("esamp_stats")``): this worker's ESamp counters; {"active": False, ...} with
    the reason where ESamp is enabled but could not attach; {} where it is not enabled."""
    from ._common import status_of
    st = status_of(self)
    return st.stats(sync=bool(sync)) if st is not None else {}


def _patch_worker_base(module) -> None:
    base = getattr(module, "WorkerBase", None)
    if base is None:
        return
    if not hasattr(base, "esamp_stats"):
        base.esamp_stats = _esamp_stats
    _after_in_class_tree(base, "load_model", _check_worker)


def _patch_llm_engine(module) -> None:
    cls = getattr(module, "LLMEngine", None)
    if cls is None or getattr(cls.add_request, "_esamp_wrapped", False):
        return
    from ._frontend import wrap_add_request
    cls.add_request = wrap_add_request(cls.add_request)


def _patch_async_llm(module) -> None:
    cls = getattr(module, "AsyncLLM", None)
    if cls is None or getattr(cls.add_request, "_esamp_wrapped", False):
        return
    from ._frontend import wrap_add_request_async
    cls.add_request = wrap_add_request_async(cls.add_request)


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
    when_imported(WORKER_BASE_MODULE, _patch_worker_base)
    when_imported(LLM_ENGINE_MODULE, _patch_llm_engine)
    when_imported(ASYNC_LLM_MODULE, _patch_async_llm)


# ---------------------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------------------
def get_stats(sync: bool = True) -> List[Dict[str, Any]]:
    """Counters of every ESamp runtime in THIS process (one per model runner; empty when none).

    With vLLM's default multiprocessing the runners live in worker processes: use
    ``llm.collective_rpc("esamp_stats")`` instead, or read the periodic "ESamp:" log lines.
    """
    if "esamp.integrations._core.runtime" not in sys.modules:
        return []
    from .._core.runtime import runtimes
    return [rt.stats(sync=sync) for rt in runtimes()]


def worker_stats(worker: Any = None, sync: bool = True) -> Dict[str, Any]:
    """For ``llm.collective_rpc(worker_stats)`` (a callable RPC; multiprocess engines need
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 for it, the string RPC ``"esamp_stats"`` does not): the counters of that
    worker's ESamp ({"active": False, "inactive_reason": ...} where it could not attach; {} when not enabled)."""
    return _esamp_stats(worker, sync)
