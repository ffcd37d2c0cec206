"""The ESamp runtime inside one vLLM worker (Model Runner V2).

Pieces, in the order vLLM calls them:
1. ``esamp_model_state_cls(base)`` -- a subclass of the model state vLLM resolved for the model
   (``DefaultModelState`` for Llama-like models).  Its constructor builds an :class:`ESampRuntime`
   (capture buffer + layer swap, LM-head input recorder, persistent trainer, slot manager); its
   ``add_request``/``remove_request`` drive the slot lifecycle; its ``custom_sampler`` wraps vLLM's sampler.
2. ``ESampSampler.add_request`` -- for a request with ESamp on, vLLM's sampler is given a copy of the
   SamplingParams with temperature 1 and no top-k/top-p/min-p (so vLLM's own stages only apply logits
   processors -- penalties, bias, bad words, grammar masks -- to that row); the real values go to ESamp's
   per-request table.
3. ``ESampSampler.__call__`` -- selects the rows of live ESamp requests, runs vLLM's sampler for the whole
   batch and, inside it (hook on ``Sampler.sample``), replaces the tokens of the ESamp rows by
   ``esamp.ops.reweight`` on the processed logits, with the request's seed and the token position as the
   Philox (seed, step).  Rows without ESamp keep vLLM's tokens.  In processed-logprobs modes the processed
   logits of ESamp rows become the mixed logits m (``reweight_logits``), so the logprob vLLM reports for the
   sampled token is ESamp's (the distribution actually sampled from).  After sampling, the rows' (x, t)
   pairs are queued on the persistent trainer.
4. Warm start (SPEC 2, ``warmup_steps``): in the step where a request's prefill completes (its first sampled
   token), before anything is predicted for it, its slot takes ``warmup_steps`` optimizer steps on the (x, t)
   pairs of the prompt positions computed in that step: x from the layer-0 capture, t from a second capture on
   the decoder's final norm (the LM-head input of every scheduled token).  Once per request group (n > 1
   children share it); with chunked prefill or a prefix-cache hit only the positions computed in that step
   are in the buffers, and at most ``warmup_max_rows`` (the last ones) are used.
"""
from __future__ import annotations

import copy
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

import esamp

from ._capture import LMHeadInputRecorder, find_decoder, install_layer_capture
from ._config import ADDITIONAL_CONFIG_KEY, ConfigError, EngineConfig, request_config, resolve_engine_config
from ._slots import SlotManager, group_key

logger = logging.getLogger("vllm.esamp")  # a child of vLLM's logger: same handler and level

_RUNTIMES: "weakref.WeakSet[ESampRuntime]" = weakref.WeakSet()
PROCESSED_MODES = ("processed_logprobs", "processed_logits")


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


def final_norm_unsupported_reason(decoder: nn.Module) -> Optional[str]:
    """Why the LM-head input of every token cannot be captured at ``decoder.norm`` (None when it can)."""
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module):
        return "the decoder has no final 'norm' module"
    if type(norm).__name__ == "PPMissingLayer" or type(norm).forward is nn.Module.forward:
        return f"the decoder's final norm ({type(norm).__name__}) has no forward of its own"
    return None


@dataclass
class _Step:
    rows_np: np.ndarray           # logit-row indices of ESamp rows
    rows: torch.Tensor            # same, int64 on device
    req_idx: np.ndarray           # request-state indices of those rows
    lm_in: torch.Tensor           # LM-head input of every logit row [n, H]
    logits_indices: torch.Tensor  # token index of every logit row [n]
    x: Optional[torch.Tensor] = None
    t: Optional[torch.Tensor] = None
    slots: Optional[torch.Tensor] = None
    done: bool = False


