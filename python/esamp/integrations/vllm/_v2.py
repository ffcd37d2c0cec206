"""ESamp on vLLM's Model Runner V2 (``vllm.v1.worker.gpu.model_runner``).

Pieces, in the order vLLM calls them:
1. ``esamp_model_state_cls(base)`` -- a subclass of the model state vLLM resolved for the model
   (``DefaultModelState`` for Llama-like models).  Its constructor builds the engine-independent core
   (capture buffers and layer swaps, persistent trainer, slot manager) through a :class:`V2Adapter`; its
   ``add_request``/``remove_request`` drive the slot lifecycle; ``prepare_inputs`` remembers the step's
   ``InputBatch``; its ``custom_sampler`` wraps vLLM's sampler.
2. ``ESampSampler.add_request`` -- for a request with ESamp on, vLLM's sampler is given a copy of the
   SamplingParams with temperature 1 and no top-k/top-p/min-p (so vLLM's own stages only apply logits
   processors -- penalties, bias, bad words, grammar masks -- to that row); the real values are in the core's
   per-request table.
3. ``model.compute_logits`` (instance attribute): for the batch remembered in ``prepare_inputs``, the logits rows
   go to ``core.begin_step`` (warm start, prediction, latent mixing of the LM-head input of rows without a filter).
4. ``ESampSampler.__call__`` -- for the logits bound to the step, runs vLLM's sampler for the whole batch and,
   inside it (hook on ``Sampler.sample``), replaces the tokens of the ESamp rows by ``core.sample`` on the
   processed logits.  In processed-logprobs modes the processed logits of ESamp rows become the mixed logits m,
   so the logprob vLLM reports for the sampled token is ESamp's.  Then the distiller update is queued.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from .._core.capture import ComputeLogitsHook
from .._core.config import EngineConfig
from .._core.runtime import WarmInfo
from ._common import (PROCESSED_MODES, STATUS_ATTR, build_core, engine_adjusts_logits, logger, mark_inactive,
                      request_options, unsupported_reason)
from ._config import resolve_engine_config

RUNNER = "Model Runner V2"


class V2Adapter:
    """Translates Model Runner V2's request indices and InputBatch into the core's calls."""

    def __init__(self, cfg: EngineConfig, vllm_config: Any, model: nn.Module, device: torch.device,
                 max_num_reqs: int, max_num_tokens: int):
        self.cfg = cfg
        self.model = model
        self.core = build_core(cfg, vllm_config, model, device, max_num_reqs, max_num_tokens, name=RUNNER)
        self.logprobs_mode = getattr(vllm_config.model_config, "logprobs_mode", "raw_logprobs")
        self.engine_adjusts = engine_adjusts_logits(vllm_config)
        R = int(max_num_reqs)
        self.key_by_idx = np.full(R, -1, dtype=np.int64)   # request-state index -> core key (-1: no ESamp)
        self.req_id_by_idx: Dict[int, str] = {}
        self.idx_by_req_id: Dict[str, int] = {}
        self._pending: Dict[int, Any] = {}   # req_idx -> SamplingParams seen by ModelState.add_request
        self._batch = None                   # the InputBatch of the step being prepared
        self.disabled_reason: Optional[str] = None
        self.hook = ComputeLogitsHook(model, self._compute_logits)

    # ------------------------------------------------------------------ engine-facing attributes
    @property
    def counters(self):
        return self.core.counters

    @property
    def trainer(self):
        return self.core.trainer

    @property
    def capture_buffer(self):
        return self.core.capture_buffer

    @property
    def final_buffer(self):
        return self.core.final_buffer

    @property
    def slots(self):
        return self.core.slots

    @property
    def num_slots(self):
        return self.core.num_slots

    def stats(self, sync: bool = False) -> Dict[str, Any]:
        s = self.core.stats(sync)
        s.update(runner=RUNNER, disabled_reason=self.disabled_reason)
        return s

    def log_stats(self) -> None:
        self.core.log_stats()

    # Per request-state index views of the core's table (inspection and tests).
    def _by_idx(self, name: str, default) -> np.ndarray:
        keys = self.key_by_idx
        col = getattr(self.core.table, name)
        out = np.full(keys.shape[0], default, dtype=col.dtype)
        on = keys >= 0
        out[on] = col[keys[on]]
        return out

    @property
    def enabled(self) -> np.ndarray:
        return self.key_by_idx >= 0

    @property
    def slot(self) -> np.ndarray:
        return self._by_idx("slot", -1)

    @property
    def beta(self) -> np.ndarray:
        return self._by_idx("beta", 0.0)

    @property
    def temperature(self) -> np.ndarray:
        return self._by_idx("temperature", 1.0)

    @property
    def top_k(self) -> np.ndarray:
        return self._by_idx("top_k", 0)

    @property
    def warmup(self) -> np.ndarray:
        return self._by_idx("warmup", 0)

    @property
    def latent(self) -> np.ndarray:
        return self._by_idx("latent", False)

    def unbound_rows(self, input_batch: Any) -> int:
        """Rows of live ESamp requests in a batch whose logits were not produced by the step's LM-head call."""
        idx_np = np.asarray(getattr(input_batch, "idx_mapping_np", ()), dtype=np.int64)
        if idx_np.shape[0] == 0 or not self.core.key_of:
            return 0
        req_ids = input_batch.req_ids
        return sum(1 for r in np.flatnonzero(self.key_by_idx[idx_np] >= 0).tolist()
                   if self.req_id_by_idx.get(int(idx_np[r])) == req_ids[r])

    # ------------------------------------------------------------------ request lifecycle
    def add_request(self, req_idx: int, req_id: str, sampling_params: Any) -> None:
        self._drop_index(req_idx)
        self.req_id_by_idx[req_idx] = req_id
        self.idx_by_req_id[req_id] = req_idx
        if self.core.add_request(req_id, request_options(sampling_params, self.logprobs_mode, self.engine_adjusts)):
            self.key_by_idx[req_idx] = self.core.key_of[req_id]
            self._pending[req_idx] = sampling_params

    def _drop_index(self, req_idx: int) -> None:
        old = self.req_id_by_idx.pop(req_idx, None)
        if old is not None:
            self.idx_by_req_id.pop(old, None)
        self.key_by_idx[req_idx] = -1
        self._pending.pop(req_idx, None)

    def remove_request(self, req_id: str) -> None:
        req_idx = self.idx_by_req_id.get(req_id)
        if req_idx is None:
            return
        self._drop_index(req_idx)
        self.core.remove_request(req_id)

    def sampler_params(self, req_idx: int, sampling_params: Any) -> Any:
        """What vLLM's own sampler is told about request req_idx (see module docstring, step 2)."""
        pending = self._pending.pop(req_idx, None)
        if pending is None or pending is not sampling_params or self.key_by_idx[req_idx] < 0:
            return sampling_params  # a plain request, or a warm-up/dummy add_request
        neutral = copy.copy(sampling_params)
        neutral.temperature = 1.0
        neutral.top_k = 0
        neutral.top_p = 1.0
        neutral.min_p = 0.0
        return neutral

    # ------------------------------------------------------------------ sampling step
    def prepare(self, input_batch: Any) -> None:
        self._batch = input_batch

    def _compute_logits(self, orig, hidden_states, *args, **kwargs):
        ib, self._batch = self._batch, None
        core = self.core
        core.step = None
        hidden = hidden_states
        if ib is not None:
            hidden = self._begin(ib, hidden_states)
        logits = orig(hidden, *args, **kwargs)
        if core.step is not None:
            core.bind(logits)
            core.step.batch = ib
        return logits

    def _begin(self, ib: Any, hidden: torch.Tensor) -> torch.Tensor:
        core = self.core
        n = int(hidden.shape[0])
        idx_np = np.asarray(ib.idx_mapping_np)
        if getattr(ib, "num_draft_tokens", 0) or idx_np.shape[0] != n \
                or int(ib.logits_indices.shape[0]) != n:
            core.skip_step()
            return hidden
        keys = self.key_by_idx[idx_np]
        en = np.flatnonzero(keys >= 0)
        if en.shape[0]:
            req_ids = ib.req_ids
            bad = [r for r in en.tolist() if self.req_id_by_idx.get(int(idx_np[r])) != req_ids[r]]
            if bad:  # dummy/warm-up batches name requests that are not the live ones at those indices
                keys = keys.copy()
                keys[bad] = -1

        def warm_info() -> WarmInfo:
            qsl = np.asarray(ib.query_start_loc_np)
            n_sched = np.asarray(ib.num_scheduled_tokens)
            prefilling = np.asarray(ib.is_prefilling_np).astype(bool)
            done_before = np.asarray(ib.num_computed_prefill_tokens_np)
            prefill_len = np.asarray(ib.prefill_len_np)
            return WarmInfo(start=qsl[:n], end=qsl[1:n + 1],
                            completes=prefilling & (done_before + n_sched >= prefill_len), partial=done_before > 0)

        positions = ib.positions.index_select(0, ib.logits_indices)
        return core.begin_step(keys, hidden, ib.logits_indices, positions, warm_info)


