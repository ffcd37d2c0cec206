"""Plain-PyTorch reference of the distiller bank (SPEC 2): forward, loss, per-slot clip and Adam.

Everything here is written with torch.autograd, ``torch.nn.utils.clip_grad_norm_`` and
``torch.optim.Adam`` so that it states the semantics of ``esamp::distiller_*`` independently of the
kernels.  It runs in any float dtype (tests use float64 to measure the kernels' float32 error).

Parameter layout of one slot (see csrc/include/esamp/distiller.h), P = L*(3*H*R + R) + H:
per block j: W1_j [H, 2R] (row i = (A_j[i], G_j[i])), c_j [R], B_j [R, H]; then gamma [H].

Also here: :class:`BatchedEagerDistiller`, the strongest eager baseline for the benchmarks (all slots
as batched ``[S, ...]`` parameters, ``bmm`` + autograd + per-slot clip + ``torch.optim.Adam``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

INIT_STD = 0.02        # A, G ~ N(0, INIT_STD^2)
INIT_GATE_BIAS = 1.0   # c = 1;  B = 0;  gamma = 1 or gamma_init
_KEYS = ("A", "G", "c", "B", "gamma")


def params_per_slot(H: int, R: int, L: int) -> int:
    return L * (3 * H * R + R) + H


def unpack(flat: torch.Tensor, H: int, R: int, L: int) -> Dict[str, torch.Tensor]:
    """Views {"A": [L,H,R], "G": [L,H,R], "c": [L,R], "B": [L,R,H], "gamma": [H]} of one slot's flat [P]."""
    blk = 3 * H * R + R
    if flat.shape != (params_per_slot(H, R, L),):
        raise ValueError(f"flat: expected shape ({params_per_slot(H, R, L)},), got {tuple(flat.shape)}")
    body = flat[: L * blk].view(L, blk)
    W1 = body[:, : 2 * H * R].view(L, H, 2 * R)
    return {"A": W1[:, :, :R], "G": W1[:, :, R:], "c": body[:, 2 * H * R: 2 * H * R + R],
            "B": body[:, 2 * H * R + R:].view(L, R, H), "gamma": flat[L * blk:]}


