"""The engine-independent ESamp runtime of one model replica (one worker).

An engine adapter translates its engine's request lifecycle and batch layout into the calls below; everything
else -- per-request options, distiller slots, the capture buffers, warm start, latent mixing, the reweight,
training, counters -- happens here, once for every engine:

* ``add_request(req_id, RequestOptions)`` / ``remove_request(req_id)``: a request that uses ESamp gets a key
  (its row in the per-request table) and its group's distiller slot (``SlotManager``); on removal (finish,
  abort) the slot is released, and reset when the group's last member leaves.
* per sampling step, in the engine's ``compute_logits`` (the LM head, which runs eagerly):
  ``begin_step(keys, hidden, token_index, positions, warm_info)`` with the table key of every logits row (-1 for
  rows without ESamp) returns the LM-head input to use.  It queues the warm start of rows completing their
  prefill, predicts ``t_hat = f(x)`` for the ESamp rows (x: the layer-0 capture at each row's token), and for
  rows that can use latent mixing (no filter, nothing that needs the unmixed logits; SPEC 3) replaces their
  LM-head input by ``(1+beta) t - beta t_hat``, so that the LM head produces the mixed logits directly.  The
  adapter then calls ``bind(step, logits)`` with the logits computed from it.
* in the engine's sampler, with the processed logits of the ESamp rows (after the engine's logits processors,
  at temperature 1 and before any filter): ``sample(step, logits_rows)`` returns ESamp's tokens (and the mixed
  logits m when the engine reports processed logprobs): ``esamp.ops.reweight`` with the request's own
  temperature/top-k/top-p/min-p, seed and the token position as Philox (seed, step); beta is 0 on latent rows
  (already mixed, no dot products).  ``end_step(step)`` queues the distiller update on (x, t).
"""
from __future__ import annotations

import logging
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import esamp

from .capture import final_norm_unsupported_reason, install_layer_capture
from .config import ConfigError, EngineConfig, request_config
from .slots import SlotManager

_RUNTIMES: "weakref.WeakSet[ESampCore]" = weakref.WeakSet()

# Counters every adapter reports (``stats()``); see docs/vllm.md "Counters".
COUNTERS = ("requests_esamp", "requests_plain", "requests_no_slot", "requests_finished", "steps", "rows_esamp",
            "rows_latent", "rows_plain", "rows_no_lm_input", "steps_skipped", "warmup_groups", "warmup_rows",
            "warmup_updates", "warmup_row_updates", "warmup_shared", "warmup_partial", "warmup_truncated",
            "warmup_unavailable")


@dataclass
class RequestOptions:
    """What the runtime needs to know about one request, in engine-independent terms."""
    temperature: float
    top_k: int = 0                   # <= 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None       # None: a random seed is drawn (n > 1 children then differ)
    extra_args: Optional[Mapping[str, Any]] = None   # the request's extra_args ("esamp", "esamp_beta", ...)
    needs_raw_logits: bool = False   # the engine reports values computed from this request's unmixed logits
    adjusts_logits: bool = False     # the engine's logits processors change this request's logit values
                                     # (penalties, logit bias; masks do not count)


@dataclass
class WarmInfo:
    """Per logits row: its tokens in this step are ``start .. end-1`` of the capture buffers; ``completes``: its
    prefill completes in this step (it samples its first real token); ``partial``: positions of its prompt were
    computed before this step (chunked prefill, prefix-cache hit)."""
    start: np.ndarray
    end: np.ndarray
    completes: np.ndarray
    partial: np.ndarray


@dataclass
class Step:
    rows_np: np.ndarray           # logits rows with ESamp
    rows: torch.Tensor            # same, int64 on device
    keys: np.ndarray              # table keys of those rows
    x: Optional[torch.Tensor]     # layer-0 residual of those rows [m, H]
    t: torch.Tensor               # their (unmixed) LM-head input [m, H]
    slots: torch.Tensor           # distiller slot per row, int64 on device
    pred: Optional[torch.Tensor]  # t_hat (driver rank; every rank when latent rows were broadcast)
    beta: np.ndarray              # beta for the reweight: 0 on latent rows
    steps: torch.Tensor           # Philox step per row (token position), int64 on device
    num_latent: int = 0
    logits_ref: Optional[weakref.ref] = None
    batch: Any = None             # the adapter's batch object of this step (to match the sampler's call)
    done: bool = False


