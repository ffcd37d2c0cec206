"""Plain references of the reweight family (SPEC sections 3 and 4): Philox4x32-10 and the Gumbel noise,
the candidate set, reweight, reweight_logits and mix_hidden.

Two kinds of reference live here:

* ``reweight_details`` / ``reweight`` / ``reweight_logits`` follow SPEC 3 literally, one row at a time:
  z and m in float32 with exactly the operations of the kernels (numpy float32 arithmetic, true division),
  the top-p probabilities and the distiller dot products in float64, a full sort for top-k / top-p, and
  the Gumbel noise of SPEC 4 from a numpy Philox.  They also report how close each row is to a filter
  threshold and to a sampling tie, so that tests can compare exactly where exactness is meaningful.
* ``reweight_eager`` is the natural batched PyTorch composition an engine would write (masks, sort,
  dense ``pred @ W.T``, ``torch.rand`` Gumbel noise).  It is the baseline of bench/bench_reweight.py; it
  draws its noise from torch's generator, so its tokens are not comparable with the kernels'.

Non-finite inputs follow csrc/cpu/sampling_cpu.cpp: a NaN logit counts as -inf, +inf is clamped to the
largest finite float before dividing by T, a finite logit whose z overflows is clamped to +-FLT_MAX, a row
with no finite logit returns token 0 and logprob -inf, mixed logits are clamped to the finite range with
NaN counted as -inf.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "philox4x32_10",
    "gumbel_noise",
    "candidate_set",
    "reweight_details",
    "reweight",
    "reweight_logits",
    "mix_hidden",
    "reweight_eager",
]

# ---------------------------------------------------------------------------------------------------
# SPEC 4: Philox4x32-10 and Gumbel noise
# ---------------------------------------------------------------------------------------------------
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
GUMBEL_TAG = 0x45534D50  # "ESMP"
_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
FLT_MAX = float(np.finfo(np.float32).max)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32 with 10 rounds.  ``counter``: array-like [..., 4] of uint32 words; ``key``: (k0, k1),
    each an int or an array broadcastable with counter[..., 0].  Returns uint32 [..., 4]."""
    c = np.asarray(counter, dtype=np.uint64) & np.uint64(_MASK32)
    c0, c1, c2, c3 = c[..., 0], c[..., 1], c[..., 2], c[..., 3]
    k0 = np.asarray(key[0], dtype=np.uint64) & np.uint64(_MASK32)
    k1 = np.asarray(key[1], dtype=np.uint64) & np.uint64(_MASK32)
    m0, m1, mask = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(_MASK32)
    w0, w1, sh = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1), np.uint64(32)
    for _ in range(10):
        p0 = m0 * c0  # both < 2^32, so the uint64 product is exact
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> sh) ^ c1 ^ k0, p1 & mask, (p0 >> sh) ^ c3 ^ k1, p0 & mask
        k0 = (k0 + w0) & mask
        k1 = (k1 + w1) & mask
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _log_f32(x: np.ndarray) -> np.ndarray:
    # log of float32 values, computed in float64 and rounded once to float32 (the correctly rounded
    # float32 log except in double-rounding corner cases).
    return np.log(x.astype(np.float64)).astype(np.float32)


def uniform_from_words(w: np.ndarray) -> np.ndarray:
    """u = ((w >> 8) + 0.5) * 2^-24 as float32 (the value 1.0 that rounding can produce is mapped to the
    largest float below 1, as in esamp/philox.h)."""
    w = np.asarray(w, dtype=np.uint64)
    u = (np.uint64(2) * (w >> np.uint64(8)) + np.uint64(1)).astype(np.float32) * np.float32(2.0 ** -25)
    return np.where(u < np.float32(1.0), u, np.float32(np.nextafter(np.float32(1), np.float32(0)))).astype(np.float32)


def gumbel_noise(seed: int, step: int, v) -> np.ndarray:
    """Gumbel noise g(seed, step, v) of SPEC 4 for token ids v (int or int array), float32."""
    s = int(seed) & _MASK64
    t = int(step) & _MASK64
    v = np.asarray(v, dtype=np.int64)
    ctr = np.zeros(v.shape + (4,), dtype=np.uint64)
    ctr[..., 0] = (v >> 2).astype(np.uint64)
    ctr[..., 1] = t & _MASK32
    ctr[..., 2] = (t >> 32) & _MASK32
    ctr[..., 3] = GUMBEL_TAG
    words = philox4x32_10(ctr, (s & _MASK32, (s >> 32) & _MASK32))
    w = np.take_along_axis(words, (v & 3)[..., None], axis=-1)[..., 0]
    u = uniform_from_words(w)
    return -_log_f32(-_log_f32(u))