class ESampSampler:
    """Wraps vLLM's V2 ``Sampler``: same interface (attributes are forwarded), ESamp rows resampled."""

    def __init__(self, base: Any, adapter: V2Adapter):
        self._base = base
        self._ad = adapter
        self._active = None
        adapter.logprobs_mode = getattr(base, "logprobs_mode", None) or adapter.logprobs_mode
        core = adapter.core
        orig_sample = base.sample

        def sample(logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos, *args, **kwargs):
            sampled, processed = orig_sample(logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos,
                                             *args, **kwargs)
            step, self._active = self._active, None
            if step is None:
                return sampled, processed
            r = step.rows
            want = bool(kwargs.get("return_logprobs", False)) and getattr(base, "logprobs_mode", None) \
                in PROCESSED_MODES
            tokens, mixed = core.sample(step, processed.index_select(0, r), want_mixed=want)
            if want:
                processed = processed.to(torch.float32, copy=True)
                processed.index_copy_(0, r, mixed)
            sampled = sampled.clone()
            sampled.index_copy_(0, r, tokens.to(sampled.dtype))
            return sampled, processed

        base.sample = sample  # instance attribute: Sampler.__call__ calls self.sample(...)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    @property
    def base(self) -> Any:
        return self._base

    def add_request(self, req_idx: int, sampling_params: Any) -> None:
        self._base.add_request(req_idx, self._ad.sampler_params(req_idx, sampling_params))

    def __call__(self, logits: torch.Tensor, input_batch: Any):
        core = self._ad.core
        step = core.step_for(logits)
        if step is None or getattr(step, "batch", None) is not input_batch:
            # ESamp rows whose LM-head input is unknown (logits from elsewhere) are sampled by vLLM; count them.
            core.counters["rows_no_lm_input"] += self._ad.unbound_rows(input_batch)
            return self._base(logits, input_batch)
        self._active = step
        try:
            out = self._base(logits, input_batch)
        finally:
            self._active = None
        core.end_step(step)
        return out


