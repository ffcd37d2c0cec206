"""ESamp as an SGLang sampling backend (SGLang 0.5.23): ``--sampling-backend esamp``.

Entry point (group ``sglang.srt.plugins``): ``esamp = "esamp.integrations.sglang:register"``.  SGLang's
``load_plugins()`` calls :func:`register` early in every process (launcher / tokenizer manager, schedulers,
detokenizer).  It imports no SGLang module itself; it arranges, through post-import hooks, that

* ``esamp`` is a valid ``--sampling-backend`` choice and ``register_sampler_backend("esamp", ...)`` creates an
  :class:`ESampSampler` in each model runner;
* ``ModelRunner.load_model`` attaches the ESamp runtime (capture points, distiller bank, trainer) when the sampler is
  ESamp's and the configuration is supported -- before CUDA-graph capture; ``ModelRunner.sample`` hands it the
  forward batch; ``ForwardBatch.init_new`` keeps the batch's requests for it;
* finished (streamed) and aborted requests release their distiller slot;
* ``SamplingParams.verify`` rejects malformed ``custom_params["esamp"]`` entries (HTTP 400) on an ESamp server;
* the tokenizer manager tags the n samples of an ``n > 1`` request with one ``esamp_group`` (one shared slot) and
  their index (seed offset).

Every hook returns SGLang's behaviour unchanged unless the engine runs with ``--sampling-backend esamp``.
Engine settings: ``ESAMP_SGLANG_CONFIG='{"beta": 0.3, ...}'`` (or :func:`configure`); ``ESAMP_SGLANG=0`` forces
ESamp off (the backend then samples exactly like SGLang's ``base_backend``).  Per request:
``custom_params={"esamp": {"beta": 0.5}}``, ``{"esamp": False}`` to opt out.  See docs/sglang.md.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import uuid
from typing import Any, Dict, List

from .._core.hooks import PostImportHooks, wrap
from ._config import (BACKEND, ENV_CONFIG, ENV_ENABLE, GROUP_KEY, INDEX_KEY, ConfigError, EngineConfig,  # noqa: F401
                      RequestConfig, request_config, resolve_engine_config, validate_custom_params)

__all__ = ["register", "configure", "get_stats", "EngineConfig", "RequestConfig", "ConfigError",
           "resolve_engine_config", "request_config", "validate_custom_params", "BACKEND"]

logger = logging.getLogger("sglang.esamp")
_hooks = PostImportHooks(logger)      # post-import hooks (esamp.integrations._core.hooks)
when_imported = _hooks.when_imported
_lock = threading.Lock()
_registered = False
_RUNTIME_MODULE = __name__ + "._runtime"


def configure(**settings: Any) -> None:
    """Set the engine settings for engines started later in this process and its children (offline
    ``sglang.Engine``): validates ``settings`` and writes them to ``ESAMP_SGLANG_CONFIG``."""
    env = dict(os.environ)
    env[ENV_CONFIG] = json.dumps(settings)
    resolve_engine_config(env)  # raises ConfigError naming the key
    os.environ[ENV_CONFIG] = env[ENV_CONFIG]


def _runtimes() -> List[Any]:
    mod = sys.modules.get(_RUNTIME_MODULE)
    return mod.runtimes() if mod is not None else []


def get_stats() -> List[Dict[str, Any]]:
    """Counters of every ESamp runtime in THIS process (one per model runner).  SGLang's schedulers run in their
    own processes: there, read the periodic ``ESamp:`` log lines (``log_interval_s``)."""
    return [rt.stats() for rt in _runtimes()]


def _server_backend() -> Any:
    try:
        from sglang.srt.runtime_context import get_server_args
        return getattr(get_server_args(), "sampling_backend", None)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------------------
# Patches (each installed when its module is imported)
# ---------------------------------------------------------------------------------------------------------
def _patch_choices(module) -> None:
    module.SAMPLING_BACKEND_CHOICES.add(BACKEND)


def _make_sampler():
    from ._sampler import make_sampler
    return make_sampler()


def _patch_sampler(module) -> None:
    if BACKEND not in getattr(module, "_CUSTOM_SAMPLER_FACTORIES", {}):
        module.register_sampler_backend(BACKEND, _make_sampler)


def attach(model_runner: Any) -> Any:
    """Attach the ESamp runtime to a model runner whose sampler is ESamp's (called after ``load_model``).
    Returns the runtime, or None (with one warning saying why) when ESamp stays inactive."""
    sampler = getattr(model_runner, "sampler", None)
    if type(sampler).__name__ != "ESampSampler":
        return None
    rt = sampler.esamp_runtime
    if rt is not None and rt.model is model_runner.model:
        return rt
    if getattr(model_runner, "is_draft_worker", False):
        sampler.esamp_disabled_reason = "draft model runner"
        return None
    cfg = sampler.esamp_config
    if cfg is None:
        logger.warning("ESamp: --sampling-backend esamp with ESamp switched off (%s=0 or \"enabled\": false); "
                       "sampling with SGLang's %r backend.", ENV_ENABLE, sampler.base_backend)
        return None
    from ._runtime import ESampRuntime, unsupported_reason
    reason = unsupported_reason(model_runner, model_runner.model, cfg, sampler)
    if reason is not None:
        logger.warning("ESamp is enabled (--sampling-backend esamp) but inactive: %s. Requests are sampled by "
                       "SGLang's %r backend.", reason, sampler.base_backend)
        sampler.esamp_disabled_reason = reason
        return None
    rt = ESampRuntime(cfg, model_runner, sampler)
    sampler.esamp_runtime = rt
    model_runner._esamp_runtime = rt
    return rt


def _patch_model_runner(module) -> None:
    cls = module.ModelRunner

    def make_load(orig):
        def load_model(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            attach(self)
            return out
        return load_model

    def make_sample(orig):
        def sample(self, logits_output, forward_batch, *args, **kwargs):
            rt = self.__dict__.get("_esamp_runtime")
            if rt is None:
                return orig(self, logits_output, forward_batch, *args, **kwargs)
            rt._fb = forward_batch
            try:
                return orig(self, logits_output, forward_batch, *args, **kwargs)
            finally:
                rt._fb = None
        return sample

    wrap(cls, "load_model", make_load)
    wrap(cls, "sample", make_sample)


def _last_chunk(req) -> bool:
    end = getattr(req, "extend_end", None)
    full = getattr(req, "full_untruncated_fill_ids", None)
    return end is None or full is None or end == len(full)


def _patch_forward_batch(module) -> None:
    def make(orig):
        def init_new(cls, batch, model_runner=None, *args, **kwargs):
            ret = orig(cls, batch, model_runner, *args, **kwargs)
            if getattr(model_runner, "_esamp_runtime", None) is not None:
                reqs = list(batch.reqs)
                ret._esamp_reqs = reqs
                ret._esamp_last_chunk = [_last_chunk(r) for r in reqs] if ret.forward_mode.is_extend() else None
            return ret
        return init_new

    wrap(module.ForwardBatch, "init_new", make)


def _patch_output_streamer(module) -> None:
    def make(orig):
        def stream_output(self, reqs, *args, **kwargs):
            out = orig(self, reqs, *args, **kwargs)
            for rt in _runtimes():
                rt.release_finished(reqs)
            return out
        return stream_output

    wrap(module.SchedulerOutputStreamer, "stream_output", make)


def _patch_scheduler(module) -> None:
    def make(orig):
        def send_abort_output(self, abort_req, req, *args, **kwargs):
            out = orig(self, abort_req, req, *args, **kwargs)
            for rt in _runtimes():
                rt.release(getattr(req, "rid", None))
            return out
        return send_abort_output

    wrap(module.Scheduler, "send_abort_output", make)


def _patch_sampling_params(module) -> None:
    def make(orig):
        def verify(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            if _server_backend() == BACKEND:
                try:
                    validate_custom_params(self.custom_params)
                except ConfigError as e:
                    raise ValueError(str(e)) from None
            return out
        return verify

    wrap(module.SamplingParams, "verify", make)


def tag_parallel_sample(tokenized_obj: Any, groups: Dict[int, list]) -> None:
    """Give the n samples of an ``n > 1`` request one ``esamp_group`` and their index (``esamp_index``) in
    ``custom_params``.  SGLang sends the n children with one shared SamplingParams object and fresh random rids; the
    prefix-warm-up request (``max_new_tokens == 0``) is left alone.  Each child gets its own copy."""
    import msgspec
    sp = getattr(tokenized_obj, "sampling_params", None)
    n = int(getattr(sp, "n", 1) or 1)
    if sp is None or n <= 1 or getattr(sp, "max_new_tokens", None) == 0:
        return
    cp = dict(sp.custom_params or {})
    if GROUP_KEY in cp and INDEX_KEY in cp:
        return
    entry = groups.get(id(sp))
    if entry is None or entry[0] is not sp:
        entry = [sp, cp.get(GROUP_KEY) or uuid.uuid4().hex, 0]
        groups[id(sp)] = entry
    cp[GROUP_KEY], cp[INDEX_KEY] = entry[1], entry[2]
    entry[2] += 1
    if entry[2] >= n:
        groups.pop(id(sp), None)
    tokenized_obj.sampling_params = msgspec.structs.replace(sp, custom_params=cp)


def _patch_tokenizer_manager(module) -> None:
    def make(orig):
        async def _send_one_request(self, tokenized_obj, *args, **kwargs):
            if getattr(getattr(self, "server_args", None), "sampling_backend", None) == BACKEND:
                try:
                    tag_parallel_sample(tokenized_obj, self.__dict__.setdefault("_esamp_n_groups", {}))
                except Exception:
                    logger.exception("esamp: could not tag an n > 1 request; its samples get separate slots")
            return await orig(self, tokenized_obj, *args, **kwargs)
        return _send_one_request

    wrap(module.TokenizerManager, "_send_one_request", make)


def register() -> None:
    """SGLang general-plugin entry point (idempotent; safe in every process)."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    try:  # surface a malformed ESAMP_SGLANG_CONFIG early; the engine start (sampler factory) fails on it
        resolve_engine_config()
    except ConfigError as e:
        logger.error("esamp: %s (an engine started with --sampling-backend esamp will refuse to start)", e)
    when_imported("sglang.srt.arg_groups.choices", _patch_choices)
    when_imported("sglang.srt.layers.sampler", _patch_sampler)
    when_imported("sglang.srt.model_executor.model_runner", _patch_model_runner)
    when_imported("sglang.srt.model_executor.forward_batch_info", _patch_forward_batch)
    when_imported("sglang.srt.managers.scheduler_components.output_streamer", _patch_output_streamer)
    when_imported("sglang.srt.managers.scheduler", _patch_scheduler)
    when_imported("sglang.srt.sampling.sampling_params", _patch_sampling_params)
    when_imported("sglang.srt.managers.tokenizer_manager", _patch_tokenizer_manager)
