"""esamp.ESamp: the engine-agnostic ESamp sampler state (SPEC 1-3 driven from one object).

An engine adapter (Hugging Face: esamp.hf; vLLM, ...) owns the model and calls, per decode step,

    slots  = es.acquire(request_id) ...                        # once per request (per-prompt mode: a fresh slot)
    es.warm_start(x_prompt, t_prompt, slot_ids)                # once, at prefill (config.warmup_steps steps)
    t_hat  = es.predict(x, slot_ids)                           # x: source-layer residual stream, last position
    if es.latent_mixing(top_k=..., top_p=..., min_p=..., vocab_size=V):
        h = es.mix(t, t_hat, temperature)                      # LM-head input replaced by (1+b) t - b t_hat
        logits = lm_head(h)
    else:
        logits = lm_head(t)
    tokens, logprobs = es.sample(logits, t_hat, lm_head_weight, latent_mixed=..., temperature=..., ..., seeds, step)
    es.update(x, t, slot_ids)                                  # one optimizer step on this step's rows
    es.release(request_id)

Vanilla sampling goes through :func:`sample_tokens` with beta = 0: the very same operator, filters and random
numbers (SPEC 4), so that ESamp with beta = 0 reproduces vanilla sampling token for token.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Union

import torch

from . import _ops as ops
from .config import ESampConfig
from .distiller import Distiller
from .trainer import Trainer

__all__ = ["ESamp", "sample_tokens", "filters_active", "row_seeds"]

RowArg = Union[float, int, torch.Tensor]


def row_seeds(seed: int, rows: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Per-row int64 seeds for `rows` rows from one user seed (esamp.ops.derive_row_seeds: splitmix64(seed + i)).

    Row i always gets the same seed whatever the number of rows, so sample j of prompt p (row p * n + j) is
    reproducible across batch compositions with the same prompt order.
    """
    return ops.derive_row_seeds(seed, rows).to(device)


def _any(v, pred) -> bool:
    if isinstance(v, torch.Tensor):
        return bool(pred(v).any())
    return bool(pred(torch.tensor(v)))


def filters_active(*, top_k: RowArg = 0, top_p: RowArg = 1.0, min_p: RowArg = 0.0, vocab_size: int) -> bool:
    """True when any row has a top-k (0 < k < V), top-p (< 1) or min-p (> 0) filter on."""
    return (_any(top_k, lambda k: (k > 0) & (k < vocab_size)) or _any(top_p, lambda p: p < 1.0)
            or _any(min_p, lambda p: p > 0.0))


_ZEROS: Dict[tuple, torch.Tensor] = {}


