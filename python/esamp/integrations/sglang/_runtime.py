"""The ESamp runtime inside one SGLang model runner (one TP rank of a scheduler process).

Per sampling step, in the order SGLang calls things:
1. ``ForwardBatch.init_new`` (wrapped) keeps the batch's ``Req`` list (and which of them complete their prefill)
   on the forward batch;
2. the forward runs; the capture points (see _capture) fill the x buffer (residual stream after layer
   ``capture_layer``) and the t buffer (final-norm output, the LM-head input) for every token;
3. ``ModelRunner.sample`` (wrapped) hands the forward batch to the runtime and calls the sampler, an
   :class:`ESampSampler` (``--sampling-backend esamp``);
4. ``ESampSampler.forward``: :meth:`ESampRuntime.begin_step` selects the ESamp rows (random sampling requests
   that opted in and got a slot), queues warm starts for the groups whose prefill completes, and predicts
   t_hat = f(x); the preprocessed logits of those rows are kept (custom logit processors, penalties, bias and
   grammar masks already applied); SGLang's own sampler then samples the whole batch with ``base_backend``, and
   inside it (``_sample_from_probs``) :meth:`ESampRuntime.apply` replaces the ESamp rows' tokens by
   ``esamp.ops.reweight`` on SGLang's candidate set, and, when logprobs are requested, their probabilities by the
   ESamp distribution (so SGLang reports the logprob of the sampled token under the policy actually sampled);
5. after the sampler, the step's (x, t) pairs are queued on the persistent trainer (off the critical path).
Slots are released (and reset) when SGLang streams a finished request or reports an aborted one.
"""
from __future__ import annotations

import hashlib
import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

import esamp

from ._capture import find_decoder, install_input_capture, install_output_capture, layer_takes_capture
from ._config import ConfigError, EngineConfig, RequestConfig, request_config
from .._core.slots import SlotManager

logger = logging.getLogger("sglang.esamp")

_RUNTIMES: "weakref.WeakSet[ESampRuntime]" = weakref.WeakSet()
_MASK64 = (1 << 64) - 1


def runtimes() -> List["ESampRuntime"]:
    return list(_RUNTIMES)


