"""What the vLLM V1-runner and V2-runner adapters share: vLLM's conventions (request groups, sampling parameters,
tensor parallelism, configurations ESamp cannot run with), building the engine-independent core for a loaded
model, and the per-worker status (active, or inactive with the reason)."""
from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn

from .._core.capture import find_decoder
from .._core.config import EngineConfig
from .._core.runtime import ESampCore, RequestOptions
from ._config import ADDITIONAL_CONFIG_KEY

logger = logging.getLogger("vllm.esamp")  # a child of vLLM's logger: same handler and level

PROCESSED_MODES = ("processed_logprobs", "processed_logits")
RAW_MODES = ("raw_logprobs", "raw_logits")
STATUS_ATTR = "_esamp_status"   # on a V1 model runner or a V2 model state: the adapter, or an Inactive record

# vLLM's parallel sampling (SamplingParams.n > 1) fans a request out into child requests whose ids are
# f"{index}_{parent_request_id}" (vllm/v1/engine/parallel_sampling.py).  The parent id carries a random
# suffix, so two unrelated requests never share a group key.
_CHILD_ID = re.compile(r"^(\d+)_(.+)$")


def group_key(req_id: str) -> str:
    m = _CHILD_ID.match(req_id)
    return m.group(2) if m else req_id


def unsupported_reason(vllm_config: Any, model: nn.Module, cfg: EngineConfig) -> Optional[str]:
    """Why ESamp cannot run with this engine configuration (None when it can)."""
    pc = vllm_config.parallel_config
    mc = vllm_config.model_config
    if vllm_config.speculative_config is not None:
        return "speculative decoding is configured (the rejection sampler is not ESamp-aware)"
    if getattr(pc, "pipeline_parallel_size", 1) > 1:
        return "pipeline parallelism (layer 0 and the LM head live on different ranks)"
    if getattr(pc, "prefill_context_parallel_size", 1) > 1:
        return "prefill context parallelism"
    if getattr(pc, "enable_batch_sharded_sampling", False):
        return "batch-sharded sampling"
    if getattr(vllm_config, "watermark_config", None) is not None:
        return "watermarking (needs vLLM's own sampler)"
    if getattr(mc, "runner_type", "generate") != "generate":
        return f"runner type {mc.runner_type!r} (ESamp needs a generation model)"
    lp = getattr(model, "logits_processor", None)
    if lp is not None and (getattr(lp, "soft_cap", None) is not None or getattr(lp, "scale", 1.0) != 1.0):
        return "the model scales or soft-caps its logits (distiller logits would need the same transform)"
    if getattr(lp, "logits_as_input", False):
        return "the model's logits processor takes logits as input"
    head = getattr(model, "lm_head", None)
    w = getattr(head, "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        return "the LM head has no plain floating-point weight [V, H] (quantized or missing)"
    dec = find_decoder(model)
    if dec is None:
        return "no decoder layer list (a 'layers' ModuleList beside 'start_layer') was found in the model"
    if not 0 <= cfg.capture_layer < len(dec.layers):
        return f"capture_layer {cfg.capture_layer} is out of range for {len(dec.layers)} decoder layers"
    return None


def engine_adjusts_logits(vllm_config: Any) -> bool:
    """Whether the engine runs custom logits processors (which may change logit values of any request)."""
    return bool(getattr(vllm_config.model_config, "logits_processors", None))


def request_options(sp: Any, logprobs_mode: Optional[str], engine_adjusts: bool = False) -> Optional[RequestOptions]:
    """vLLM SamplingParams -> the core's RequestOptions (None for requests that sample nothing, e.g. pooling)."""
    if sp is None:
        return None
    wants_logprobs = sp.logprobs is not None or bool(getattr(sp, "logprob_token_ids", None))
    adjusts = (engine_adjusts or bool(getattr(sp, "logit_bias", None))
               or float(getattr(sp, "presence_penalty", 0.0) or 0.0) != 0.0
               or float(getattr(sp, "frequency_penalty", 0.0) or 0.0) != 0.0
               or float(getattr(sp, "repetition_penalty", 1.0) or 1.0) != 1.0)
    return RequestOptions(temperature=float(sp.temperature), top_k=int(sp.top_k or 0), top_p=float(sp.top_p),
                          min_p=float(sp.min_p), seed=sp.seed, extra_args=getattr(sp, "extra_args", None),
                          needs_raw_logits=wants_logprobs and (logprobs_mode or "raw_logprobs") in RAW_MODES,
                          adjusts_logits=adjusts)


def build_core(cfg: EngineConfig, vllm_config: Any, model: nn.Module, device: Any, max_num_reqs: int,
               max_num_tokens: int, name: str) -> ESampCore:
    """The core for a loaded model (capture points installed), with vLLM's tensor-parallel group wired in."""
    mc = vllm_config.model_config
    hidden_size = int(mc.get_hidden_size())
    dtype = mc.dtype if isinstance(mc.dtype, torch.dtype) else torch.float32
    tp_size = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1))
    tp_rank = 0
    broadcast: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    w = model.lm_head.weight
    if tp_size > 1:
        # Every TP rank samples the same batch; rank 0 runs the distiller and the reweight and broadcasts the
        # ESamp rows' tokens (and, for latent mixing, t_hat) so that all ranks continue identically.
        from vllm.distributed import (get_tensor_model_parallel_rank, get_tp_group,
                                      tensor_model_parallel_all_gather)
        tp_rank = int(get_tensor_model_parallel_rank())
        w = tensor_model_parallel_all_gather(w.data.contiguous(), dim=0)
        if tp_rank != 0:
            w = None

        def _broadcast(t: torch.Tensor) -> torch.Tensor:
            return get_tp_group().broadcast(t.contiguous(), src=0)
        broadcast = _broadcast
    vocab = int(getattr(mc, "get_vocab_size", lambda: w.shape[0] if w is not None else 0)())
    core = ESampCore(cfg, decoder=find_decoder(model), lm_head_weight=w, hidden_size=hidden_size, dtype=dtype,
                     device=device, max_num_reqs=max_num_reqs, max_num_tokens=max_num_tokens, vocab_size=vocab,
                     group_of=group_key, tp_rank=tp_rank, tp_size=tp_size, broadcast=broadcast, logger=logger,
                     name=name)
    # Enter the compile-cache key: vLLM hashes additional_config, not our env vars, and an AOT artifact compiled
    # without the capture node must never be loaded into a model that has it (or vice versa).
    ac = vllm_config.additional_config
    capture = "esamp::capture@layer%d" % cfg.capture_layer
    if core.final_buffer is not None:
        capture += "+final_norm"
    if isinstance(ac, dict):
        ac[ADDITIONAL_CONFIG_KEY] = dict(cfg.to_dict(), _capture=capture)
    else:
        logger.warning("ESamp: additional_config is not a dict, so the compile cache key cannot record the "
                       "capture point; set VLLM_DISABLE_COMPILE_CACHE=1 when toggling ESamp.")
    logger.info("ESamp enabled (%s): %s", name, core.describe())
    return core