class _Table:
    """Per-request options of the live ESamp requests, one row per key (keys are reused after removal)."""

    def __init__(self, capacity: int):
        self.capacity = 0
        self.req_id: List[Optional[str]] = []
        self._free: List[int] = []
        self._grow(max(8, int(capacity)))

    def _grow(self, cap: int) -> None:
        def ext(a, fill, dtype):
            out = np.full(cap, fill, dtype=dtype)
            if a is not None:
                out[:a.shape[0]] = a
            return out
        g = (lambda n: getattr(self, n, None)) if self.capacity else (lambda n: None)
        self.beta = ext(g("beta"), 0.0, np.float32)
        self.temperature = ext(g("temperature"), 1.0, np.float32)
        self.top_k = ext(g("top_k"), 0, np.int64)
        self.top_p = ext(g("top_p"), 1.0, np.float32)
        self.min_p = ext(g("min_p"), 0.0, np.float32)
        self.seed = ext(g("seed"), 0, np.int64)
        self.slot = ext(g("slot"), -1, np.int64)
        self.warmup = ext(g("warmup"), 0, np.int64)
        self.latent = ext(g("latent"), False, bool)
        self.req_id.extend([None] * (cap - self.capacity))
        self._free.extend(range(cap - 1, self.capacity - 1, -1))
        self.capacity = cap

    def alloc(self, req_id: str) -> int:
        if not self._free:  # more live requests than expected (e.g. preempted ones kept by the engine)
            self._grow(2 * self.capacity)
        k = self._free.pop()
        self.req_id[k] = req_id
        return k

    def free(self, k: int) -> None:
        self.req_id[k] = None
        self.slot[k] = -1
        self.warmup[k] = 0
        self._free.append(k)