def pack(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, B: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack`: one slot's flat parameter vector."""
    L = A.shape[0]
    parts = []
    for j in range(L):
        parts += [torch.cat([A[j], G[j]], dim=1).reshape(-1), c[j].reshape(-1), B[j].reshape(-1)]
    parts.append(gamma.reshape(-1))
    return torch.cat(parts)


def forward(p: Dict[str, torch.Tensor], x: torch.Tensor, norm_eps: float = 1e-6) -> torch.Tensor:
    """y = RMSNorm(x_L) * gamma with x_j = x_{j-1} + ((x_{j-1} A_j) * silu(x_{j-1} G_j + c_j)) B_j."""
    for j in range(p["A"].shape[0]):
        a = x @ p["A"][j]
        g = x @ p["G"][j] + p["c"][j]
        x = x + (a * torch.nn.functional.silu(g)) @ p["B"][j]
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + norm_eps) * p["gamma"]


def loss_fn(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||y - t||^2 / H."""
    return (y - t).pow(2).mean()


def forward_bank(params: torch.Tensor, x: torch.Tensor, slot_ids: torch.Tensor, H: int, R: int, L: int,
                 norm_eps: float = 1e-6, out_dtype: Optional[torch.dtype] = None,
                 compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Predictions of a bank ``params`` [S, P] for rows x [N, H] with slot ids, computed in compute_dtype."""
    out = torch.empty(x.shape, dtype=compute_dtype)
    xc = x.to(compute_dtype)
    for s in torch.unique(slot_ids).tolist():
        rows = slot_ids == s
        out[rows] = forward(unpack(params[s].to(compute_dtype), H, R, L), xc[rows], norm_eps)
    return out.to(out_dtype if out_dtype is not None else x.dtype)


# ---------------------------------------------------------------------------------------------
# Initialisation: Philox4x32-10 (SPEC 4 constants) + Box-Muller, element p of the slot's vector.
# ---------------------------------------------------------------------------------------------
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_INIT_TAG = 0x494E4954  # "INIT"
_LO = np.uint64(0xFFFFFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Vectorised Philox4x32-10 over uint32 numpy arrays (counters) with a scalar key."""
    c = [np.asarray(v, dtype=np.uint64) & _LO for v in (c0, c1, c2, c3)]
    for _ in range(10):
        p0 = _M0 * c[0]
        p1 = _M1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & _LO, (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1),
             p0 & _LO]
        k0 = (k0 + _W0) & 0xFFFFFFFF
        k1 = (k1 + _W1) & 0xFFFFFFFF
    return [v.astype(np.uint32) for v in c]


def _uniform(w: np.ndarray) -> np.ndarray:
    u = (np.uint64(2) * (w.astype(np.uint64) >> np.uint64(8)) + np.uint64(1)).astype(np.float32) * np.float32(2.0 ** -25)
    return np.minimum(u, np.float32(0.99999994039535522))


def init_normal(seed: int, idx: np.ndarray) -> np.ndarray:
    """Standard normals (float64) for element indices idx, as esamp::init_normal (float32 there)."""
    idx = np.asarray(idx, dtype=np.uint64)
    seed &= (1 << 64) - 1
    n = idx.shape[0]
    r = philox4x32_10(idx & _LO, idx >> np.uint64(32), np.zeros(n, np.uint64), np.full(n, _INIT_TAG, np.uint64),
                      seed & 0xFFFFFFFF, seed >> 32)
    u1 = _uniform(r[0]).astype(np.float64)
    u2 = _uniform(r[1]).astype(np.float64)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)


def init_slot(H: int, R: int, L: int, seed: int = 0, gamma_init: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Initial flat parameters (float64) of a slot: A, G = INIT_STD * init_normal(seed, p), c = 1, B = 0, gamma."""
    P = params_per_slot(H, R, L)
    flat = torch.zeros(P, dtype=torch.float64)
    blk = 3 * H * R + R
    for j in range(L):
        o = j * blk
        flat[o: o + 2 * H * R] = torch.from_numpy(INIT_STD * init_normal(seed, np.arange(o, o + 2 * H * R)))
        flat[o + 2 * H * R: o + 2 * H * R + R] = INIT_GATE_BIAS
    flat[L * blk:] = 1.0 if gamma_init is None else gamma_init.to(torch.float64)
    return flat


# ---------------------------------------------------------------------------------------------
# Per-slot autograd + clip_grad_norm_ + torch.optim.Adam (the semantic reference of a train step)
# ---------------------------------------------------------------------------------------------
class ReferenceBank:
    """S independent slots, each with its own leaf parameters and its own ``torch.optim.Adam``.

    ``train_step`` follows SPEC 2: rows with non-finite x or t are dropped (and counted); every slot
    with >= 1 valid row takes one step on the mean over its rows of ||y - t||^2 / H, with its
    gradient clipped by ``clip_grad_norm_(slot params, clip)``; a slot whose loss or gradient norm is
    non-finite is not updated (its rows count as skipped); idle slots are untouched and get loss NaN.
    """

    def __init__(self, params: torch.Tensor, H: int, R: int, L: int, *, lr: float = 4e-4, betas=(0.9, 0.999),
                 eps: float = 1e-4, clip: float = 0.5, norm_eps: float = 1e-6, dtype: torch.dtype = torch.float64,
                 adam_kwargs: Optional[dict] = None):
        self.H, self.R, self.L, self.S = H, R, L, params.shape[0]
        self.clip, self.norm_eps, self.dtype = clip, norm_eps, dtype
        self.slots: List[Dict[str, torch.Tensor]] = []
        self.opts: List[torch.optim.Adam] = []
        for s in range(self.S):
            v = unpack(params[s].detach().to(dtype), H, R, L)
            leaves = {k: v[k].clone().contiguous().requires_grad_(True) for k in _KEYS}
            self.slots.append(leaves)
            self.opts.append(torch.optim.Adam([leaves[k] for k in _KEYS], lr=lr, betas=betas, eps=eps,
                                              **(adam_kwargs or {})))
        self.stats = [0.0, 0.0, 0.0, 0.0]
        self.last_norms: List[float] = [float("nan")] * self.S   # pre-clip gradient norm of each slot
        self.last_clipped: List[Optional[bool]] = [None] * self.S

    def train_step(self, x: torch.Tensor, t: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
        losses = torch.full((self.S,), float("nan"), dtype=torch.float64)
        self.last_norms = [float("nan")] * self.S
        self.last_clipped = [None] * self.S
        x = x.to(self.dtype)
        t = t.to(self.dtype)
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(t).all(dim=1)
        trained = skipped = 0
        loss_sum = 0.0
        any_step = False
        for s in range(self.S):
            in_slot = slot_ids == s
            n_all = int(in_slot.sum())
            rows = in_slot & finite
            n = int(rows.sum())
            skipped += n_all - n
            if n == 0:
                continue
            p = self.slots[s]
            opt = self.opts[s]
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(forward(p, x[rows], self.norm_eps), t[rows])
            loss.backward()
            plist = [p[k] for k in _KEYS]
            if self.clip > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(plist, self.clip))
            else:
                norm = float(torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in plist])))
            self.last_norms[s] = norm
            if not (math.isfinite(norm) and math.isfinite(float(loss.detach()))):
                skipped += n
                continue
            self.last_clipped[s] = self.clip > 0 and self.clip / (norm + 1e-6) < 1.0
            opt.step()
            losses[s] = float(loss.detach())
            trained += n
            loss_sum += float(loss.detach())
            any_step = True
        self.stats[0] += trained
        self.stats[1] += skipped
        self.stats[2] += loss_sum
        self.stats[3] += 1.0 if any_step else 0.0
        return losses

    # Flat [S, P] views of the state, in the kernels' layout (zeros where Adam has no state yet).
    def params(self) -> torch.Tensor:
        return torch.stack([pack(*[p[k].detach() for k in _KEYS]) for p in self.slots])

    def _state(self, name: str) -> torch.Tensor:
        out = []
        for p, opt in zip(self.slots, self.opts):
            parts = []
            for k in _KEYS:
                st = opt.state.get(p[k], {})
                parts.append(st[name].detach() if name in st else torch.zeros_like(p[k].detach()))
            out.append(pack(*parts))
        return torch.stack(out)

    def exp_avg(self) -> torch.Tensor:
        return self._state("exp_avg")

    def exp_avg_sq(self) -> torch.Tensor:
        return self._state("exp_avg_sq")

    def steps(self) -> torch.Tensor:
        out = []
        for p, opt in zip(self.slots, self.opts):
            st = opt.state.get(p["A"], {})
            out.append(int(st["step"]) if "step" in st else 0)
        return torch.tensor(out, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Batched eager baseline (benchmarks): all slots in [S, ...] tensors, equal rows per slot.
# ---------------------------------------------------------------------------------------------
class BatchedEagerDistiller:
    """The strongest eager formulation of a bank train step that we know of.

    Parameters W1 [S, L, H, 2R] (A and G side by side, one bmm gives both projections), c [S, L, R],
    B [S, L, R, H], gamma [S, H].  A step takes rows grouped by slot, x and t [S, n, H] (every slot has
    n rows), computes every slot's loss with bmm, backpropagates sum(losses) (slots are independent),
    clips each slot's gradient to global norm <= clip (clip_grad_norm_ semantics, per slot), then runs
    one ``torch.optim.Adam`` step (``adam_kwargs``: e.g. {"foreach": True} or {"fused": True}).
    """

    def __init__(self, params: torch.Tensor, H: int, R: int, L: int, *, lr: float = 4e-4, betas=(0.9, 0.999),
                 eps: float = 1e-4, clip: float = 0.5, norm_eps: float = 1e-6, adam_kwargs: Optional[dict] = None):
        S = params.shape[0]
        self.H, self.R, self.L, self.S, self.clip, self.norm_eps = H, R, L, S, clip, norm_eps
        blk = 3 * H * R + R
        body = params[:, : L * blk].reshape(S, L, blk).float()
        self.W1 = body[:, :, : 2 * H * R].reshape(S, L, H, 2 * R).clone().requires_grad_(True)
        self.c = body[:, :, 2 * H * R: 2 * H * R + R].clone().requires_grad_(True)
        self.B = body[:, :, 2 * H * R + R:].reshape(S, L, R, H).clone().requires_grad_(True)
        self.gamma = params[:, L * blk:].float().clone().requires_grad_(True)
        self.leaves = [self.W1, self.c, self.B, self.gamma]
        self.opt = torch.optim.Adam(self.leaves, lr=lr, betas=betas, eps=eps, **(adam_kwargs or {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R = self.R
        for j in range(self.L):
            ag = torch.bmm(x, self.W1[:, j])
            g = ag[..., R:] + self.c[:, j, None, :]
            x = x + torch.bmm(ag[..., :R] * torch.nn.functional.silu(g), self.B[:, j])
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.norm_eps) * self.gamma[:, None, :]

    def train_step(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)  # faster here than zeroing kept buffers (measured)
        losses = (self.forward(x) - t).pow(2).mean(dim=(1, 2))
        losses.sum().backward()
        with torch.no_grad():
            sq = sum(q.grad.reshape(self.S, -1).pow(2).sum(dim=1) for q in self.leaves)
            coef = torch.clamp(self.clip / (sq.sqrt() + 1e-6), max=1.0) if self.clip > 0 else torch.ones_like(sq)
            for q in self.leaves:
                q.grad.mul_(coef.view(-1, *([1] * (q.dim() - 1))))
        self.opt.step()
        return losses.detach()

    def params(self) -> torch.Tensor:
        """Flat [S, P] float32 parameters in the kernels' layout."""
        S, L = self.S, self.L
        with torch.no_grad():
            parts = []
            for j in range(L):
                parts += [self.W1[:, j].reshape(S, -1), self.c[:, j], self.B[:, j].reshape(S, -1)]
            parts.append(self.gamma)
            return torch.cat(parts, dim=1)