_STATE_CLASSES: Dict[type, type] = {}


def esamp_model_state_cls(base: type) -> type:
    """A subclass of vLLM's resolved ModelState class that runs ESamp (built once per base class)."""
    if getattr(base, "_esamp_model_state", False):
        return base
    cls = _STATE_CLASSES.get(base)
    if cls is not None:
        return cls

    def __init__(self, vllm_config, model, encoder_cache, device):
        base.__init__(self, vllm_config, model, encoder_cache, device)
        self.esamp = None
        cfg = resolve_engine_config(vllm_config.additional_config)
        if cfg is None:
            return
        reason = unsupported_reason(vllm_config, model, cfg)
        if reason is None:
            try:
                self.esamp = V2Adapter(cfg, vllm_config, model, device, self.max_num_reqs, self.max_num_tokens)
            except Exception as e:  # never break vLLM: report, and reject ESamp requests (unless fallback)
                logger.exception("ESamp: attaching to %s failed", base.__name__)
                reason = f"attaching to {base.__name__} failed ({type(e).__name__}: {e})"
        if reason is not None:
            mark_inactive(self, cfg, reason, RUNNER)
            return
        setattr(self, STATUS_ATTR, self.esamp)

    def add_request(self, req_index, new_req_data):
        base.add_request(self, req_index, new_req_data)
        if self.esamp is not None:
            self.esamp.add_request(req_index, new_req_data.req_id, new_req_data.sampling_params)

    def remove_request(self, req_id):
        if self.esamp is not None:
            self.esamp.remove_request(req_id)
        base.remove_request(self, req_id)

    def prepare_inputs(self, input_batch, *args, **kwargs):
        out = base.prepare_inputs(self, input_batch, *args, **kwargs)
        if self.esamp is not None:
            self.esamp.prepare(input_batch)
        return out

    def custom_sampler(self, sampler):
        other = base.custom_sampler(self, sampler)
        if self.esamp is None:
            return other
        if other is not None:
            self.esamp.disabled_reason = "another custom sampler"
            self.esamp.hook.remove()
            cfg = self.esamp.cfg
            self.esamp = None
            mark_inactive(self, cfg, f"the model state {base.__name__} already replaces the sampler", RUNNER)
            return other
        return ESampSampler(sampler, self.esamp), None

    cls = type(f"ESamp{base.__name__}", (base,), {
        "__init__": __init__, "add_request": add_request, "remove_request": remove_request,
        "prepare_inputs": prepare_inputs, "custom_sampler": custom_sampler, "_esamp_model_state": True,
        "__module__": __name__,
    })
    _STATE_CLASSES[base] = cls
    return cls


def worker_stats_of_state(state: Any) -> Dict[str, Any]:
    st = getattr(state, STATUS_ATTR, None)
    return st.stats() if st is not None else {}


__all__ = ["V2Adapter", "ESampSampler", "esamp_model_state_cls", "logger"]