def _select(a: Any, rows_np: np.ndarray, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Entries ``rows`` of a per-row index (numpy array or tensor) as an int64 tensor on ``device``."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a[rows_np], dtype=np.int64)).to(device)
    return a.index_select(0, rows.to(a.device)).to(device=device, dtype=torch.int64)


def has_filter(top_k: int, top_p: float, min_p: float, vocab_size: int) -> bool:
    return (0 < top_k < vocab_size) or top_p < 1.0 or min_p > 0.0


def random_seed() -> int:
    return secrets.randbits(63)


class ESampCore:
    """ESamp for one model replica; see the module docstring for the call sequence.

    decoder:          the module holding the decoder ``layers`` (capture points are installed on it)
    lm_head_weight:   [V, H] (the full vocabulary; None on tensor-parallel ranks other than the driver)
    broadcast:        ``broadcast(tensor) -> tensor`` from the driver rank to all (tensor parallelism), or None
    """

    def __init__(self, cfg: EngineConfig, *, decoder: nn.Module, lm_head_weight: Optional[torch.Tensor],
                 hidden_size: int, dtype: torch.dtype, device: Any, max_num_reqs: int, max_num_tokens: int,
                 vocab_size: int, group_of: Callable[[str], str] = lambda r: r, tp_rank: int = 0, tp_size: int = 1,
                 broadcast: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 logger: Optional[logging.Logger] = None, name: str = ""):
        self.cfg = cfg
        self.name = name
        self.log = logger or logging.getLogger("esamp")
        self.device = torch.device(device)
        self.max_num_reqs = int(max_num_reqs)
        self.hidden_size = int(hidden_size)
        self.dtype = dtype
        self.vocab_size = int(vocab_size)
        self.group_of = group_of
        self.tp_rank, self.tp_size = int(tp_rank), int(tp_size)
        self.is_driver = self.tp_rank == 0
        self._broadcast = broadcast
        if self.tp_size > 1 and broadcast is None:
            raise ValueError("broadcast: tensor parallelism (tp_size > 1) needs a broadcast function")
        self.lm_head_weight = lm_head_weight.detach() if lm_head_weight is not None else None

        # Layer-0 residual capture into a persistent buffer (one row per scheduled token).
        self.capture_buffer = torch.zeros(int(max_num_tokens), self.hidden_size, dtype=dtype, device=self.device)
        self.capture_layer = decoder.layers[cfg.capture_layer]
        install_layer_capture(self.capture_layer, self.capture_buffer)

        # Warm start: the LM-head input of every scheduled token, captured at the decoder's final norm.
        self.final_buffer: Optional[torch.Tensor] = None
        self.warmup_reason: Optional[str] = None     # why warm start is unavailable (None: available or off)
        self._warmup_checked = False
        if cfg.warmup_steps > 0:
            self.warmup_reason = final_norm_unsupported_reason(decoder)
            if self.warmup_reason is None:
                self.final_buffer = torch.zeros(int(max_num_tokens), self.hidden_size, dtype=dtype,
                                                device=self.device)
                install_layer_capture(decoder.norm, self.final_buffer, mode="first")
            else:
                self.log.warning("ESamp: warm start is unavailable (%s); requests run without it.",
                                 self.warmup_reason)
        self.warmup_max_rows = min(cfg.warmup_max_rows, int(max_num_tokens))

        # Distiller bank + persistent trainer (driver rank only).
        self.num_slots = cfg.resolved_slots(max_num_reqs)
        self.rank = cfg.resolved_rank()
        self.trainer: Optional[esamp.Trainer] = None
        if self.is_driver:
            gamma = getattr(getattr(decoder, "norm", None), "weight", None)
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
        self.slots = SlotManager(self.num_slots, shared=cfg.mode == "shared", on_reset=self._reset_slots,
                                 group_key=group_of)

        self.table = _Table(self.max_num_reqs)
        self.key_of: Dict[str, int] = {}             # live ESamp request -> table key
        self._group_members: Dict[str, set] = {}     # ESamp request groups alive -> their request ids
        self._warmed_groups: set = set()             # groups whose slot already had its warm start
        self.counters: Dict[str, int] = {k: 0 for k in COUNTERS}
        self.step: Optional[Step] = None
        self._last_log = time.monotonic()
        _RUNTIMES.add(self)

    # ------------------------------------------------------------------ request lifecycle
    def _reset_slots(self, slots: List[int]) -> None:
        if self.trainer is not None:
            self.trainer.reset(slots)

    def add_request(self, req_id: str, opts: Optional[RequestOptions]) -> bool:
        """Registers a request; True when it samples with ESamp (False: the engine's own sampler)."""
        if req_id in self.key_of:   # re-added (e.g. a streaming-input update): keep its slot and options
            return True
        if opts is None:
            self.counters["requests_plain"] += 1
            return False
        try:
            rc = request_config(opts.extra_args, self.cfg)
        except ConfigError as e:  # validated where the request entered the engine; never crash a worker here
            self.log.warning("ESamp: request %s: %s; sampling it without ESamp", req_id, e)
            rc = None
        if rc is None or not rc.enabled or float(opts.temperature) < 1e-5:  # greedy rows: SPEC 3.1
            self.counters["requests_plain"] += 1
            return False
        slot = self.slots.acquire(req_id)
        if slot < 0:
            self.counters["requests_no_slot"] += 1
            self.counters["requests_plain"] += 1
            return False
        tb = self.table
        k = tb.alloc(req_id)
        top_k = int(opts.top_k) if int(opts.top_k) > 0 else 0
        tb.beta[k] = rc.beta
        tb.temperature[k] = float(opts.temperature)
        tb.top_k[k] = top_k
        tb.top_p[k] = float(opts.top_p)
        tb.min_p[k] = float(opts.min_p)
        tb.seed[k] = int(opts.seed) if opts.seed is not None else random_seed()
        tb.slot[k] = slot
        tb.warmup[k] = self.cfg.warmup_steps if rc.warmup_steps is None else rc.warmup_steps
        tb.latent[k] = (self.cfg.latent_mixing and not opts.needs_raw_logits and not opts.adjusts_logits
                        and not has_filter(top_k, float(opts.top_p), float(opts.min_p), self.vocab_size))
        self.key_of[req_id] = k
        self._group_members.setdefault(self.group_of(req_id), set()).add(req_id)
        self.counters["requests_esamp"] += 1
        return True

    def remove_request(self, req_id: str) -> None:
        """The request finished, was aborted or left the worker: release its slot (reset with its group's last)."""
        k = self.key_of.pop(req_id, None)
        if k is None:
            return
        self.table.free(k)
        self.slots.release(req_id)
        self.counters["requests_finished"] += 1
        g = self.group_of(req_id)
        members = self._group_members.get(g)
        if members is not None:
            members.discard(req_id)
            if not members:  # the group's slot is reset now: its next owner gets its own warm start
                del self._group_members[g]
                self._warmed_groups.discard(g)

    def keys_for(self, req_ids: Sequence[Optional[str]]) -> np.ndarray:
        get = self.key_of.get
        return np.fromiter((get(r, -1) if r is not None else -1 for r in req_ids), dtype=np.int64,
                           count=len(req_ids))

    @property
    def live_requests(self) -> int:
        return len(self.key_of)

    # ------------------------------------------------------------------ one sampling step
    def begin_step(self, keys: np.ndarray, hidden: torch.Tensor, token_index: Any, positions: Any,
                   warm_info: Optional[Callable[[], WarmInfo]] = None) -> torch.Tensor:
        """Called with the LM-head input of the logits rows of a sampling step; returns the LM-head input to use.

        keys:        table key of every logits row (-1: no ESamp), np.int64 [n]
        hidden:      LM-head input [n, H] (the model's final hidden states at the logits rows)
        token_index: index of every logits row's token in the capture buffers [n] (int tensor or numpy array)
        positions:   position of every logits row's token (the Philox step) [n] (int tensor or numpy array)
        warm_info:   returns the rows' warm-start facts (only called when a row still has a warm start due)
        """
        self.step = None
        n = int(hidden.shape[0])
        rows_np = np.flatnonzero(keys >= 0)
        self.counters["rows_plain"] += n - rows_np.shape[0]
        if rows_np.shape[0] == 0:
            return hidden
        k = keys[rows_np]
        tb = self.table
        dev = hidden.device
        rows = torch.from_numpy(rows_np).to(dev)
        tok = _select(token_index, rows_np, rows, self.capture_buffer.device)
        if self.trainer is not None and tb.warmup[k].any():
            try:
                info = warm_info() if warm_info is not None else None
            except AttributeError as e:  # a batch layout the adapter does not know
                info = None
                self.disable_warm_start(f"the engine's batch lacks {getattr(e, 'name', None) or e}")
            if info is not None:
                self._warm_start(rows_np, k, info, hidden, tok)
        x = self.capture_buffer.index_select(0, tok) if self.is_driver else None
        t = hidden.index_select(0, rows)
        slots = torch.from_numpy(tb.slot[k]).to(dev)
        pred = self.trainer.predict(x, slots) if self.trainer is not None else None
        beta = tb.beta[k].copy()
        latent = tb.latent[k]
        num_latent = int(latent.sum())
        if num_latent:
            if self.tp_size > 1:   # every rank computes its vocabulary shard from the same mixed input
                if pred is None:
                    pred = torch.empty(rows_np.shape[0], self.hidden_size, dtype=self.dtype, device=dev)
                pred = self._broadcast(pred)
            sel = torch.from_numpy(np.flatnonzero(latent)).to(dev)
            mixed = esamp.ops.mix_hidden(t.index_select(0, sel), pred.index_select(0, sel),
                                         torch.from_numpy(beta[latent]).to(dev))
            hidden = hidden.clone()
            hidden.index_copy_(0, rows.index_select(0, sel), mixed)
            beta[latent] = 0.0
        steps = _select(positions, rows_np, rows, dev)
        self.step = Step(rows_np=rows_np, rows=rows, keys=k, x=x, t=t, slots=slots, pred=pred, beta=beta,
                         steps=steps, num_latent=num_latent)
        return hidden

    def bind(self, logits: torch.Tensor) -> None:
        """The logits computed from ``begin_step``'s LM-head input (the sampler later finds the step by them)."""
        if self.step is not None:
            self.step.logits_ref = weakref.ref(logits)

    def step_for(self, logits: Any) -> Optional[Step]:
        s = self.step
        if s is None or s.logits_ref is None or s.logits_ref() is not logits:
            return None
        return s

    def sample(self, step: Step, logits: torch.Tensor, *, want_mixed: bool = False
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """ESamp's tokens (int64 [m]) for the step's rows from their processed logits [m, V] (temperature 1, no
        filter applied), and, if ``want_mixed``, the mixed logits m (float32 [m, V], -inf outside the candidate
        set; SPEC 3 ``reweight_logits``)."""
        dev = logits.device
        tokens = mixed = None
        if self.is_driver:
            V = logits.shape[1]
            W = self.lm_head_weight[:V]
            tb, k = self.table, step.keys

            def t(a):
                return torch.from_numpy(np.ascontiguousarray(a)).to(dev)
            beta, temp, top_k, top_p, min_p = (t(step.beta), t(tb.temperature[k]), t(tb.top_k[k]), t(tb.top_p[k]),
                                               t(tb.min_p[k]))
            seed = t(tb.seed[k])
            pred = step.pred
            tokens, _ = esamp.ops.reweight(logits, pred, W, beta=beta, temperature=temp, top_k=top_k, top_p=top_p,
                                           min_p=min_p, seed=seed, step=step.steps)
            if want_mixed:
                mixed = esamp.ops.reweight_logits(logits, pred, W, beta=beta, temperature=temp, top_k=top_k,
                                                  top_p=top_p, min_p=min_p)
        if self.tp_size > 1:
            if tokens is None:
                tokens = torch.empty(step.rows_np.shape[0], dtype=torch.int64, device=dev)
            tokens = self._broadcast(tokens)
            if want_mixed:
                if mixed is None:
                    mixed = torch.empty(step.rows_np.shape[0], logits.shape[1], dtype=torch.float32, device=dev)
                mixed = self._broadcast(mixed)
        step.done = True
        return tokens, mixed

    def end_step(self, step: Step) -> None:
        """After the sampler: queue the distiller update on the step's (x, t) rows; counters."""
        if self.step is step:
            self.step = None
        if not step.done:
            return
        if self.trainer is not None and step.x is not None:
            self.trainer.observe(step.x, step.t, step.slots)
        self.counters["steps"] += 1
        self.counters["rows_esamp"] += int(step.rows_np.shape[0])
        self.counters["rows_latent"] += step.num_latent
        if self.cfg.log_interval_s > 0:
            now = time.monotonic()
            if now - self._last_log >= self.cfg.log_interval_s:
                self._last_log = now
                self.log_stats()

    def skip_step(self) -> None:
        self.counters["steps_skipped"] += 1

    # ------------------------------------------------------------------ warm start
    def _warm_start(self, rows_np: np.ndarray, keys: np.ndarray, info: WarmInfo, lm_in: torch.Tensor,
                    tok: torch.Tensor) -> None:
        """Queue the warm-start updates of the rows whose prefill completes in this step (driver rank); ``tok``:
        the capture-buffer index of each of those rows' last token."""
        tb = self.table
        completes = (tb.warmup[keys] > 0) & np.asarray(info.completes)[rows_np].astype(bool)
        if not completes.any():
            return  # no warm start due, decode rows, or prefill chunks before the last one
        start_all, end_all = np.asarray(info.start), np.asarray(info.end)
        partial_all = np.asarray(info.partial).astype(bool)
        jobs = []  # (steps, first token, end token, slot, key, partial)
        in_step: Dict[str, int] = {}  # group -> index in jobs of the member warming it in this step
        for r, k in zip(rows_np[completes].tolist(), keys[completes].tolist()):
            if self.final_buffer is None:
                self.counters["warmup_unavailable"] += 1
                continue
            g = self.group_of(tb.req_id[k])
            if g in self._warmed_groups:
                self.counters["warmup_shared"] += 1  # an n > 1 sibling already warmed the group's slot
                continue
            start, end = int(start_all[r]), int(end_all[r])
            job = (int(tb.warmup[k]), start, end, int(tb.slot[k]), k, bool(partial_all[r]))
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
        for i, (steps, start, end, slot, k, partial) in enumerate(jobs):
            self._warmed_groups.add(self.group_of(tb.req_id[k]))
            if partial:
                self.counters["warmup_partial"] += 1
            if end - start > self.warmup_max_rows:
                start = end - self.warmup_max_rows
                self.counters["warmup_truncated"] += 1
            jobs[i] = (steps, start, end, slot, k)
        if not self._warmup_checked and not self._check_final_capture(rows_np, lm_in, tok):
            for *_, k in jobs:
                self._warmed_groups.discard(self.group_of(tb.req_id[k]))
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

    def _check_final_capture(self, rows_np: np.ndarray, lm_in: torch.Tensor, tok: torch.Tensor) -> bool:
        """Once: the final-norm capture must match the LM-head input at the logit rows (else the model applies
        something between its final norm and the LM head, and warm start is turned off).  Matching is up to a
        relative L2 error of 1e-2 (one host sync), so that a compiled graph that recomputes the norm for its
        output in another kernel (rounding differences) still passes, while any real transform fails."""
        self._warmup_checked = True
        r = torch.from_numpy(rows_np).to(lm_in.device)
        got = self.final_buffer.index_select(0, tok.to(self.final_buffer.device)).float()
        want = lm_in.index_select(0, r).float()
        if got.shape == want.shape and bool(torch.linalg.vector_norm(got - want)
                                            <= 1e-2 * torch.linalg.vector_norm(want)):
            return True
        self.disable_warm_start("the decoder's final-norm output is not the LM-head input of this model")
        return False

    def disable_warm_start(self, reason: str) -> None:
        self.log.warning("ESamp: warm start is unavailable (%s); requests run without it.", reason)
        self.warmup_reason = reason
        self.final_buffer = None

    # ------------------------------------------------------------------ counters
    def stats(self, sync: bool = False) -> Dict[str, Any]:
        """Counters; ``sync=True`` first waits for the queued distiller updates (a host synchronisation), so that
        the trainer's counters include every update queued so far."""
        s: Dict[str, Any] = dict(self.counters)
        s.update(active=True, slots=self.num_slots, slots_in_use=self.slots.slots_in_use,
                 slot_resets=self.slots.resets, slots_exhausted=self.slots.exhausted,
                 live_requests=self.live_requests, tp_rank=self.tp_rank,
                 latent_mixing=bool(self.cfg.latent_mixing),
                 warmup_available=self.final_buffer is not None, warmup_reason=self.warmup_reason)
        if self.trainer is not None:
            if sync:
                self.trainer.synchronize()
            s.update({f"trainer_{k}": v for k, v in self.trainer.stats().items()})
        return s

    def log_stats(self) -> None:
        s = self.stats()
        trained = s.get("trainer_rows_trained", 0)
        loss = s.get("trainer_loss_sum", 0.0) / max(1, s.get("trainer_steps", 0))
        self.log.info("ESamp%s: %d steps, rows esamp/latent/plain %d/%d/%d, requests esamp/plain/no-slot %d/%d/%d, "
                      "slots %d/%d, trainer rows trained/skipped %d/%d, mean step loss %.4g",
                      f" ({self.name})" if self.name else "", s["steps"], s["rows_esamp"], s["rows_latent"],
                      s["rows_plain"], s["requests_esamp"], s["requests_plain"], s["requests_no_slot"],
                      s["slots_in_use"], s["slots"], trained, s.get("trainer_rows_skipped", 0), loss)

    def describe(self) -> str:
        per_slot = self.trainer.nbytes_per_slot if self.trainer is not None else 0
        c = self.cfg
        return ("mode=%s slots=%d rank=%d layers=%d beta=%.3g capture=layer %d (buffer %d x %d %s), warm start %s, "
                "latent mixing %s, distiller bank %.1f MiB, tp_rank=%d/%d" % (
                    c.mode, self.num_slots, self.rank, c.layers, c.beta, c.capture_layer,
                    self.capture_buffer.shape[0], self.hidden_size, str(self.dtype).replace("torch.", ""),
                    ("%d steps, <= %d rows" % (c.warmup_steps, self.warmup_max_rows))
                    if self.final_buffer is not None else "off", "on" if c.latent_mixing else "off",
                    per_slot * self.num_slots / 2**20, self.tp_rank, self.tp_size))


def runtimes() -> List[ESampCore]:
    return list(_RUNTIMES)
