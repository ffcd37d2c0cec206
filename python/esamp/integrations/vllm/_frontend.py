"""The front-end gate: a request that asks for ESamp is rejected, with an error naming the reason, when ESamp is
enabled for the engine but could not attach in its workers -- unless the engine config says ``"fallback": true``.

``LLMEngine.add_request`` (offline ``LLM``) and ``AsyncLLM.add_request`` (the OpenAI server) are wrapped.  On the
first request that asks for ESamp, the engine's workers are asked once for their status (``esamp_stats`` RPC,
``sync=False``); the answer is kept on the engine object.  The error is a ``VLLMValidationError`` (HTTP 400 in the
server) raised before the request enters the engine.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional, Tuple

from ._common import logger
from ._config import ConfigError, request_config, resolve_engine_config

_ATTR = "_esamp_gate"   # on the engine object: (active, reason) once known


def _params_of(args: tuple, kwargs: dict) -> Any:
    """The SamplingParams of an ``add_request(self, request_id, prompt, params, ...)`` call (``args`` without
    self)."""
    params = kwargs.get("params", args[2] if len(args) > 2 else None)
    prompt = kwargs.get("prompt", args[1] if len(args) > 1 else None)
    if params is None and prompt is not None:
        params = getattr(prompt, "sampling_params", None)
    return params


def asks_for_esamp(params: Any, additional_config: Any) -> Tuple[bool, Any]:
    """(whether this request would sample with ESamp on an engine where it is active, the engine config)."""
    if params is None or not hasattr(params, "temperature") or not hasattr(params, "extra_args"):
        return False, None  # pooling requests and the like
    try:
        cfg = resolve_engine_config(additional_config)
    except ConfigError:
        return False, None
    if cfg is None or float(params.temperature) < 1e-5:
        return False, cfg
    try:
        return request_config(params.extra_args, cfg).enabled, cfg
    except ConfigError:
        return False, cfg   # malformed entries are rejected by SamplingParams validation


def summarise(results: List[Any]) -> Tuple[bool, Optional[str]]:
    """(active, reason) from the workers' ``esamp_stats`` answers."""
    if not results:
        return False, "no worker answered the ESamp status query"
    for r in results:
        if not isinstance(r, dict) or not r:
            return False, ("ESamp is enabled for this engine but did not start in its workers (is the esamp plugin "
                           "installed in the workers' environment and ESAMP_VLLM not set to 0 there?)")
        if r.get("active") is False:
            return False, str(r.get("inactive_reason"))
    return True, None


def _reject(reason: str) -> None:
    msg = (f"ESamp was requested but is inactive on this engine: {reason}. Opt out per request "
           f"(extra_args {{\"esamp\": false}}, or \"vllm_xargs\": {{\"esamp\": \"off\"}}), or start the engine with "
           f"additional_config {{\"esamp\": {{\"fallback\": true}}}} to serve such requests without ESamp.")
    try:
        from vllm.exceptions import VLLMValidationError
    except ImportError:  # pragma: no cover - older vLLM
        raise ValueError(msg) from None
    raise VLLMValidationError(msg, parameter="extra_args")


def _decide(cfg: Any, state: Tuple[bool, Optional[str]]) -> None:
    active, reason = state
    if not active and not cfg.fallback:
        _reject(reason or "unknown reason")


def _query(results: Any) -> Tuple[bool, Optional[str]]:
    state = summarise(list(results) if results is not None else [])
    if not state[0]:
        logger.warning("ESamp: front end: ESamp is inactive on this engine (%s)", state[1])
    return state


def wrap_add_request(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def add_request(self, *args, **kwargs):
        wants, cfg = asks_for_esamp(_params_of(args, kwargs),
                                    getattr(getattr(self, "vllm_config", None), "additional_config", None))
        if wants:
            state = self.__dict__.get(_ATTR)
            if state is None:
                state = _query(self.collective_rpc("esamp_stats", kwargs={"sync": False}))
                self.__dict__[_ATTR] = state
            _decide(cfg, state)
        return orig(self, *args, **kwargs)

    add_request._esamp_wrapped = True  # type: ignore[attr-defined]
    return add_request


def wrap_add_request_async(orig: Callable) -> Callable:
    @functools.wraps(orig)
    async def add_request(self, *args, **kwargs):
        wants, cfg = asks_for_esamp(_params_of(args, kwargs),
                                    getattr(getattr(self, "vllm_config", None), "additional_config", None))
        if wants:
            state = self.__dict__.get(_ATTR)
            if state is None:
                state = _query(await self.collective_rpc("esamp_stats", kwargs={"sync": False}))
                self.__dict__[_ATTR] = state
            _decide(cfg, state)
        return await orig(self, *args, **kwargs)

    add_request._esamp_wrapped = True  # type: ignore[attr-defined]
    return add_request

