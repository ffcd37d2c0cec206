"""Special-token exemption for ESamp (evaluation only): ESamp that leaves chosen tokens (end of sequence, chat
markers) to the base model.

Why: the distiller is trained on the contexts of the tokens that were sampled; for a token such as end-of-sequence,
whose logit the mixing m = (1 + beta) l - beta d moves by beta (l - d), nothing ties the change to "this context is
novel" -- a systematic gap between l_eos and d_eos changes how often samples stop.  Two exemptions, both applied
per row on the candidate set C of SPEC 3 (computed from the unmixed logits, as always):

- ``"mass"`` (stopping-probability preserving): every exempt token s keeps its base probability p_s = softmax(z)_s
  (z = l / T over C), and ESamp redistributes only the remaining mass 1 - sum_s p_s over the other candidates in
  proportion to the ESamp distribution softmax(m) restricted to them.  Shift-invariant (adding a constant to l or
  d changes nothing) and exact: the final distribution is
  q_s = p_s (s exempt),  q_c = (1 - sum_s p_s) * exp(m_c) / sum_{c' not exempt} exp(m_c')  (c not exempt).
- ``"logit"`` (a per-token mask on the mixing): m_s = z_s for exempt tokens, m_c as usual otherwise -- what a
  kernel with a per-token "beta = 0" mask would compute.  Not shift-invariant: it depends on the offset between l
  and d, so it is the naive variant, evaluated for comparison.

- ``"recent"`` (repetition-preserving): ``"mass"`` over the special tokens plus, per row, every token the row
  generated in its last RECENT_WINDOW (16) steps.  ESamp then cannot raise the probability of repeating what the
  sample just wrote (the sum of those tokens' probabilities is the base model's), and explores only among the other
  candidates.  Why: the loops ESamp adds on MT-bench are word repetitions ("bracelet bracelet ..."); vanilla at
  T = 1 almost never loops, and sharpening (T 0.8: 0.3 % loops) does, so a mixing that sharpens a repeat -- (1 + beta)
  l where the distiller's d is uninformative, or a copy the shallow distiller cannot predict -- is a plausible cause.
  The row's history is handed over by esamp.hf.generate (``set_recent``); other loops must do the same.
- ``"repeat"`` (loop-extension preserving, narrower than ``"recent"``): ``"mass"`` over the special tokens plus, per
  row, only the tokens that would extend a repetition of what the row generated in its last REPEAT_WINDOW (32)
  steps: the last token y itself (a 1-gram repeat) and every token that followed an earlier occurrence of y in the
  window (the next token of an n-gram repeat of any length, as an induction copy would predict).  Every other
  candidate -- among them recent tokens that do not continue a repeat -- is left to ESamp.  Why: "recent" removes the
  runaway loops on MT-bench but costs a third of the Vendi margin, because text re-uses its recent words far more
  often than it loops; the set that can start or continue a loop is much smaller.

All are implemented here in Python through the public operators, without touching the kernels: the final logits f
(q = softmax(f) on C, -inf elsewhere) are sampled by ``esamp.ops.reweight`` with beta = 0, T = 1 and no filter,
i.e. with the very same Gumbel noise (seed, step, token id) as the unexempted sampler, so exempt and plain runs with
the same seed are coupled token by token.  The cost is one full LM-head product per row and step for the reference
logits on the latent-mixing path (no filter), which is fine for evaluation and is why this is not the library path.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import torch

from .. import _ops as ops
from ..config import ESampConfig
from ..sampler import ESamp, _zeros_pred

__all__ = ["ExemptESamp", "exempt_logits", "EXEMPT_MODES", "RECENT_WINDOW", "REPEAT_WINDOW", "make_exempt_sampler"]

EXEMPT_MODES = ("mass", "logit", "recent", "repeat")
RECENT_WINDOW = 16        # "recent": a row's last 16 generated tokens (loops are n-grams of 1-6 tokens)
REPEAT_WINDOW = 32        # "repeat": the history searched for earlier occurrences of the last token (6-grams x 4 + 8)


def exempt_logits(m: torch.Tensor, z: torch.Tensor, exempt: torch.Tensor, mode: str) -> torch.Tensor:
    """Final logits f [B, V] (float32; -inf off the candidate set) from ESamp logits m and base logits z.

    m, z: float32 [B, V], both already divided by T, finite exactly on the candidate set C (-inf elsewhere).
    exempt: bool [V] (True = exempt token) or [B, V] (a set per row).  See the module docstring for the modes
    ("recent" and "repeat" are "mass" with a per-row set: pass mode "mass" here)."""
    if mode not in ("mass", "logit"):
        raise ValueError(f"mode: expected 'mass' or 'logit', got {mode!r}")
    if m.shape != z.shape or m.dim() != 2:
        raise ValueError(f"m, z: expected equal [B, V] shapes, got {tuple(m.shape)} and {tuple(z.shape)}")
    if exempt.shape not in ((m.shape[1],), tuple(m.shape)) or exempt.dtype != torch.bool:
        raise ValueError(f"exempt: expected a bool tensor [V = {m.shape[1]}] or [B, V] = {list(m.shape)}, got "
                         f"{exempt.dtype} {tuple(exempt.shape)}")
    m, z = m.float(), z.float()
    ex = exempt if exempt.dim() == 2 else exempt[None, :].expand_as(m)
    if mode == "logit":
        return torch.where(ex, z, m)
    ninf = torch.full_like(m, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)                       # base log-probabilities on C
    logp_ex = torch.where(ex, logp, ninf)
    mass_ex = torch.logsumexp(logp_ex, dim=-1, keepdim=True).exp().clamp(max=1.0)   # sum_s p_s per row
    m_rest = torch.where(ex, ninf, m)
    lse_rest = torch.logsumexp(m_rest, dim=-1, keepdim=True)
    f_rest = m_rest - lse_rest + torch.log1p(-mass_ex)
    f = torch.where(ex, logp_ex, f_rest)
    # rows whose candidates are all exempt: lse_rest = -inf makes f_rest NaN; those rows are the base distribution
    no_rest = torch.isinf(lse_rest).expand_as(f)
    f = torch.where(no_rest, logp, f)
    return torch.where(torch.isnan(f), ninf, f)


class ExemptESamp(ESamp):
    """An esamp.ESamp whose sampling step exempts the tokens `exempt_ids` from the ESamp intervention.

    Pass it to ``esamp.hf.generate(..., esamp=ExemptESamp(...))``.  Warm start, predictions and updates are those of
    ESamp; only :meth:`mix` (remembers the unmixed LM-head input) and :meth:`sample` differ.  With modes "recent" and
    "repeat", the loop must call :meth:`set_recent` with each row's last `recent_window` tokens before every
    sample() (esamp.hf.generate does)."""

    def __init__(self, config: Optional[ESampConfig] = None, *, hidden_size: int, exempt_ids: Iterable[int],
                 vocab_size: int, mode: str = "mass", device: Union[str, torch.device] = "cpu",
                 slots: Optional[int] = None, gamma_init: Optional[torch.Tensor] = None, ring_rows: int = 1024):
        super().__init__(config, hidden_size=hidden_size, device=device, slots=slots, gamma_init=gamma_init,
                         ring_rows=ring_rows)
        if mode not in EXEMPT_MODES:
            raise ValueError(f"mode: expected one of {EXEMPT_MODES}, got {mode!r}")
        ids = sorted({int(i) for i in exempt_ids})
        if any(not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"exempt_ids: expected token ids in [0, {vocab_size}), got {ids}")
        self.mode = mode
        self.exempt_ids = ids
        self.exempt = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        if ids:
            self.exempt[torch.tensor(ids, device=self.device)] = True
        self._hidden: Optional[torch.Tensor] = None
        self.recent_window = {"recent": RECENT_WINDOW, "repeat": REPEAT_WINDOW}.get(mode, 0)
        self._recent: Optional[torch.Tensor] = None

    def set_recent(self, tokens: torch.Tensor) -> None:
        """The rows' recent tokens for the next sample() (modes "recent", "repeat"): int64 [B, w], w <= recent_window
        (w = 0 at the first step); ids outside [0, V) (padding of finished rows) are ignored."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected [B, w], got shape {tuple(tokens.shape)}")
        self._recent = tokens.detach().to(self.device, torch.int64)

    def _row_exempt(self, B: int) -> torch.Tensor:
        """The exempt set of this step: [V] (modes mass / logit) or [B, V] (modes recent / repeat)."""
        if not self.recent_window:
            return self.exempt
        rec = self._recent
        if rec is None:
            raise RuntimeError("ExemptESamp(mode='recent').sample: no recent tokens were given for this step "
                               "(call set_recent before sample; esamp.hf.generate does)")
        if rec.shape[0] != B:
            raise RuntimeError(f"ExemptESamp: recent tokens for {rec.shape[0]} rows, {B} logit rows")
        V = self.exempt.shape[0]
        ex = torch.zeros((B, V + 1), dtype=torch.bool, device=self.device)     # column V collects padding
        ok = (rec >= 0) & (rec < V)
        if self.mode == "repeat" and rec.shape[1] > 0:
            # the last token, and the followers of its earlier occurrences in the window
            last = rec[:, -1:]
            follows = (rec[:, :-1] == last) & ok[:, :-1] & ok[:, 1:]
            rec = torch.cat([last, torch.where(follows, rec[:, 1:], torch.full_like(rec[:, 1:], V))], dim=1)
            ok = torch.cat([ok[:, -1:], follows], dim=1)
        ex.scatter_(1, torch.where(ok, rec, torch.full_like(rec, V)), True)
        ex = ex[:, :V]
        ex |= self.exempt[None, :]
        return ex

    def mix(self, hidden: torch.Tensor, t_hat: torch.Tensor, temperature=1.0, beta=None) -> torch.Tensor:
        self._hidden = hidden.detach().clone()
        return super().mix(hidden, t_hat, temperature, beta=beta)

    def sample(self, logits: torch.Tensor, t_hat: torch.Tensor, lm_head_weight: torch.Tensor, *,
               latent_mixed: bool, lm_head_bias: Optional[torch.Tensor] = None, temperature=1.0, top_k=0,
               top_p=1.0, min_p=0.0, seeds: torch.Tensor, step=0, beta=None):
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            # greedy rows are not changed by ESamp; per-row temperatures are not needed by the evaluation
            return super().sample(logits, t_hat, lm_head_weight, latent_mixed=latent_mixed,
                                  lm_head_bias=lm_head_bias, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, seeds=seeds, step=step, beta=beta)
        B, V = logits.shape
        if V != self.exempt.shape[0]:
            raise ValueError(f"logits: expected V = {self.exempt.shape[0]} columns, got {V}")
        T = float(temperature)
        W = lm_head_weight
        if latent_mixed:
            if self._hidden is None:
                raise RuntimeError("ExemptESamp.sample: latent_mixed=True but mix() was not called for this step")
            h = self._hidden
            if h.shape[0] != B:                       # prefill: one row per prompt, logits expanded to n samples
                if B % h.shape[0]:
                    raise RuntimeError(f"ExemptESamp: {h.shape[0]} hidden rows for {B} logit rows")
                h = h.repeat_interleave(B // h.shape[0], 0)
            ref = h.float() @ W.float().t()
            if lm_head_bias is not None:
                ref = ref + lm_head_bias.float()
            m = logits.float() / T
            z = ref / T
        else:
            pred = t_hat if t_hat.dtype == W.dtype else t_hat.to(W.dtype)
            if beta is None:
                beta = self.row_betas(temperature, B, logits.device)
            filt = dict(temperature=T, top_k=top_k, top_p=top_p, min_p=min_p)
            m = ops.reweight_logits(logits, pred.contiguous(), W, lm_head_bias=lm_head_bias, beta=beta, **filt)
            z = ops.reweight_logits(logits, _zeros_pred(B, W.shape[1], W.dtype, logits.device), W,
                                    lm_head_bias=lm_head_bias, beta=0.0, **filt)
        f = exempt_logits(m, z, self._row_exempt(B), "logit" if self.mode == "logit" else "mass")
        self._hidden = None
        self._recent = None
        return ops.reweight(f.contiguous(), _zeros_pred(B, W.shape[1], W.dtype, logits.device), W, beta=0.0,
                            temperature=1.0, seed=seeds, step=step)


def make_exempt_sampler(model, config: ESampConfig, tokenizer=None, *, exempt_ids: Optional[Sequence[int]] = None,
                        mode: str = "mass", slots: Optional[int] = None) -> ExemptESamp:
    """An ExemptESamp sized for a Hugging Face model (like esamp.hf.make_sampler).  Default exempt set: the
    tokenizer's special tokens plus the model's end-of-sequence ids."""
    from .. import hf

    head = hf.find_lm_head(model)
    if exempt_ids is None:
        ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        ids.update(hf._eos_ids(model, tokenizer))
        exempt_ids = sorted(ids)
    return ExemptESamp(config, hidden_size=int(head.weight.shape[1]), exempt_ids=exempt_ids,
                       vocab_size=int(head.weight.shape[0]), mode=mode, device=head.weight.device, slots=slots,
                       gamma_init=hf.find_final_norm(model))