# ---------------------------------------------------------------------------------------------------
# SPEC 3: candidate set, mixed logits, sampling
# ---------------------------------------------------------------------------------------------------
def _as_f32_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def _sanitize_logits(l: np.ndarray) -> np.ndarray:
    l = np.where(np.isnan(l), np.float32(-np.inf), l)
    return np.minimum(l, np.float32(FLT_MAX)).astype(np.float32)


def _z(l: np.ndarray, T: np.float32) -> np.ndarray:
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = (l / T).astype(np.float32)  # numpy float32 true division, elementwise IEEE
    z = np.clip(z, np.float32(-FLT_MAX), np.float32(FLT_MAX))
    return np.where(l == -np.inf, np.float32(-np.inf), z).astype(np.float32)


def candidate_set(z: np.ndarray, top_k: int, top_p: float, min_p: float):
    """Candidate set of SPEC 3.2 for one row of z (float32, no NaN).

    Returns (mask [V] bool, margin), where margin is the smallest relative distance of any value to a
    threshold decision it took (inf when no rounding-sensitive decision was taken): a kernel whose
    exp/log/sums round differently can only disagree with this reference on rows with a small margin.
    Top-k compares z values exactly on both sides, so it contributes no margin.
    """
    V = z.shape[0]
    finite = z > -np.inf
    if not finite.any():
        return np.zeros(V, dtype=bool), math.inf
    zmax = z[finite].max()
    keep = finite.copy()
    margin = math.inf
    min_p = np.float32(min_p)
    if min_p > 0:
        thr = np.float32(zmax + _log_f32(np.array([min_p]))[0])
        keep &= z >= thr
        zf = z[finite].astype(np.float64)
        margin = min(margin, float(np.min(np.abs(zf - float(thr)))) / max(1.0, abs(float(thr))))
    if 0 < top_k < V:
        vals = np.sort(z[keep])[::-1]
        if vals.shape[0] > top_k:
            keep &= z >= vals[top_k - 1]
    top_p = np.float32(top_p)
    if top_p < 1:
        idx = np.nonzero(keep)[0]
        e = np.exp(z[idx].astype(np.float64) - float(zmax))
        p = e / e.sum()
        ps = np.sort(p)[::-1]
        cs = np.cumsum(ps)
        target = float(top_p)
        n = int(np.searchsorted(cs, target, side="left"))  # first prefix with mass >= top_p
        n = min(n, ps.shape[0] - 1)
        tau = ps[n]
        keep[idx[p < tau]] = False
        # Rounding-sensitive decisions: the prefix length (cumulative masses around top_p) and the
        # classification of distinct probabilities next to tau.
        margin = min(margin, abs(cs[n] - target) / target)
        if n > 0:
            margin = min(margin, abs(cs[n - 1] - target) / target)
        distinct = np.unique(ps)
        j = int(np.searchsorted(distinct, tau))
        for k in (j - 1, j + 1):
            if 0 <= k < distinct.shape[0]:
                margin = min(margin, abs(distinct[k] - tau) / tau)
    keep[int(np.argmax(np.where(finite, z, -np.inf)))] = True
    return keep, margin