class Inactive:
    """ESamp is enabled for the engine but could not attach in this worker."""

    def __init__(self, reason: str, fallback: bool, runner: str):
        self.reason, self.fallback, self.runner = reason, bool(fallback), runner

    def stats(self, sync: bool = False) -> Dict[str, Any]:
        return {"active": False, "inactive_reason": self.reason, "fallback": self.fallback, "runner": self.runner}


def mark_inactive(owner: Any, cfg: EngineConfig, reason: str, runner: str) -> Inactive:
    """Records (on ``owner``) and announces, loudly and once per worker, that ESamp cannot attach."""
    status = Inactive(reason, cfg.fallback, runner)
    setattr(owner, STATUS_ATTR, status)
    logger.warning("ESamp is enabled but INACTIVE in this worker (%s): %s. Requests that ask for ESamp %s.", runner,
                   reason, "are served by vLLM's own sampler (fallback: true)" if cfg.fallback else
                   "are rejected with an error (set additional_config {\"esamp\": {\"fallback\": true}} to serve "
                   "them without ESamp)")
    return status


def status_of(worker: Any) -> Any:
    """The ESamp status object of a vLLM worker (an adapter or an Inactive record), or None."""
    runner = getattr(worker, "model_runner", None)
    for owner in (runner, getattr(runner, "model_state", None)):
        st = getattr(owner, STATUS_ATTR, None) if owner is not None else None
        if st is not None:
            return st
    return None