def _zeros_pred(B: int, H: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached all-zero prediction tensor for beta = 0 rows (the operator computes no dot product for them)."""
    key = (B, H, dtype, str(device))
    z = _ZEROS.get(key)
    if z is None:
        if len(_ZEROS) > 16:
            _ZEROS.clear()
        z = _ZEROS[key] = torch.zeros(B, H, dtype=dtype, device=device)
    return z


def sample_tokens(logits: torch.Tensor, lm_head_weight: torch.Tensor, *, pred_hidden: Optional[torch.Tensor] = None,
                  lm_head_bias: Optional[torch.Tensor] = None, beta: RowArg = 0.0, temperature: RowArg = 1.0,
                  top_k: RowArg = 0, top_p: RowArg = 1.0, min_p: RowArg = 0.0, seeds: torch.Tensor,
                  step: Union[int, torch.Tensor] = 0):
    """The one sampling call shared by vanilla and ESamp rows: esamp.ops.reweight (SPEC 3 + 4).

    With beta = 0 (vanilla, or ESamp rows whose logits already come from the mixed LM-head input) the operator
    samples from softmax(l / T) restricted to the filtered candidate set, with the Gumbel noise of (seed, step).
    Returns (tokens int64 [B], logprobs float32 [B]).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits: expected [B, V], got shape {tuple(logits.shape)}")
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds: expected an int64 tensor [B] (see esamp.sampler.row_seeds), got {type(seeds)}")
    if pred_hidden is None:
        pred_hidden = _zeros_pred(logits.shape[0], lm_head_weight.shape[1], lm_head_weight.dtype, logits.device)
    return ops.reweight(logits, pred_hidden, lm_head_weight, lm_head_bias=lm_head_bias, beta=beta,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds, step=step)


def _as_rows(v: RowArg, B: int, dtype, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype).reshape(-1).expand(B) if v.numel() == 1 else v.to(device, dtype)
    return torch.full((B,), v, dtype=dtype, device=device)


class ESamp:
    """ESamp sampler state: a bank of distiller slots, request -> slot bookkeeping, warm start, step helpers.

    `hidden_size` is the model's hidden size H (the LM-head input size).  `gamma_init` (optional, [H]) initialises
    the distiller's output RMSNorm scale, typically with the host model's final-norm weight so that an untrained
    distiller already outputs vectors of the right per-channel scale.
    """

    def __init__(self, config: Optional[ESampConfig] = None, *, hidden_size: int,
                 device: Union[str, torch.device] = "cpu", slots: Optional[int] = None,
                 gamma_init: Optional[torch.Tensor] = None, ring_rows: int = 1024):
        config = ESampConfig() if config is None else config
        if not isinstance(config, ESampConfig):
            raise TypeError(f"config: expected an esamp.ESampConfig, got {type(config).__name__}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected an int >= 1, got {hidden_size!r}")
        if config.mode == "shared":
            S = 1
        else:
            S = config.slots if config.slots is not None else (slots if slots is not None else 1)
        if not isinstance(S, int) or S < 1:
            raise ValueError(f"slots: expected an int >= 1, got {S!r}")
        self.config = config
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.gamma_init = None if gamma_init is None else gamma_init.detach().to(self.device, torch.float32)
        self.ring_rows = int(ring_rows)
        if self.ring_rows < 1:
            raise ValueError(f"ring_rows: expected an int >= 1, got {ring_rows!r}")
        self._new_bank(S)
        self._owner: Dict[Hashable, int] = {}
        self._counts = {"requests": 0, "warmup_rows": 0, "warmup_steps": 0, "decode_rows": 0, "decode_steps": 0,
                        "predicted_rows": 0, "gated_rows": 0}

    # ------------------------------------------------------------------ bank and slots
    def _new_bank(self, S: int) -> None:
        c = self.config
        kw = dict(rank=c.effective_rank, layers=c.layers, slots=S, lr=c.lr, adam_eps=c.adam_eps, clip=c.clip,
                  device=self.device, seed=c.init_seed, gamma_init=self.gamma_init)
        if c.async_trainer:
            self.trainer: Optional[Trainer] = Trainer(self.hidden_size, ring_rows=self.ring_rows, **kw)
            self.distiller: Optional[Distiller] = None
        else:
            self.trainer = None
            self.distiller = Distiller(self.hidden_size, **kw)
        self._nslots = S
        self._free: List[int] = list(range(S))

    def _reset_slots(self, slots) -> None:
        self.bank.reset(slots)

    @property
    def slots(self) -> int:
        return self._nslots

    @property
    def bank(self) -> Union[Distiller, Trainer]:
        """The esamp.Distiller (synchronous updates) or esamp.Trainer (async_trainer=True) holding the slots."""
        return self.trainer if self.trainer is not None else self.distiller

    @property
    def active_requests(self) -> int:
        return len(self._owner)

    def ensure_slots(self, n: int, rows: int = 0) -> None:
        """Make room for `n` concurrent requests (and, with the async trainer, updates of up to `rows` rows).

        In per-prompt mode with config.slots = None the bank grows (only while no request is active); with a fixed
        config.slots a request beyond it raises.  A rebuilt bank starts from fresh slots."""
        grow = self.config.mode != "shared" and n > self.slots
        if grow and self.config.slots is not None:
            raise ValueError(f"slots: this call needs {n} concurrent per-prompt distillers, but "
                             f"ESampConfig.slots = {self.config.slots}; raise slots or pass fewer prompts")
        ring = self.trainer is not None and rows > self.ring_rows
        if not (grow or ring):
            return
        if self._owner:
            raise RuntimeError(f"ESamp: cannot grow the bank (slots {self.slots} -> {n}, ring rows "
                               f"{self.ring_rows} -> {rows}) while {len(self._owner)} requests are active")
        if ring:
            self.ring_rows = rows
        self._new_bank(max(n, self.slots) if self.config.mode != "shared" else 1)

    def acquire(self, request_id: Hashable) -> int:
        """Slot of a new request.  Per-prompt mode: a free slot, re-initialised (parameters and Adam state) so
        that it inherits nothing from an earlier request.  Shared mode: slot 0, kept as it is."""
        if request_id in self._owner:
            raise ValueError(f"request_id: {request_id!r} is already active")
        if self.config.mode == "shared":
            slot = 0
        else:
            if not self._free:
                raise RuntimeError(f"ESamp: all {self.slots} distiller slots are in use "
                                   f"(active requests: {len(self._owner)}); release one or raise slots")
            slot = self._free.pop(0)
            self._reset_slots([slot])
        self._owner[request_id] = slot
        self._counts["requests"] += 1
        return slot

    def release(self, request_id: Hashable) -> None:
        slot = self._owner.pop(request_id, None)
        if slot is None:
            raise KeyError(f"request_id: {request_id!r} is not active")
        if self.config.mode != "shared":
            self._free.append(slot)
            self._free.sort()

    def release_all(self) -> None:
        for rid in list(self._owner):
            self.release(rid)

    def reset(self) -> None:
        """Re-initialise every slot (also the shared one)."""
        self._reset_slots(torch.arange(self.slots))

    # ------------------------------------------------------------------ per-step pieces
    def _cast(self, v: torch.Tensor) -> torch.Tensor:
        dt = self.config.dtype
        return v if dt is None or v.dtype == dt else v.to(dt)

    def warm_start(self, x: torch.Tensor, t: torch.Tensor, slot_ids: torch.Tensor,
                   steps: Optional[int] = None) -> Optional[torch.Tensor]:
        """`steps` (default config.warmup_steps) optimizer steps on prompt pairs (x [N, H], t [N, H]) with
        per-row slot ids [N].  Returns the last step's per-slot losses (None when steps = 0 or with the async
        trainer, whose updates are still queued)."""
        steps = self.config.warmup_steps if steps is None else steps
        if steps <= 0 or x.shape[0] == 0:
            return None
        x, t = self._cast(x).contiguous(), self._cast(t).contiguous()
        slot_ids = slot_ids.to(self.device, torch.int64)
        losses = None
        for _ in range(steps):
            losses = self._train(x, t, slot_ids)
        self._counts["warmup_rows"] += x.shape[0] * steps
        self._counts["warmup_steps"] += steps
        return losses

    def predict(self, x: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        """Distiller prediction t_hat [B, H] (in x's dtype) for source rows x [B, H]."""
        x = self._cast(x).contiguous()
        self._counts["predicted_rows"] += x.shape[0]
        slot_ids = slot_ids.to(self.device, torch.int64)
        if self.trainer is not None:
            return self.trainer.predict(x, slot_ids)
        return self.distiller.forward(x, slot_ids)

    def _train(self, x: torch.Tensor, t: torch.Tensor, slot_ids: torch.Tensor) -> Optional[torch.Tensor]:
        if self.trainer is not None:
            self.trainer.observe(x, t, slot_ids)   # queued; the next predict() waits for it
            return None
        return self.distiller.train_step(x, t, slot_ids)

    def latent_mixing(self, *, top_k: RowArg = 0, top_p: RowArg = 1.0, min_p: RowArg = 0.0, vocab_size: int) -> bool:
        """Whether this step can use latent mixing (SPEC 3: no filter active) instead of the fused reweight."""
        return not filters_active(top_k=top_k, top_p=top_p, min_p=min_p, vocab_size=vocab_size)

    def row_betas(self, temperature: RowArg, B: int, device, *, t: Optional[torch.Tensor] = None,
                  t_hat: Optional[torch.Tensor] = None, position: Optional[Union[int, torch.Tensor]] = None
                  ) -> torch.Tensor:
        """beta per row: config.beta, and 0 on greedy rows (T == 0), which ESamp leaves unchanged.

        The experimental gates of ESampConfig apply when their inputs are given: ``explore_tokens`` needs
        `position` (tokens the row has generated so far: an int for every row or a tensor [B]); ``gate_rel_err``
        needs `t` (the LM-head input) and `t_hat` (the distiller's prediction) of the rows."""
        T = _as_rows(temperature, B, torch.float32, device)
        beta = torch.where(T > 0, torch.full_like(T, self.config.beta), torch.zeros_like(T))
        c = self.config
        if c.explore_tokens > 0 and position is not None:
            pos = _as_rows(position, B, torch.float32, device)
            keep = pos < c.explore_tokens
            self._counts["gated_rows"] += int((~keep & (beta > 0)).sum())
            beta = torch.where(keep, beta, torch.zeros_like(beta))
        if c.gate_rel_err is not None and t is not None and t_hat is not None:
            tf, hf_ = t.float(), t_hat.float()
            rel = ((tf - hf_) ** 2).sum(-1) / (tf ** 2).sum(-1).clamp(min=1e-30)
            keep = rel <= c.gate_rel_err
            self._counts["gated_rows"] += int((~keep & (beta > 0)).sum())
            beta = torch.where(keep, beta, torch.zeros_like(beta))
        return beta

    def mix(self, hidden: torch.Tensor, t_hat: torch.Tensor, temperature: RowArg = 1.0,
            beta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """LM-head input for latent mixing: (1 + beta) hidden - beta t_hat per row (beta = 0 on greedy rows;
        `beta`: per-row values from row_betas, e.g. with the experimental gates)."""
        if t_hat.dtype != hidden.dtype:
            t_hat = t_hat.to(hidden.dtype)
        if beta is None:
            beta = self.row_betas(temperature, hidden.shape[0], hidden.device)
        return ops.mix_hidden(hidden.contiguous(), t_hat.contiguous(), beta)

    def sample(self, logits: torch.Tensor, t_hat: torch.Tensor, lm_head_weight: torch.Tensor, *,
               latent_mixed: bool, lm_head_bias: Optional[torch.Tensor] = None, temperature: RowArg = 1.0,
               top_k: RowArg = 0, top_p: RowArg = 1.0, min_p: RowArg = 0.0, seeds: torch.Tensor,
               step: Union[int, torch.Tensor] = 0, beta: Optional[torch.Tensor] = None):
        """Sample one token per row.  `latent_mixed`: the logits already come from the mixed LM-head input
        (then beta = 0 here, no dot products); otherwise the fused reweight mixes on the candidate set (with
        `beta`, per-row values from row_betas, when given)."""
        if latent_mixed:
            return sample_tokens(logits, lm_head_weight, lm_head_bias=lm_head_bias, beta=0.0,
                                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                                 step=step)
        if beta is None:
            beta = self.row_betas(temperature, logits.shape[0], logits.device)
        pred = t_hat if t_hat.dtype == lm_head_weight.dtype else t_hat.to(lm_head_weight.dtype)
        return sample_tokens(logits, lm_head_weight, pred_hidden=pred.contiguous(), lm_head_bias=lm_head_bias,
                             beta=beta, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds,
                             step=step)

    def update(self, x: torch.Tensor, t: torch.Tensor, slot_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """One optimizer step on this step's rows (x [N, H], t [N, H]); returns per-slot losses [S] (None with the
        async trainer: the step is queued and runs while the caller continues)."""
        if x.shape[0] == 0:
            return None
        losses = self._train(self._cast(x).contiguous(), self._cast(t).contiguous(),
                             slot_ids.to(self.device, torch.int64))
        self._counts["decode_rows"] += x.shape[0]
        self._counts["decode_steps"] += 1
        return losses

    # ------------------------------------------------------------------ convenience: one whole step
    def step(self, x: torch.Tensor, t: torch.Tensor, slot_ids: torch.Tensor, lm_head, lm_head_weight: torch.Tensor,
             *, lm_head_bias: Optional[torch.Tensor] = None, temperature: RowArg = 1.0, top_k: RowArg = 0,
             top_p: RowArg = 1.0, min_p: RowArg = 0.0, seeds: torch.Tensor, step: Union[int, torch.Tensor] = 0,
             train: bool = True):
        """predict -> (latent mix) -> lm_head -> sample -> update, for engines that call the LM head themselves.

        `lm_head` maps [B, H] LM-head inputs to [B, V] logits.  Returns (tokens, logprobs)."""
        V = lm_head_weight.shape[0]
        t_hat = self.predict(x, slot_ids)
        latent = self.latent_mixing(top_k=top_k, top_p=top_p, min_p=min_p, vocab_size=V)
        logits = lm_head(self.mix(t, t_hat, temperature) if latent else t)
        out = self.sample(logits, t_hat, lm_head_weight, latent_mixed=latent, lm_head_bias=lm_head_bias,
                          temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seeds=seeds, step=step)
        if train:
            self.update(x, t, slot_ids)
        return out

    # ------------------------------------------------------------------ introspection
    def stats(self) -> Dict[str, object]:
        """Trainer counters (a host synchronisation; with the async trainer it first waits for queued updates) and
        host-side bookkeeping (rows handed to warm start / updates / predictions)."""
        if self.trainer is not None:
            self.trainer.synchronize()
        s: Dict[str, object] = dict(self.bank.stats())
        s.update(self._counts)
        s["slots"] = self.slots
        s["nbytes_per_slot"] = self.bank.nbytes_per_slot
        s["async_trainer"] = self.trainer is not None
        return s

    def __repr__(self) -> str:
        c = self.config
        return (f"ESamp(beta={c.beta}, mode={c.mode!r}, rank={c.effective_rank}, layers={c.layers}, "
                f"slots={self.slots}, hidden_size={self.hidden_size}, active={len(self._owner)})")