class ESampRuntime:
    def __init__(self, cfg: EngineConfig, vllm_config: Any, model: nn.Module, device: torch.device,
                 max_num_reqs: int, max_num_tokens: int):
        self.cfg = cfg
        self.device = torch.device(device)
        self.max_num_reqs = int(max_num_reqs)
        mc = vllm_config.model_config
        self.hidden_size = int(mc.get_hidden_size())
        self.dtype = mc.dtype if isinstance(mc.dtype, torch.dtype) else torch.float32

        # Tensor parallelism: every TP rank samples the same batch; rank 0 runs the distiller and the
        # reweight and broadcasts the ESamp rows' tokens so that all ranks feed identical tokens back.
        self.tp_size = int(getattr(vllm_config.parallel_config, "tensor_parallel_size", 1))
        self.tp_rank = 0
        if self.tp_size > 1:
            from vllm.distributed import get_tensor_model_parallel_rank
            self.tp_rank = int(get_tensor_model_parallel_rank())
        self.is_driver = self.tp_rank == 0

        # LM-head weight [V, H] (vocab padding rows are sliced off per step).
        w = model.lm_head.weight
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_gather
            w = tensor_model_parallel_all_gather(w.data.contiguous(), dim=0)
            if not self.is_driver:
                w = None
        self.lm_head_weight = w.detach() if w is not None else None

        # Layer-0 residual capture into a persistent buffer (one row per scheduled token).
        decoder = find_decoder(model)
        self.capture_buffer = torch.zeros(int(max_num_tokens), self.hidden_size, dtype=self.dtype,
                                          device=self.device)
        self.capture_layer = decoder.layers[cfg.capture_layer]
        install_layer_capture(self.capture_layer, self.capture_buffer)
        self.recorder = LMHeadInputRecorder(model)

        # Warm start: the LM-head input of every scheduled token, captured at the decoder's final norm.
        self.final_buffer: Optional[torch.Tensor] = None
        self.final_norm: Optional[nn.Module] = None
        self.warmup_reason: Optional[str] = None     # why warm start is unavailable (None: available or off)
        self._warmup_checked = False
        if cfg.warmup_steps > 0:
            self.warmup_reason = final_norm_unsupported_reason(decoder)
            if self.warmup_reason is None:
                self.final_norm = decoder.norm
                self.final_buffer = torch.zeros(int(max_num_tokens), self.hidden_size, dtype=self.dtype,
                                                device=self.device)
                install_layer_capture(self.final_norm, self.final_buffer, mode="first")
            else:
                logger.warning("ESamp: warm start is unavailable (%s); requests run without it.",
                               self.warmup_reason)
        self.warmup_max_rows = min(cfg.warmup_max_rows, int(max_num_tokens))

        # Distiller bank + persistent trainer (driver rank only).
        self.num_slots = cfg.resolved_slots(max_num_reqs)
        self.rank = cfg.resolved_rank()
        self.trainer: Optional[esamp.Trainer] = None
        if self.is_driver:
            norm = getattr(decoder, "norm", None)
            gamma = getattr(norm, "weight", None)
            gamma = gamma.detach().float() if isinstance(gamma, torch.Tensor) and gamma.dim() == 1 \
                and gamma.shape[0] == self.hidden_size else None
            ring = cfg.ring_rows if cfg.ring_rows > 0 else max(64, self.max_num_reqs)
            if self.final_buffer is not None:
                if cfg.ring_rows <= 0:
                    ring = max(ring, self.warmup_max_rows)
                self.warmup_max_rows = min(self.warmup_max_rows, ring)
            self.trainer = esamp.Trainer(self.hidden_size, rank=self.rank, layers=cfg.layers, slots=self.num_slots,
                                         lr=cfg.lr, adam_eps=cfg.adam_eps, clip=cfg.clip, device=self.device,
                                         seed=cfg.seed, ring_rows=ring, gamma_init=gamma)
        self.slots = SlotManager(self.num_slots, shared=cfg.mode == "shared",
                                 on_reset=self._reset_slots)

        # Per-request table, indexed by vLLM's request-state index.
        R = self.max_num_reqs
        self.enabled = np.zeros(R, dtype=bool)
        self.beta = np.zeros(R, dtype=np.float32)
        self.temperature = np.ones(R, dtype=np.float32)
        self.top_k = np.zeros(R, dtype=np.int64)
        self.top_p = np.ones(R, dtype=np.float32)
        self.min_p = np.zeros(R, dtype=np.float32)
        self.slot = np.full(R, -1, dtype=np.int64)
        self.warmup = np.zeros(R, dtype=np.int64)      # warm-start steps of the request (0: none)
        self._group_members: Dict[str, set] = {}       # ESamp request groups alive -> their request ids
        self._warmed_groups: set = set()               # groups whose slot already had its warm start
        self.req_id_by_idx: Dict[int, str] = {}
        self.idx_by_req_id: Dict[str, int] = {}
        self._pending: Dict[int, Any] = {}   # req_idx -> SamplingParams seen by ModelState.add_request

        self.counters: Dict[str, int] = {
            "requests_esamp": 0, "requests_plain": 0, "requests_no_slot": 0, "requests_finished": 0,
            "steps": 0, "rows_esamp": 0, "rows_plain": 0, "rows_no_lm_input": 0, "steps_skipped": 0,
            "warmup_groups": 0, "warmup_rows": 0, "warmup_updates": 0, "warmup_row_updates": 0,
            "warmup_shared": 0, "warmup_partial": 0, "warmup_truncated": 0, "warmup_unavailable": 0,
        }
        self._step: Optional[_Step] = None
        self._last_log = time.monotonic()
        self.disabled_reason: Optional[str] = None

        # Enter the compile-cache key: vLLM hashes additional_config, not our env vars, and an AOT artifact
        # compiled without the capture node must never be loaded into a model that has it (or vice versa).
        ac = vllm_config.additional_config
        capture = "esamp::capture@layer%d" % cfg.capture_layer
        if self.final_buffer is not None:
            capture += "+final_norm"
        if isinstance(ac, dict):
            ac[ADDITIONAL_CONFIG_KEY] = dict(cfg.to_dict(), _capture=capture)
        else:
            logger.warning("ESamp: additional_config is not a dict, so the compile cache key cannot record the "
                           "capture point; set VLLM_DISABLE_COMPILE_CACHE=1 when toggling ESamp.")
        _RUNTIMES.add(self)
        per_slot = self.trainer.nbytes_per_slot if self.trainer is not None else 0
        logger.info("ESamp enabled: mode=%s slots=%d rank=%d layers=%d beta=%.3g capture=layer %d "
                    "(buffer %d x %d %s), warm start %s, distiller bank %.1f MiB, tp_rank=%d/%d",
                    cfg.mode, self.num_slots, self.rank, cfg.layers, cfg.beta, cfg.capture_layer,
                    self.capture_buffer.shape[0], self.hidden_size, str(self.dtype).replace("torch.", ""),
                    ("%d steps, <= %d rows" % (cfg.warmup_steps, self.warmup_max_rows))
                    if self.final_buffer is not None else "off",
                    per_slot * self.num_slots / 2**20, self.tp_rank, self.tp_size)

    # ------------------------------------------------------------------ request lifecycle
    def _reset_slots(self, slots: List[int]) -> None:
        if self.trainer is not None:
            self.trainer.reset(slots)

    def add_request(self, req_idx: int, req_id: str, sampling_params: Any) -> None:
        self._drop_index(req_idx)
        self.req_id_by_idx[req_idx] = req_id
        self.idx_by_req_id[req_id] = req_idx
        if sampling_params is None:
            return
        try:
            rc = request_config(getattr(sampling_params, "extra_args", None), self.cfg)
        except ConfigError as e:  # validated at SamplingParams construction; never crash the worker here
            logger.warning("ESamp: request %s: %s; sampling it without ESamp", req_id, e)
            rc = None
        greedy = float(sampling_params.temperature) < 1e-5
        if rc is None or not rc.enabled or greedy:
            self.counters["requests_plain"] += 1
            return
        slot = self.slots.acquire(req_id)
        if slot < 0:
            self.counters["requests_no_slot"] += 1
            self.counters["requests_plain"] += 1
            return
        self.enabled[req_idx] = True
        self.beta[req_idx] = rc.beta
        self.temperature[req_idx] = float(sampling_params.temperature)
        k = int(sampling_params.top_k)
        self.top_k[req_idx] = k if k > 0 else 0
        self.top_p[req_idx] = float(sampling_params.top_p)
        self.min_p[req_idx] = float(sampling_params.min_p)
        self.slot[req_idx] = slot
        self.warmup[req_idx] = self.cfg.warmup_steps if rc.warmup_steps is None else rc.warmup_steps
        self._group_members.setdefault(group_key(req_id), set()).add(req_id)
        self._pending[req_idx] = sampling_params
        self.counters["requests_esamp"] += 1

    def _drop_index(self, req_idx: int) -> None:
        old = self.req_id_by_idx.pop(req_idx, None)
        if old is not None:
            self.idx_by_req_id.pop(old, None)
        self.enabled[req_idx] = False
        self.slot[req_idx] = -1
        self.warmup[req_idx] = 0
        self._pending.pop(req_idx, None)

    def remove_request(self, req_id: str) -> None:
        req_idx = self.idx_by_req_id.get(req_id)
        if req_idx is None:
            return
        was_esamp = bool(self.enabled[req_idx])
        self._drop_index(req_idx)
        if was_esamp:
            self.slots.release(req_id)
            self.counters["requests_finished"] += 1
            g = group_key(req_id)
            members = self._group_members.get(g)
            if members is not None:
                members.discard(req_id)
                if not members:  # the group's slot is reset now: its next owner gets its own warm start
                    del self._group_members[g]
                    self._warmed_groups.discard(g)

    def sampler_params(self, req_idx: int, sampling_params: Any) -> Any:
        """What vLLM's own sampler is told about request req_idx (see module docstring, step 2)."""
        pending = self._pending.pop(req_idx, None)
        if pending is None or pending is not sampling_params or not self.enabled[req_idx]:
            return sampling_params  # a plain request, or a warm-up/dummy add_request
        neutral = copy.copy(sampling_params)
        neutral.temperature = 1.0
        neutral.top_k = 0
        neutral.top_p = 1.0
        neutral.min_p = 0.0
        return neutral

    # ------------------------------------------------------------------ sampling
    def begin_step(self, logits: torch.Tensor, input_batch: Any) -> Optional[_Step]:
        n = logits.shape[0]
        lm_in = self.recorder.take(logits)
        idx_np = np.asarray(input_batch.idx_mapping_np)
        if getattr(input_batch, "num_draft_tokens", 0) or idx_np.shape[0] != n:
            self.counters["steps_skipped"] += 1
            return None
        en = self.enabled[idx_np]
        if not en.any():
            self.counters["rows_plain"] += n
            return None
        req_ids = input_batch.req_ids
        rows = [r for r in np.flatnonzero(en).tolist()
                if self.req_id_by_idx.get(int(idx_np[r])) == req_ids[r]]  # dummy/warm-up batches match none
        self.counters["rows_plain"] += n - len(rows)
        if not rows:
            return None
        if lm_in is None:
            self.counters["rows_no_lm_input"] += len(rows)
            return None
        rows_np = np.asarray(rows, dtype=np.int64)
        if self.trainer is not None and self.warmup[idx_np[rows_np]].any():
            self._warm_start(rows_np, idx_np, input_batch, lm_in)
        return _Step(rows_np=rows_np, rows=torch.from_numpy(rows_np).to(logits.device),
                     req_idx=idx_np[rows_np], lm_in=lm_in, logits_indices=input_batch.logits_indices)

    # ------------------------------------------------------------------ warm start
    def _warm_start(self, rows_np: np.ndarray, idx_np: np.ndarray, input_batch: Any, lm_in: torch.Tensor) -> None:
        """Queue the warm-start updates of the rows whose prefill completes in this step (driver rank)."""
        try:
            qsl = np.asarray(input_batch.query_start_loc_np)
            n_sched = np.asarray(input_batch.num_scheduled_tokens)
            prefilling = np.asarray(input_batch.is_prefilling_np)
            done_before = np.asarray(input_batch.num_computed_prefill_tokens_np)
            prefill_len = np.asarray(input_batch.prefill_len_np)
        except AttributeError as e:  # an InputBatch layout this adapter does not know
            self._disable_warm_start(f"the input batch lacks {e.name if hasattr(e, 'name') else e}")
            return
        # Vectorised first: on a decode step no row completes its prefill and nothing below runs per row.
        completes = ((self.warmup[idx_np[rows_np]] > 0) & prefilling[rows_np].astype(bool)
                     & (done_before[rows_np] + n_sched[rows_np] >= prefill_len[rows_np]))
        if not completes.any():
            return  # no warm start, decode rows, or prefill chunks before the last one
        jobs = []  # (steps, first token, end token, slot, request-state index)
        in_step: Dict[str, int] = {}  # group -> index in jobs of the member warming it in this step
        for r in rows_np[completes].tolist():
            ri = int(idx_np[r])
            steps = int(self.warmup[ri])
            if self.final_buffer is None:
                self.counters["warmup_unavailable"] += 1
                continue
            g = group_key(self.req_id_by_idx[ri])
            if g in self._warmed_groups:
                self.counters["warmup_shared"] += 1  # an n > 1 sibling already warmed the group's slot
                continue
            start, end = int(qsl[r]), int(qsl[r + 1])
            job = (steps, start, end, int(self.slot[ri]), ri, bool(done_before[r] > 0))
            j = in_step.get(g)
            if j is not None:  # siblings completing together: the one with the most prompt rows computed here
                self.counters["warmup_shared"] += 1
                if end - start > jobs[j][2] - jobs[j][1]:
                    jobs[j] = job
                continue
            in_step[g] = len(jobs)
            jobs.append(job)
        if not jobs:
            return
        for i, (steps, start, end, slot, ri, partial) in enumerate(jobs):
            self._warmed_groups.add(group_key(self.req_id_by_idx[ri]))
            if partial:
                self.counters["warmup_partial"] += 1
            if end - start > self.warmup_max_rows:
                start = end - self.warmup_max_rows
                self.counters["warmup_truncated"] += 1
            jobs[i] = (steps, start, end, slot, ri)
        if not self._warmup_checked and not self._check_final_capture(rows_np, input_batch, lm_in):
            for *_, ri in jobs:
                self._warmed_groups.discard(group_key(self.req_id_by_idx[ri]))
            self.counters["warmup_unavailable"] += len(jobs)
            return
        dev = self.capture_buffer.device
        # Requests with the same step count share updates (slots are independent), in batches of at most the
        # trainer's ring capacity, in batch order.
        by_steps: Dict[int, List[List[tuple]]] = {}
        for job in jobs:
            bins = by_steps.setdefault(job[0], [[]])
            if sum(j[2] - j[1] for j in bins[-1]) + (job[2] - job[1]) > self.warmup_max_rows:
                bins.append([])
            bins[-1].append(job)
        for steps, bins in by_steps.items():
            for b in bins:
                idx = torch.from_numpy(np.concatenate([np.arange(j[1], j[2], dtype=np.int64) for j in b])).to(dev)
                slots = torch.from_numpy(np.concatenate([np.full(j[2] - j[1], j[3], dtype=np.int64)
                                                         for j in b])).to(dev)
                x = self.capture_buffer.index_select(0, idx)
                t = self.final_buffer.index_select(0, idx)
                for _ in range(steps):
                    self.trainer.observe(x, t, slots)
                n = int(idx.shape[0])
                self.counters["warmup_updates"] += steps
                self.counters["warmup_row_updates"] += steps * n
                self.counters["warmup_rows"] += n
                self.counters["warmup_groups"] += len(b)

    def _check_final_capture(self, rows_np: np.ndarray, input_batch: Any, lm_in: torch.Tensor) -> bool:
        """Once: the final-norm capture must match the LM-head input at the logit rows (else the model applies
        something between its final norm and the LM head, and warm start is turned off).  Matching is up to a
        relative L2 error of 1e-2 (one host sync), so that a compiled graph that recomputes the norm for its
        output in another kernel (rounding differences) still passes, while any real transform fails."""
        self._warmup_checked = True
        r = torch.from_numpy(rows_np).to(lm_in.device)
        tok = input_batch.logits_indices.index_select(0, r)
        got = self.final_buffer.index_select(0, tok.to(self.final_buffer.device)).float()
        want = lm_in.index_select(0, r).float()
        if got.shape == want.shape and bool(torch.linalg.vector_norm(got - want)
                                            <= 1e-2 * torch.linalg.vector_norm(want)):
            return True
        self._disable_warm_start("the decoder's final-norm output is not the LM-head input of this model")
        return False

    def _disable_warm_start(self, reason: str) -> None:
        logger.warning("ESamp: warm start is unavailable (%s); requests run without it.", reason)
        self.warmup_reason = reason
        self.final_buffer = None

    def _row_params(self, req_idx: np.ndarray, device: torch.device):
        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a[req_idx])).to(device)
        return (t(self.beta), t(self.temperature), t(self.top_k), t(self.top_p), t(self.min_p))

    def apply(self, step: _Step, base: Any, sampled: torch.Tensor, processed: torch.Tensor,
              idx_mapping: torch.Tensor, pos: torch.Tensor, return_logprobs: bool):
        """Replace the ESamp rows' tokens (called inside vLLM's Sampler.sample, see ESampSampler)."""
        r = step.rows
        dev = processed.device
        num_rows = int(r.shape[0])
        tokens = None
        if self.is_driver:
            l = processed.index_select(0, r)
            V = l.shape[1]
            W = self.lm_head_weight[:V]
            x = self.capture_buffer.index_select(0, step.logits_indices.index_select(0, r))
            t = step.lm_in.index_select(0, r)
            slots = torch.from_numpy(self.slot[step.req_idx]).to(dev)
            pred = self.trainer.predict(x, slots)
            beta, temp, top_k, top_p, min_p = self._row_params(step.req_idx, dev)
            seed = base.sampling_states.seeds.gpu.index_select(0, idx_mapping.index_select(0, r).long())
            stp = pos.index_select(0, r).to(torch.int64)
            tokens, _logprobs = esamp.ops.reweight(l, pred, W, beta=beta, temperature=temp, top_k=top_k,
                                                   top_p=top_p, min_p=min_p, seed=seed, step=stp)
            if return_logprobs and getattr(base, "logprobs_mode", None) in PROCESSED_MODES:
                mixed = esamp.ops.reweight_logits(l, pred, W, beta=beta, temperature=temp, top_k=top_k,
                                                  top_p=top_p, min_p=min_p)
                processed = processed.to(torch.float32, copy=True)
                processed.index_copy_(0, r, mixed)
            step.x, step.t, step.slots = x, t, slots
        if self.tp_size > 1:
            from vllm.distributed import get_tp_group
            if tokens is None:
                tokens = torch.empty(num_rows, dtype=torch.int64, device=dev)
            tokens = get_tp_group().broadcast(tokens, src=0)
        sampled = sampled.clone()
        sampled.index_copy_(0, r, tokens.to(sampled.dtype))
        step.done = True
        return sampled, processed

    def end_step(self, step: _Step) -> None:
        if not step.done:
            return
        if self.trainer is not None and step.x is not None:
            self.trainer.observe(step.x, step.t, step.slots)
        self.counters["steps"] += 1
        self.counters["rows_esamp"] += int(step.rows_np.shape[0])
        if self.cfg.log_interval_s > 0:
            now = time.monotonic()
            if now - self._last_log >= self.cfg.log_interval_s:
                self._last_log = now
                self.log_stats()

    # ------------------------------------------------------------------ counters
    def stats(self) -> Dict[str, Any]:
        s: Dict[str, Any] = dict(self.counters)
        s.update(slots=self.num_slots, slots_in_use=self.slots.slots_in_use,
                 slot_resets=self.slots.resets, slots_exhausted=self.slots.exhausted,
                 tp_rank=self.tp_rank, disabled_reason=self.disabled_reason,
                 warmup_available=self.final_buffer is not None, warmup_reason=self.warmup_reason)
        if self.trainer is not None:
            s.update({f"trainer_{k}": v for k, v in self.trainer.stats().items()})
        return s

    def log_stats(self) -> None:
        s = self.stats()
        trained = s.get("trainer_rows_trained", 0)
        loss = s.get("trainer_loss_sum", 0.0) / max(1, s.get("trainer_steps", 0))
        logger.info("ESamp: %d steps, rows esamp/plain %d/%d, requests esamp/plain/no-slot %d/%d/%d, slots %d/%d, "
                    "trainer rows trained/skipped %d/%d, mean step loss %.4g",
                    s["steps"], s["rows_esamp"], s["rows_plain"], s["requests_esamp"], s["requests_plain"],
                    s["requests_no_slot"], s["slots_in_use"], s["slots"], trained,
                    s.get("trainer_rows_skipped", 0), loss)