def _row_param(x, B: int, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        a = x.detach().cpu().numpy().astype(dtype)
        return np.broadcast_to(a, (B,)) if a.ndim == 0 else a
    return np.full((B,), x, dtype=dtype)


def reweight_details(logits: torch.Tensor, pred_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                     lm_head_bias: Optional[torch.Tensor] = None, *, beta=0.25, temperature=1.0, top_k=0,
                     top_p=1.0, min_p=0.0, seed=None, step=None):
    """Per-row reference of SPEC 3.  Returns a list of dicts with keys:
    ``greedy``, ``token``, ``logprob``, ``mask`` (candidate set, bool [V]), ``m`` (float32 [V], -inf off C),
    ``margin`` (see candidate_set), ``key_gap`` (best minus second-best m + g over C; inf if |C| = 1),
    ``m_tol`` (float64 [V]: a bound on |m_kernel - m_reference| from float32 accumulation of the dot
    product, see tests/test_reweight.py).  Sampling fields are present only when seed and step are given.
    """
    B, V = logits.shape
    H = pred_hidden.shape[1]
    L = _as_f32_numpy(logits)
    P = pred_hidden.detach().cpu().double().numpy()
    W = lm_head_weight.detach().cpu()
    bias = None if lm_head_bias is None else lm_head_bias.detach().cpu().double().numpy()
    betas = _row_param(beta, B, np.float32)
    temps = _row_param(temperature, B, np.float32)
    ks = _row_param(top_k, B, np.int64)
    tps = _row_param(top_p, B, np.float32)
    mps = _row_param(min_p, B, np.float32)
    sample = seed is not None
    if sample:
        seeds = _row_param(seed, B, np.int64)
        steps = _row_param(step if step is not None else 0, B, np.int64)
    u = 2.0 ** -24
    rows = []
    for r in range(B):
        l = _sanitize_logits(L[r])
        T = np.float32(temps[r])
        res = {"greedy": not (T > 0)}
        if res["greedy"]:
            am = int(np.argmax(l))
            m = np.full(V, -np.inf, dtype=np.float32)
            m[am] = 0
            mask = np.zeros(V, dtype=bool)
            mask[am] = True
            res.update(mask=mask, m=m, margin=math.inf, m_tol=np.zeros(V), token=am, logprob=0.0,
                       key_gap=math.inf)
            rows.append(res)
            continue
        z = _z(l, T)
        mask, margin = candidate_set(z, int(ks[r]), float(tps[r]), float(mps[r]))
        m = np.full(V, -np.inf, dtype=np.float32)
        m_tol = np.zeros(V)
        idx = np.nonzero(mask)[0]
        b = np.float32(betas[r])
        if idx.shape[0] == 0:  # no finite logit
            res.update(mask=mask, m=m, margin=margin, m_tol=m_tol, token=0, logprob=-math.inf, key_gap=math.inf)
            rows.append(res)
            continue
        if b == 0:
            m[idx] = z[idx]
        else:
            Wc = W[torch.from_numpy(idx)].double().numpy()
            prod = Wc * P[r][None, :]
            d64 = prod.sum(axis=1)
            absdot = np.abs(prod).sum(axis=1)
            if bias is not None:
                d64 = d64 + bias[idx]
            d = d64.astype(np.float32)
            one_b = np.float32(np.float32(1) + b)
            with np.errstate(over="ignore", invalid="ignore"):
                mc = ((one_b * l[idx] - b * d) / T).astype(np.float32)
            mc = np.where(np.isnan(mc), np.float32(-np.inf), np.clip(mc, -FLT_MAX, FLT_MAX)).astype(np.float32)
            m[idx] = mc
            # |d_kernel - d_exact| <= (H + 2) u sum|p w| + 2u|d| (float32 accumulation of H products in any
            # order, the bias add, the final rounding); the mix adds a few roundings of its operands.
            dd = (H + 2) * u * absdot + 2 * u * np.abs(d64)
            m_tol[idx] = (float(b) * dd + 4 * u * (np.abs(float(one_b) * l[idx].astype(np.float64))
                                                    + float(b) * np.abs(d64))) / float(T) \
                + 4 * u * np.abs(mc.astype(np.float64))
        res.update(mask=mask, m=m, margin=margin, m_tol=m_tol)
        if sample:
            g = gumbel_noise(int(seeds[r]), int(steps[r]), idx)
            mc = m[idx]
            if not np.any(mc > -np.inf):
                res.update(token=int(np.argmax(z)), logprob=-math.inf, key_gap=math.inf)
            else:
                keys = (mc + g).astype(np.float32)
                order = np.argsort(-keys.astype(np.float64), kind="stable")  # smallest id first on ties
                tok = int(idx[order[0]])
                gap = float(keys[order[0]]) - float(keys[order[1]]) if idx.shape[0] > 1 else math.inf
                m64 = mc.astype(np.float64)
                mx = m64.max()
                lse = mx + math.log(np.exp(m64 - mx).sum())
                res.update(token=tok, logprob=float(np.float32(float(m[tok]) - lse)), key_gap=gap)
        rows.append(res)
    return rows


def reweight(logits, pred_hidden, lm_head_weight, lm_head_bias=None, *, beta=0.25, temperature=1.0, top_k=0,
             top_p=1.0, min_p=0.0, seed=0, step=0):
    """(tokens int64 [B], logprobs float32 [B]).  ``seed``/``step`` are used per row as given (an int is
    the same seed for every row; esamp.ops.reweight instead expands an int with derive_row_seeds)."""
    rows = reweight_details(logits, pred_hidden, lm_head_weight, lm_head_bias, beta=beta,
                            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step)
    return (torch.tensor([r["token"] for r in rows], dtype=torch.int64),
            torch.tensor([r["logprob"] for r in rows], dtype=torch.float32))


def reweight_logits(logits, pred_hidden, lm_head_weight, lm_head_bias=None, *, beta=0.25, temperature=1.0,
                    top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Mixed logits float32 [B, V]: m on the candidate set, -inf elsewhere (greedy rows: 0 at argmax)."""
    rows = reweight_details(logits, pred_hidden, lm_head_weight, lm_head_bias, beta=beta,
                            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if not rows:
        return torch.empty((0, logits.shape[1]), dtype=torch.float32)
    return torch.from_numpy(np.stack([r["m"] for r in rows]))


def mix_hidden(hidden: torch.Tensor, pred_hidden: torch.Tensor, beta: Union[float, torch.Tensor]) -> torch.Tensor:
    """(1 + beta) * hidden - beta * pred_hidden in float32 math, returned in hidden's dtype."""
    b = torch.as_tensor(beta, dtype=torch.float32)
    if b.dim() == 1:
        b = b[:, None]
    return ((1 + b) * hidden.float() - b * pred_hidden.float()).to(hidden.dtype)


# ---------------------------------------------------------------------------------------------------
# Batched eager composition (benchmark baseline)
# ---------------------------------------------------------------------------------------------------
def reweight_eager(logits: torch.Tensor, pred_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                   lm_head_bias: Optional[torch.Tensor], beta: torch.Tensor, temperature: torch.Tensor,
                   top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, *, use_top_k: bool = True,
                   use_top_p: bool = True, use_min_p: bool = True, generator: Optional[torch.Generator] = None):
    """What an engine would write in PyTorch for the same work, batched: min-p mask, one descending sort
    for top-k/top-p (skipped when both are off), dense distiller logits ``pred @ W.T``, the mix, Gumbel-max
    sampling with torch.rand noise, and the logprob under the sampled distribution.  Per-row parameters are
    tensors [B]; the use_* flags let a caller skip filters that no row uses (as engines do).
    Returns (tokens int64 [B], logprobs float32 [B])."""
    l = logits.float()
    T = temperature[:, None]
    greedy = T == 0
    z = l / torch.where(greedy, torch.ones_like(T), T)
    keep = torch.ones_like(z, dtype=torch.bool)
    if use_min_p:
        zmax = z.amax(dim=-1, keepdim=True)
        keep &= z >= zmax + torch.log(min_p)[:, None]
    if use_top_k or use_top_p:
        zs, order = torch.sort(z.masked_fill(~keep, float("-inf")), dim=-1, descending=True)
        if use_top_k:
            V = z.shape[-1]
            k = torch.where((top_k > 0) & (top_k < V), top_k, torch.full_like(top_k, V))
            kth = zs.gather(1, (k - 1)[:, None])
            keep &= z >= kth
            zs = zs.masked_fill(zs < kth, float("-inf"))
        if use_top_p:
            ps = torch.softmax(zs, dim=-1)
            cs = ps.cumsum(dim=-1)
            n = torch.searchsorted(cs, top_p[:, None].to(cs.dtype)).clamp(max=z.shape[-1] - 1)
            # Threshold in z (exact), not in p: a second softmax over the unsorted row rounds differently.
            keep &= (z >= zs.gather(1, n)) | (top_p[:, None] >= 1)
    d = pred_hidden.float() @ lm_head_weight.float().t()
    if lm_head_bias is not None:
        d = d + lm_head_bias.float()
    b = beta[:, None]
    m = ((1 + b) * l - b * d) / torch.where(greedy, torch.ones_like(T), T)
    m = m.masked_fill(~keep, float("-inf"))
    u = torch.rand(m.shape, generator=generator, dtype=torch.float32).clamp_(min=1e-10)
    g = -torch.log(-torch.log(u))
    tokens = torch.argmax(m + g, dim=-1)
    logprobs = torch.log_softmax(m, dim=-1).gather(1, tokens[:, None])[:, 0]
    greedy_row = greedy[:, 0]
    tokens = torch.where(greedy_row, l.argmax(dim=-1), tokens)
    logprobs = torch.where(greedy_row, torch.zeros_like(logprobs), logprobs)
    return tokens, logprobs