def stable_seed(key: str) -> int:
    """A 63-bit seed from a string, identical in every process (TP ranks must agree)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def _to_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def sglang_support_size(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                        min_p: torch.Tensor) -> torch.Tensor:
    """Size of the candidate set of SGLang's ``pytorch`` sampling backend per row (int64 [B]).

    Mirrors ``top_k_top_p_min_p_sampling_from_probs_torch``: sort the probabilities descending, drop ranks >= k,
    drop entries whose preceding mass exceeds top_p, drop p < max(p) * min_p, and (never sampled) p == 0.  Each
    rule removes a suffix of the sorted order, so the kept set is the top-L prefix; ESamp then uses top_k = L.
    """
    p_sort, _ = probs.float().sort(dim=-1, descending=True)
    csum = torch.cumsum(p_sort, dim=-1)
    rank = torch.arange(p_sort.shape[-1], device=probs.device).view(1, -1)
    keep = rank < top_k.view(-1, 1).to(torch.int64)
    keep &= (csum - p_sort) <= top_p.view(-1, 1).float()
    keep &= p_sort >= (p_sort[:, :1] * min_p.view(-1, 1).float())
    keep &= p_sort > 0
    return keep.sum(dim=-1).clamp_min(1).to(torch.int64)


def unsupported_reason(model_runner: Any, model: nn.Module, cfg: EngineConfig, sampler: Any) -> Optional[str]:
    """Why ESamp cannot run in this model runner (None when it can)."""
    from sglang.srt.runtime_context import get_parallel, get_spec
    if getattr(get_spec(), "speculative_algorithm", None) is not None:
        return "speculative decoding is configured (the draft/verify samplers are not ESamp-aware)"
    par = get_parallel()
    if int(getattr(par, "pp_size", 1)) > 1:
        return "pipeline parallelism (layer 0 and the LM head live on different ranks)"
    try:
        from sglang.srt.layers.dp_attention import is_dp_attention_enabled
        if is_dp_attention_enabled():
            return "DP attention (the rows of a forward are gathered across ranks)"
    except Exception:  # pragma: no cover - depends on SGLang internals
        pass
    if getattr(sampler, "rl_on_policy_target", None) is not None:
        return "--rl-on-policy-target (SGLang samples from log-softmax there, not through its probability path)"
    lp = getattr(model, "logits_processor", None)
    if lp is not None and (getattr(lp, "final_logit_softcapping", None) or getattr(lp, "logit_scale", None)
                           not in (None, 1.0)):
        return "the model scales or soft-caps its logits (distiller logits would need the same transform)"
    w = getattr(getattr(model, "lm_head", None), "weight", None)
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        return "the LM head has no plain floating-point weight [V, H] (quantized or missing)"
    dec = find_decoder(model)
    if dec is None:
        return "no decoder layer list (a 'layers' ModuleList beside 'start_layer') was found in the model"
    if not 0 <= cfg.capture_layer < len(dec.layers) - 1:
        return (f"capture_layer {cfg.capture_layer} needs a following decoder layer (the capture sits at its input "
                f"boundary); the model has {len(dec.layers)} layers")
    if not layer_takes_capture(dec.layers[cfg.capture_layer + 1]):
        return f"decoder layer {type(dec.layers[cfg.capture_layer + 1]).__name__} takes no capture_output callback"
    norm = getattr(dec, "norm", None)
    if not isinstance(norm, nn.Module) or type(norm).__name__ == "PPMissingLayer":
        return "the decoder has no final 'norm' module (its output is the LM-head input ESamp trains on)"
    return None


@dataclass
class _ReqInfo:
    esamp: bool
    beta: float = 0.0
    temperature: float = 1.0
    seed: int = 0
    warmup: int = 0
    group: Optional[str] = None


@dataclass
class _Step:
    rows: torch.Tensor            # logit-row indices of ESamp rows (int64, device)
    rows_np: np.ndarray
    tok: torch.Tensor             # token index (in the capture buffers) of each ESamp row
    slots: torch.Tensor
    beta: torch.Tensor
    temperature: torch.Tensor
    seed: torch.Tensor
    pred: torch.Tensor
    l: Optional[torch.Tensor] = None   # preprocessed logits of the ESamp rows
    done: bool = False


class ESampRuntime:
    def __init__(self, cfg: EngineConfig, model_runner: Any, sampler: Any):
        from sglang.srt.runtime_context import get_parallel, get_schedule, max_prefill_buffer_tokens
        self.cfg = cfg
        model = model_runner.model
        self.model = model
        self.device = torch.device(model_runner.device)
        decoder = find_decoder(model)
        self.hidden_size = int(model.lm_head.weight.shape[1])
        self.dtype = next(decoder.layers[cfg.capture_layer].parameters()).dtype
        self.sampler = sampler

        # Tensor parallelism: every rank samples; the LM-head weight is gathered once, tokens are synced.
        par = get_parallel()
        self.tp_size = int(getattr(par, "tp_size", 1))
        w = model.lm_head.weight
        if self.tp_size > 1:
            from sglang.srt.distributed import tensor_model_parallel_all_gather
            w = tensor_model_parallel_all_gather(w.data.contiguous(), dim=0)
        self.lm_head_weight = w.detach()

        max_reqs = int(getattr(model_runner, "max_running_requests", 0) or getattr(get_schedule(),
                                                                                  "max_running_requests", 0) or 1)
        rows = cfg.capture_rows
        if rows <= 0:
            try:
                ceiling = int(max_prefill_buffer_tokens() or 0)
            except Exception:
                ceiling = 0
            if ceiling <= 0:  # chunked prefill off: a prefill may be as long as the KV cache
                ceiling = int(getattr(model_runner, "max_total_num_tokens", 0) or 8192)
            rows = max(ceiling, max_reqs)
        self.capture_rows = rows
        self.x_buffer = torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        self.t_buffer = torch.zeros(rows, self.hidden_size, dtype=self.dtype, device=self.device)
        install_input_capture(decoder.layers[cfg.capture_layer + 1], self.x_buffer)
        install_output_capture(decoder.norm, self.t_buffer)

        self.num_slots = cfg.resolved_slots(max_reqs)
        self.rank = cfg.resolved_rank()
        self.warmup_max_rows = min(cfg.warmup_max_rows, rows)
        ring = cfg.ring_rows if cfg.ring_rows > 0 else max(64, self.num_slots,
                                                           self.warmup_max_rows if cfg.warmup_steps > 0 else 0)
        self.warmup_max_rows = min(self.warmup_max_rows, ring)
        gamma = getattr(decoder.norm, "weight", None)
        gamma = gamma.detach().float() if isinstance(gamma, torch.Tensor) and gamma.dim() == 1 \
            and gamma.shape[0] == self.hidden_size else None
        self.trainer = esamp.Trainer(self.hidden_size, rank=self.rank, layers=cfg.layers, slots=self.num_slots,
                                     lr=cfg.lr, adam_eps=cfg.adam_eps, clip=cfg.clip, device=self.device,
                                     seed=cfg.seed, ring_rows=ring, gamma_init=gamma)
        self.slots = SlotManager(self.num_slots, shared=cfg.mode == "shared", on_reset=self.trainer.reset)
        self._warmed: set = set()           # groups whose slot had its warm start
        self._fb: Any = None                # the forward batch of the sample call in progress
        self._step: Optional[_Step] = None
        self.counters: Dict[str, int] = {
            "requests_esamp": 0, "requests_plain": 0, "requests_no_slot": 0, "requests_finished": 0,
            "steps": 0, "rows_esamp": 0, "rows_plain": 0, "rows_no_capture": 0, "steps_skipped": 0,
            "warmup_groups": 0, "warmup_rows": 0, "warmup_updates": 0, "warmup_partial": 0, "warmup_truncated": 0,
        }
        self._last_log = time.monotonic()
        _RUNTIMES.add(self)
        logger.info("ESamp enabled: mode=%s slots=%d rank=%d layers=%d beta=%.3g capture=layer %d (buffers 2 x %d x "
                    "%d %s), warm start %s, distiller bank %.1f MiB, base backend %s, tp_size=%d",
                    cfg.mode, self.num_slots, self.rank, cfg.layers, cfg.beta, cfg.capture_layer, rows,
                    self.hidden_size, str(self.dtype).replace("torch.", ""),
                    f"{cfg.warmup_steps} steps, <= {self.warmup_max_rows} rows" if cfg.warmup_steps else "off",
                    self.trainer.nbytes_per_slot * self.num_slots / 2**20, cfg.base_backend, self.tp_size)

    # ------------------------------------------------------------------ requests
    def _info(self, req: Any) -> _ReqInfo:
        info = req.__dict__.get("_esamp_info")
        if info is not None:
            return info
        sp = req.sampling_params
        try:
            rc: Optional[RequestConfig] = request_config(getattr(sp, "custom_params", None), self.cfg)
        except ConfigError as e:  # validated at SamplingParams.verify; never crash the scheduler here
            logger.warning("ESamp: request %s: %s; sampling it without ESamp", req.rid, e)
            rc = None
        greedy = int(sp.top_k) <= 1
        if rc is None or not rc.enabled or greedy or getattr(sp, "max_new_tokens", 1) == 0 \
                or getattr(req, "return_sampling_mask", False):
            info = _ReqInfo(False)
            self.counters["requests_plain"] += 1
        else:
            base = rc.seed if rc.seed is not None else getattr(sp, "sampling_seed", None)
            if base is None:
                base = stable_seed(rc.group if rc.group is not None else req.rid)
            info = _ReqInfo(True, rc.beta, float(sp.temperature), _to_int64(int(base) + rc.index),
                            self.cfg.warmup_steps if rc.warmup_steps is None else rc.warmup_steps, rc.group)
        req._esamp_info = info
        return info

    def release(self, rid: str) -> None:
        if rid not in self.slots:
            return
        g = self.slots.group_of(rid)
        freed = self.slots.release(rid)  # resets the slot (ordered with the queued updates) when it was the last
        self.counters["requests_finished"] += 1
        if freed is not None:
            self._warmed.discard(g)

    def release_finished(self, reqs: Any) -> None:
        for req in reqs:
            rid = getattr(req, "rid", None)
            if rid in self.slots and req.finished():
                self.release(rid)

    # ------------------------------------------------------------------ sampling
    def begin_step(self, logits: torch.Tensor, positions: torch.Tensor) -> Optional[_Step]:
        fb = self._fb
        B = int(logits.shape[0])
        reqs = getattr(fb, "_esamp_reqs", None) if fb is not None else None
        if reqs is None or len(reqs) != B:
            self.counters["steps_skipped"] += 1
            return None
        mode = fb.forward_mode
        if mode.is_decode():
            tok_np = np.arange(B, dtype=np.int64)
            ext = None
        elif (mode.is_extend() and not mode.is_target_verify() and not mode.is_dllm_extend()
              and fb.extend_seq_lens_cpu is not None):
            ext = np.asarray(fb.extend_seq_lens_cpu, dtype=np.int64)
            tok_np = np.cumsum(ext) - 1
        else:
            self.counters["steps_skipped"] += 1
            return None
        rows, slots, beta, temp, seeds, warm = [], [], [], [], [], []
        for r, req in enumerate(reqs):
            info = self._info(req)
            if not info.esamp:
                continue
            rid = req.rid
            slot = self.slots.slot_of(rid)
            if slot < 0:
                if req.__dict__.get("_esamp_no_slot"):
                    continue
                slot = self.slots.acquire(rid, info.group)
                if slot < 0:  # more live groups than slots: this request runs with SGLang's sampler
                    req._esamp_no_slot = True
                    self.counters["requests_no_slot"] += 1
                    self.counters["requests_plain"] += 1
                    continue
                self.counters["requests_esamp"] += 1
            if tok_np[r] >= self.capture_rows:
                self.counters["rows_no_capture"] += 1
                continue
            rows.append(r)
            slots.append(slot)
            beta.append(info.beta)
            temp.append(info.temperature)
            seeds.append(info.seed)
            if ext is not None and info.warmup > 0 and fb._esamp_last_chunk[r]:
                g = self.slots.group_of(rid)
                if g not in self._warmed:
                    self._warmed.add(g)
                    warm.append((r, slot, info.warmup))
        self.counters["rows_plain"] += B - len(rows)
        if not rows:
            return None
        dev = logits.device
        if warm:
            self._warm_start(warm, ext, fb)
        rows_np = np.asarray(rows, dtype=np.int64)
        rows_t = torch.from_numpy(rows_np).to(dev)
        tok = torch.from_numpy(tok_np[rows_np]).to(self.x_buffer.device)
        slots_t = torch.tensor(slots, dtype=torch.int64, device=self.x_buffer.device)
        x = self.x_buffer.index_select(0, tok)
        pred = self.trainer.predict(x, slots_t)
        return _Step(rows=rows_t, rows_np=rows_np, tok=tok, slots=slots_t,
                     beta=torch.tensor(beta, dtype=torch.float32, device=dev),
                     temperature=torch.tensor(temp, dtype=torch.float32, device=dev),
                     seed=torch.tensor(seeds, dtype=torch.int64, device=dev), pred=pred)

    def _warm_start(self, warm: List[tuple], ext: np.ndarray, fb: Any) -> None:
        """Queue ``warmup`` trainer updates on the prompt rows of the groups completing their prefill (before
        anything is predicted for them).  Requests with the same step count share updates (slots are independent)."""
        starts = np.concatenate([[0], np.cumsum(ext)[:-1]])
        prefix = getattr(fb, "extend_prefix_lens_cpu", None)
        by_steps: Dict[int, List[tuple]] = {}
        for r, slot, steps in warm:
            s, e = int(starts[r]), min(int(starts[r] + ext[r]), self.capture_rows)
            if prefix is not None and int(prefix[r]) > 0:
                self.counters["warmup_partial"] += 1  # prefix-cache hit or chunked prefill: computed positions only
            if e - s > self.warmup_max_rows:
                s = e - self.warmup_max_rows
                self.counters["warmup_truncated"] += 1
            if e > s:
                by_steps.setdefault(steps, []).append((s, e, slot))
        dev = self.x_buffer.device
        for steps, jobs in by_steps.items():
            bins: List[List[tuple]] = [[]]
            for j in jobs:
                if bins[-1] and sum(b[1] - b[0] for b in bins[-1]) + (j[1] - j[0]) > self.warmup_max_rows:
                    bins.append([])
                bins[-1].append(j)
            for b in bins:
                idx = torch.from_numpy(np.concatenate([np.arange(s, e, dtype=np.int64) for s, e, _ in b])).to(dev)
                sl = torch.from_numpy(np.concatenate([np.full(e - s, slot, dtype=np.int64)
                                                      for s, e, slot in b])).to(dev)
                x = self.x_buffer.index_select(0, idx)
                t = self.t_buffer.index_select(0, idx)
                for _ in range(steps):
                    self.trainer.observe(x, t, sl)
                self.counters["warmup_updates"] += steps
                self.counters["warmup_rows"] += int(idx.shape[0])
                self.counters["warmup_groups"] += len(b)

    def apply(self, step: _Step, probs: torch.Tensor, ids: torch.Tensor, sampling_info: Any,
              positions: torch.Tensor, return_logprob: bool) -> torch.Tensor:
        """Replace the ESamp rows' tokens (inside SGLang's ``_sample_from_probs``); with logprobs requested, also
        their probabilities (in place), so SGLang's ``log(probs)`` is the ESamp distribution."""
        r = step.rows
        l = step.l
        if l is None:
            return ids
        V = l.shape[1]
        p = probs.index_select(0, r)
        L = sglang_support_size(p, sampling_info.top_ks.index_select(0, r), sampling_info.top_ps.index_select(0, r),
                                sampling_info.min_ps.index_select(0, r))
        W = self.lm_head_weight[:V]
        pred = step.pred if step.pred.dtype == W.dtype else step.pred.to(W.dtype)
        kw = dict(beta=step.beta, temperature=step.temperature, top_k=L, top_p=1.0, min_p=0.0)
        tokens, _ = esamp.ops.reweight(l, pred, W, seed=step.seed, step=positions.index_select(0, r).to(torch.int64),
                                       **kw)
        if self.tp_size > 1:
            import torch.distributed as dist
            dist.all_reduce(tokens, op=dist.ReduceOp.MIN, group=self.sampler.tp_sync_group)
        if return_logprob:
            mixed = esamp.ops.reweight_logits(l, pred, W, **kw)
            probs.index_copy_(0, r, torch.softmax(mixed, dim=-1).to(probs.dtype))
        ids = ids.clone()
        ids.index_copy_(0, r, tokens.to(ids.dtype))
        step.done = True
        return ids

    def end_step(self, step: _Step) -> None:
        if not step.done:
            return
        t = self.t_buffer.index_select(0, step.tok)
        x = self.x_buffer.index_select(0, step.tok)
        self.trainer.observe(x, t, step.slots)
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
        s.update(slots=self.num_slots, slots_in_use=self.slots.slots_in_use, slot_resets=self.slots.resets,
                 slots_exhausted=self.slots.exhausted, capture_rows=self.capture_rows, tp_size=self.tp_size)
        s.update({f"trainer_{k}": v for k, v in self.trainer.stats().items()})
        return s

    def log_stats(self) -> None:
        s = self.stats()
        loss = s["trainer_loss_sum"] / max(1, s["trainer_steps"])
        logger.info("ESamp: %d steps, rows esamp/plain %d/%d, requests esamp/plain/no-slot %d/%d/%d, slots %d/%d, "
                    "trainer rows trained/skipped %d/%d, mean step loss %.4g, warm starts %d (%d rows)",
                    s["steps"], s["rows_esamp"], s["rows_plain"], s["requests_esamp"], s["requests_plain"],
                    s["requests_no_slot"], s["slots_in_use"], s["slots"], s["trainer_rows_trained"],
                    s["trainer_rows_skipped"], loss, s["warmup_groups"], s["warmup_rows"])