class ESampSampler:
    """Wraps vLLM's V2 ``Sampler``: same interface (attributes are forwarded), ESamp rows resampled."""

    def __init__(self, base: Any, runtime: ESampRuntime):
        self._base = base
        self._rt = runtime
        orig_sample = base.sample

        def sample(logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos, *args, **kwargs):
            sampled, processed = orig_sample(logits, expanded_idx_mapping, idx_mapping, idx_mapping_np, pos,
                                             *args, **kwargs)
            step = runtime._step
            if step is not None:
                sampled, processed = runtime.apply(step, base, sampled, processed, idx_mapping, pos,
                                                   bool(kwargs.get("return_logprobs", False)))
            return sampled, processed

        base.sample = sample  # instance attribute: Sampler.__call__ calls self.sample(...)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    @property
    def base(self) -> Any:
        return self._base

    def add_request(self, req_idx: int, sampling_params: Any) -> None:
        self._base.add_request(req_idx, self._rt.sampler_params(req_idx, sampling_params))

    def __call__(self, logits: torch.Tensor, input_batch: Any):
        step = self._rt.begin_step(logits, input_batch)
        if step is None:
            return self._base(logits, input_batch)
        self._rt._step = step
        try:
            out = self._base(logits, input_batch)
        finally:
            self._rt._step = None
        self._rt.end_step(step)
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
        if reason is not None:
            logger.warning("ESamp is enabled but inactive: %s.", reason)
            return
        self.esamp = ESampRuntime(cfg, vllm_config, model, device, self.max_num_reqs, self.max_num_tokens)

    def add_request(self, req_index, new_req_data):
        base.add_request(self, req_index, new_req_data)
        if self.esamp is not None:
            self.esamp.add_request(req_index, new_req_data.req_id, new_req_data.sampling_params)

    def remove_request(self, req_id):
        if self.esamp is not None:
            self.esamp.remove_request(req_id)
        base.remove_request(self, req_id)

    def custom_sampler(self, sampler):
        other = base.custom_sampler(self, sampler)
        if self.esamp is None:
            return other
        if other is not None:
            logger.warning("ESamp is enabled but inactive: the model state %s already replaces the sampler.",
                           base.__name__)
            self.esamp.disabled_reason = "another custom sampler"
            return other
        return ESampSampler(sampler, self.esamp), None

    cls = type(f"ESamp{base.__name__}", (base,), {
        "__init__": __init__, "add_request": add_request, "remove_request": remove_request,
        "custom_sampler": custom_sampler, "_esamp_model_state": True, "__module__": __name__,
    })
    _STATE_CLASSES[base] = cls
    return cls


def runtimes() -> List[ESampRuntime]:
    return list(_RUNTIMES)
