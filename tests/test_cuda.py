"""CUDA kernels against the CPU kernels (SPEC 2-5).

Every test needs a CUDA device and is skipped without one; with a device the same file runs unchanged.
The CPU kernels are the reference here: they are tested against the plain references in their own test
files, so agreement with them is what these tests establish.

Tolerances (fp32 accumulation in a different order on each backend):
  * mixed logits m: a rigorous per-token bound (m_bound below): each backend computes d = p . W_c as a float32
    sum of H products in some order, |d - d_exact| <= (H + 2) u sum_h |p_h W_ch| + 2 u |d| (u = 2^-24), and
    the mix ((1 + beta) l - beta d) / T adds a few roundings of its operands; twice that bounds the
    difference of the two backends.  Exact where beta = 0 (m = z, one IEEE division on both).
  * logprobs: |diff| <= bound(m_tok) + max over the candidates of bound(m_c) + 1e-6 (1 + |logprob|)
    (logsumexp is 1-Lipschitz in the max norm; both backends sum the exponentials in double).
  * sampled tokens: agreement >= 99.5 % (SPEC 4); candidate sets: identical on every row whose values
    are not within 1e-5 (relative) of a filter threshold (SPEC 4), and such rows must be a small minority.
  * distiller: relative norm error <= 1e-4 after 20 fp32 train steps (Adam with eps 1e-4 is smooth in
    the gradient, so summation-order noise stays at the 1e-7 level per step).
"""
import math

import numpy as np
import pytest
import torch

import esamp
from esamp import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
OPS = ("reweight", "reweight_logits", "mix_hidden", "distiller_forward", "distiller_train_step", "distiller_reset")
FLT_MAX = float(np.finfo(np.float32).max)


def cuda(*ts):
    return tuple(None if t is None else t.cuda() for t in ts)


# --------------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------------
def lm_problem(B, V, H, dtype, wdtype, seed, bias=False):
    """LM-like logits: l = h W^T for a random LM head W [V, H] and hidden states h, prediction = h + noise,
    and a mix of per-row filters (greedy rows, top-k, top-p, min-p, none)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) / H ** 0.5
    hid = torch.randn(B, H, generator=g) * 3.0
    logits = (hid @ W.T).to(dtype)
    pred = (hid + 0.5 * torch.randn(B, H, generator=g)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(wdtype) if bias else None
    rp = {
        "beta": torch.rand(B, generator=g) * 0.5,
        "temperature": torch.where(torch.rand(B, generator=g) < 0.1, torch.zeros(B),
                                   torch.rand(B, generator=g) * 1.2 + 0.3),
        "top_k": torch.where(torch.rand(B, generator=g) < 0.4, torch.randint(1, 200, (B,), generator=g),
                             torch.zeros(B, dtype=torch.int64)),
        "top_p": torch.where(torch.rand(B, generator=g) < 0.5, torch.rand(B, generator=g) * 0.9 + 0.05, torch.ones(B)),
        "min_p": torch.where(torch.rand(B, generator=g) < 0.5, torch.rand(B, generator=g) * 0.1, torch.zeros(B)),
    }
    seed_t = esamp.ops.derive_row_seeds(seed, B)
    return logits, pred, W.to(wdtype), b, rp, seed_t


def run_reweight(dev, logits, pred, W, b, rp, seed_t, step):
    a = [t.to(dev) if t is not None else None for t in (logits, pred, W, b)]
    r = {k: v.to(dev) for k, v in rp.items()}
    return ops.reweight(a[0], a[1], a[2], lm_head_bias=a[3], seed=seed_t.to(dev),
                        step=torch.full((logits.shape[0],), step, dtype=torch.int64, device=dev), **r)


def run_reweight_logits(dev, logits, pred, W, b, rp):
    a = [t.to(dev) if t is not None else None for t in (logits, pred, W, b)]
    r = {k: v.to(dev) for k, v in rp.items()}
    return ops.reweight_logits(a[0], a[1], a[2], lm_head_bias=a[3], **r)


def threshold_margin(l, T, top_k, top_p, min_p):
    """Smallest relative distance of a rounding-sensitive filter decision of one row (SPEC 3.2, 4):
    values next to the min-p threshold, cumulative masses next to top_p, distinct probabilities next to
    tau.  Top-k compares z values that both backends compute exactly (IEEE division), so it adds none."""
    l = np.where(np.isnan(l), -np.inf, np.minimum(l, FLT_MAX)).astype(np.float32)
    if not T > 0:
        return math.inf
    with np.errstate(over="ignore", invalid="ignore"):
        z = np.clip((l / np.float32(T)).astype(np.float32), -FLT_MAX, FLT_MAX)
    z = np.where(l == -np.inf, -np.inf, z).astype(np.float32)
    fin = z > -np.inf
    if not fin.any():
        return math.inf
    zmax = z[fin].max()
    keep = fin.copy()
    margin = math.inf
    if min_p > 0:
        thr = float(np.float32(zmax + np.float32(math.log(min_p))))
        margin = min(margin, float(np.min(np.abs(z[fin].astype(np.float64) - thr))) / max(1.0, abs(thr)))
        keep &= z >= thr
    if 0 < top_k < z.shape[0]:
        vals = np.sort(z[keep])[::-1]
        if vals.shape[0] > top_k:
            keep &= z >= vals[top_k - 1]
    if top_p < 1:
        e = np.exp(z[keep].astype(np.float64) - float(zmax))
        ps = np.sort(e / e.sum())[::-1]
        cs = np.cumsum(ps)
        n = min(int(np.searchsorted(cs, top_p, side="left")), ps.shape[0] - 1)
        margin = min(margin, abs(cs[n] - top_p) / top_p)
        if n > 0:
            margin = min(margin, abs(cs[n - 1] - top_p) / top_p)
        distinct = np.unique(ps)
        j = int(np.searchsorted(distinct, ps[n]))
        for q in (j - 1, j + 1):
            if 0 <= q < distinct.shape[0]:
                margin = min(margin, abs(distinct[q] - ps[n]) / ps[n])
    return margin


U = 2.0 ** -24


def m_bound(logits, pred, W, b, rp):
    """Bound on |m_cuda - m_cpu| for every [row, token] (see the top of the file).  float64 [B, V]."""
    l = torch.nan_to_num(logits.double(), nan=0.0, posinf=FLT_MAX, neginf=0.0)
    P, Wd = pred.double(), torch.nan_to_num(W.double(), nan=0.0, posinf=0.0, neginf=0.0)
    absdot = P.abs() @ Wd.abs().T
    d = P @ Wd.T
    dd = (P.shape[1] + 2) * U * absdot + 2 * U * d.abs()
    if b is not None:
        bd = b.double()
        d = d + bd
        dd = dd + 2 * U * (d.abs() + bd.abs())
    beta = rp["beta"].double().clamp(min=0)[:, None]
    T = rp["temperature"].double()[:, None]
    T = torch.where(T > 0, T, torch.ones_like(T))
    m = ((1 + beta) * l - beta * d) / T
    tol = 2 * ((beta * dd + 4 * U * ((1 + beta) * l.abs() + beta * d.abs())) / T + 4 * U * m.abs())
    return torch.where(beta == 0, 2 * U * (l / T).abs(), tol)


def assert_m_close(got, want, tol):
    """Mixed logits on the finite entries of `want` (same -inf pattern asserted by the caller)."""
    fin = torch.isfinite(want)
    diff = (got.double() - want.double()).abs()[fin]
    bound = tol[fin]
    bad = diff > bound
    assert not bool(bad.any()), (f"{int(bad.sum())} mixed logits differ by more than the bound: worst "
                                 f"|diff| {float(diff[bad].max()):.3e} vs bound {float(bound[bad].min()):.3e}")


def assert_logprobs_close(got, want, tol, mixed):
    """Logprobs of rows whose token agrees; `mixed` = CPU reweight_logits of the same problem (C = finite)."""
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin) and torch.equal(got[~fin], want[~fin])
    tolc = torch.where(torch.isfinite(mixed), tol, torch.zeros_like(tol)).nan_to_num(nan=0.0)
    row_tol = 2 * tolc.max(dim=1).values + 1e-6 * (1 + want.double().abs())
    diff = (got.double() - want.double()).abs()
    bad = fin & (diff > row_tol)
    assert not bool(bad.any()), f"logprobs differ beyond the bound on rows {bad.nonzero().flatten().tolist()}"


def rel_err(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernel_registered(op):
    assert ops.has_cuda_kernels(op), f"esamp::{op} has no CUDA kernel in this build"


# --------------------------------------------------------------------------------------------------
# reweight / reweight_logits
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,wdtype,bias", [(F32, F32, False), (BF16, BF16, True), (F16, BF16, False)])
def test_reweight_tokens_agree_with_cpu(dtype, wdtype, bias):
    B, V, H = 64, 32000, 512
    logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, dtype, wdtype, 11, bias)
    tol = m_bound(logits, pred, W, b, rp)
    mixed = run_reweight_logits("cpu", logits, pred, W, b, rp)
    agree = total = 0
    for step in range(8):
        tc, lc = run_reweight("cpu", logits, pred, W, b, rp, seed_t, step)
        tg, lg = run_reweight("cuda", logits, pred, W, b, rp, seed_t, step)
        tg, lg = tg.cpu(), lg.cpu()
        assert tg.dtype == torch.int64 and lg.dtype == torch.float32
        assert bool(((tg >= 0) & (tg < V)).all())
        same = tg == tc
        agree += int(same.sum())
        total += B
        assert_logprobs_close(lg[same], lc[same], tol[same], mixed[same])
        greedy = rp["temperature"] == 0
        assert bool((lg[greedy] == 0).all())
    assert agree >= math.ceil(0.995 * total), f"tokens agree on {agree}/{total} rows"


@pytest.mark.parametrize("dtype,wdtype,bias", [(F32, F32, True), (BF16, BF16, False)])
def test_reweight_logits_candidate_sets_agree_with_cpu(dtype, wdtype, bias):
    B, V, H = 64, 32000, 512
    logits, pred, W, b, rp, _ = lm_problem(B, V, H, dtype, wdtype, 12, bias)
    tol = m_bound(logits, pred, W, b, rp)
    oc = run_reweight_logits("cpu", logits, pred, W, b, rp)
    og = run_reweight_logits("cuda", logits, pred, W, b, rp).cpu()
    assert og.shape == (B, V) and og.dtype == torch.float32
    lf = logits.float().numpy()
    exact = 0
    for r in range(B):
        mc, mg = torch.isneginf(oc[r]), torch.isneginf(og[r])
        if torch.equal(mc, mg):
            exact += 1
            assert_m_close(og[r], oc[r], tol[r])
        else:
            margin = threshold_margin(lf[r], float(rp["temperature"][r]), int(rp["top_k"][r]),
                                      float(rp["top_p"][r]), float(rp["min_p"][r]))
            assert margin < 1e-5, f"row {r}: candidate sets differ away from every threshold (margin {margin:.2e})"
    assert exact >= B - 2, f"candidate sets identical on only {exact}/{B} rows"


def test_reweight_awkward_shapes_agree_with_cpu():
    # odd V (vector tails), B = 1, non-contiguous logits rows, strided prediction rows, fp16 bias,
    # an H whose bf16 rows are not 16-byte aligned (scalar weight path)
    for B, V, H, seed in ((1, 32001, 577, 1), (5, 4099, 37, 2), (33, 1000, 96, 3)):
        logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, F16, BF16, seed, bias=True)
        b = b.to(F16)
        wide = torch.zeros(B, V + 3, dtype=F16)
        wide[:, 1:V + 1] = logits
        logits_nc = wide[:, 1:V + 1]
        pred_wide = torch.zeros(B, 2 * H, dtype=F16)
        pred_wide[:, :H] = pred
        pred_nc = pred_wide[:, :H]
        tol = m_bound(logits, pred, W, b, rp)
        oc = run_reweight_logits("cpu", logits_nc, pred_nc, W, b, rp)
        og = run_reweight_logits("cuda", logits_nc, pred_nc, W, b, rp).cpu()
        assert torch.equal(torch.isneginf(oc), torch.isneginf(og))
        assert_m_close(og, oc, tol)
        for step in (0, 1):
            tc, lc = run_reweight("cpu", logits_nc, pred_nc, W, b, rp, seed_t, step)
            tg, lg = run_reweight("cuda", logits_nc, pred_nc, W, b, rp, seed_t, step)
            assert torch.equal(tg.cpu(), tc), (B, V, H)
            assert_logprobs_close(lg.cpu(), lc, tol, oc)


def test_reweight_large_hidden_workspace_path_agrees_with_cpu():
    # H > 6144: the prediction row is staged in the workspace instead of shared memory
    B, V, H = 16, 3000, 7001
    logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, F32, BF16, 4)
    tol = m_bound(logits, pred, W, b, rp)
    oc = run_reweight_logits("cpu", logits, pred, W, b, rp)
    og = run_reweight_logits("cuda", logits, pred, W, b, rp).cpu()
    assert torch.equal(torch.isneginf(oc), torch.isneginf(og))
    assert_m_close(og, oc, tol)
    tc, lc = run_reweight("cpu", logits, pred, W, b, rp, seed_t, 3)
    tg, lg = run_reweight("cuda", logits, pred, W, b, rp, seed_t, 3)
    assert torch.equal(tg.cpu(), tc)
    assert_logprobs_close(lg.cpu(), lc, tol, oc)


def test_reweight_non_finite_inputs_agree_with_cpu():
    B, V, H = 8, 2000, 64
    logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, F32, F32, 5)
    rp["temperature"] = torch.tensor([1.0, 1.0, 0.0, 0.0, 1e-38, 1.0, 0.7, 1.0])
    rp["beta"] = torch.full((B,), 0.25)
    logits[0, 7] = float("inf")            # +inf -> FLT_MAX, the sure winner
    logits[1, :] = float("nan")            # no finite logit: token 0, logprob -inf
    logits[2, :] = float("-inf")           # greedy, no finite logit: token 0, logprob 0
    logits[3, ::2] = float("nan")          # greedy with NaNs
    logits[4, 11] = 3e38                   # z overflows -> clamped
    W[logits[5].argmax()] = float("nan")   # NaN weight row: that candidate's m is NaN -> -inf
    logits[6, 100:] = float("-inf")
    tol = m_bound(logits, pred, W, b, rp)
    oc = run_reweight_logits("cpu", logits, pred, W, b, rp)
    og = run_reweight_logits("cuda", logits, pred, W, b, rp).cpu()
    assert torch.equal(torch.isneginf(oc), torch.isneginf(og))
    assert_m_close(og, oc, tol)
    for step in (0, 1):
        tc, lc = run_reweight("cpu", logits, pred, W, b, rp, seed_t, step)
        tg, lg = run_reweight("cuda", logits, pred, W, b, rp, seed_t, step)
        assert torch.equal(tg.cpu(), tc)
        assert_logprobs_close(lg.cpu(), lc, tol, oc)
    assert int(tc[1]) == 0 and lc[1] == -math.inf and int(tc[2]) == 0 and lc[2] == 0


def test_reweight_out_of_range_cuda_row_params_are_defensive():
    """Values in per-row CUDA tensors are not checked by the binding (no host sync); the kernel maps
    them as documented in csrc/cuda/reweight.cu.  Each invalid row must equal the CPU result of the
    valid parameters it is mapped to."""
    B, V, H = 6, 3000, 64
    logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, F32, F32, 6)
    bad = {"beta": torch.tensor([-1.0, float("nan"), 0.3, 0.3, 0.3, 0.3]),
           "temperature": torch.tensor([1.0, 1.0, -2.0, float("nan"), 1.0, 1.0]),
           "top_k": torch.tensor([0, 0, 0, 0, -5, 0]),
           "top_p": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, float("nan")]),
           "min_p": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0])}
    # min_p >= 1 keeps exactly the values equal to max z, which is top_k = 1 (ties kept)
    mapped = {"beta": torch.tensor([0.0, 0.0, 0.3, 0.3, 0.3, 0.3]),
              "temperature": torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 1.0]),
              "top_k": torch.tensor([0, 0, 0, 0, 0, 1]),
              "top_p": torch.tensor([1.0, 1.0, 1.0, 1.0, 1e-30, 1.0]),
              "min_p": torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0])}
    tol = m_bound(logits, pred, W, b, mapped)
    oc = run_reweight_logits("cpu", logits, pred, W, b, mapped)
    og = run_reweight_logits("cuda", logits, pred, W, b, bad).cpu()
    assert torch.equal(torch.isneginf(oc), torch.isneginf(og))
    assert_m_close(og, oc, tol)
    tg, lg = run_reweight("cuda", logits, pred, W, b, bad, seed_t, 0)
    tc, lc = run_reweight("cpu", logits, pred, W, b, mapped, seed_t, 0)
    assert torch.equal(tg.cpu(), tc)
    assert_logprobs_close(lg.cpu(), lc, tol, oc)


def test_reweight_is_deterministic():
    B, V, H = 32, 32000, 256
    logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, BF16, BF16, 7)
    t1, l1 = run_reweight("cuda", logits, pred, W, b, rp, seed_t, 5)
    t2, l2 = run_reweight("cuda", logits, pred, W, b, rp, seed_t, 5)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    o1 = run_reweight_logits("cuda", logits, pred, W, b, rp)
    o2 = run_reweight_logits("cuda", logits, pred, W, b, rp)
    assert torch.equal(o1, o2)


def test_reweight_cuda_graph_replay_advances_step():
    B, V, H = 16, 8000, 128
    logits, pred, W, b, rp, seed_t = lm_problem(B, V, H, BF16, BF16, 8)
    logits, pred, W = cuda(logits, pred, W)
    rpc = {k: v.cuda() for k, v in rp.items()}
    seed_c = seed_t.cuda()
    args = lambda step_t: (logits, pred, W, None, rpc["beta"], rpc["temperature"], rpc["top_k"], rpc["top_p"],  # noqa
                           rpc["min_p"], seed_c, step_t)
    eager = [torch.ops.esamp.reweight(*args(torch.full((B,), k, dtype=torch.int64, device="cuda")))
             for k in range(5)]
    step_t = torch.zeros(B, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside the capture (allocator pools, lazy init)
            torch.ops.esamp.reweight(*args(step_t))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok, lp = torch.ops.esamp.reweight(*args(step_t))
        step_t.add_(1)
    assert int(step_t.sum()) == 0  # capture records, it does not run
    distinct = set()
    for k in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tok, eager[k][0]), f"replay {k}"
        assert torch.equal(lp, eager[k][1]), f"replay {k}"
        distinct.add(tuple(tok.tolist()))
    assert len(distinct) > 1  # the step tensor really advanced the noise
    assert bool((step_t == 5).all())


# --------------------------------------------------------------------------------------------------
# mix_hidden
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_mix_hidden_agrees_with_cpu(dtype):
    g = torch.Generator().manual_seed(9)
    for B, H in ((1, 577), (64, 4096)):
        h = torch.randn(B, H, generator=g).to(dtype)
        p = torch.randn(B, H, generator=g).to(dtype)
        beta = torch.rand(B, generator=g)
        oc = ops.mix_hidden(h, p, beta)
        og = ops.mix_hidden(h.cuda(), p.cuda(), beta.cuda()).cpu()
        assert og.dtype == dtype and og.shape == (B, H)
        # one rounding of the result in the output dtype (the fp32 math may be contracted into an FMA)
        tol = {F32: 1e-6, BF16: 8e-3, F16: 1e-3}[dtype]
        torch.testing.assert_close(og.float(), oc.float(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------
# Distiller
# --------------------------------------------------------------------------------------------------
ENGINES = ("auto", "simt", "cublas")


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Runs a distiller test once per engine of the row products (esamp/cuda_plan.h); the CUDA binding
    reads ESAMP_CUDA_DISTILLER_ENGINE on every call."""
    monkeypatch.setenv("ESAMP_CUDA_DISTILLER_ENGINE", request.param)
    return request.param


def make_distillers(H, R, L, S, seed=0):
    """A CPU distiller with non-trivial parameters (B != 0) and a CUDA copy of it."""
    dc = esamp.Distiller(H, R, L, S, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        dc.params.add_(torch.randn(dc.params.shape, generator=g) * 0.02)
    dg = esamp.Distiller(H, R, L, S, seed=seed, device="cuda")
    with torch.no_grad():
        dg.params.copy_(dc.params)
    return dc, dg


@pytest.mark.parametrize("dtype,out_dtype", [(F32, None), (BF16, None), (F16, F32)])
def test_distiller_forward_agrees_with_cpu(dtype, out_dtype, engine):
    H, R, L, S, N = 256, 16, 2, 4, 40
    dc, dg = make_distillers(H, R, L, S, 1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, H, generator=g).to(dtype)
    sid = torch.randint(0, S, (N,), generator=g)
    yc = dc.forward(x, sid, out_dtype=out_dtype)
    yg = dg.forward(x.cuda(), sid.cuda(), out_dtype=out_dtype).cpu()
    assert yg.dtype == yc.dtype and yg.shape == (N, H)
    if yc.dtype == F32:
        torch.testing.assert_close(yg, yc, rtol=1e-4, atol=1e-5)
    else:  # both round the same fp32 value (within 1e-6 relative) to bf16/fp16: at most one ulp apart
        tol = {BF16: 8e-3, F16: 1e-3}[yc.dtype]
        torch.testing.assert_close(yg.float(), yc.float(), rtol=tol, atol=tol)


def test_distiller_train_step_parity_20_steps(engine):
    H, R, L, S, N = 256, 16, 2, 4, 32
    dc, dg = make_distillers(H, R, L, S, 3)
    g = torch.Generator().manual_seed(4)
    for it in range(20):
        x = torch.randn(N, H, generator=g)
        t = x * 0.5 + torch.randn(N, H, generator=g) * 0.3
        sid = torch.randint(0, S - 1, (N,), generator=g)  # slot S-1 stays idle
        if it % 7 == 3:
            x[5, 3] = float("nan")
            t[9, 0] = float("inf")
        lc = dc.train_step(x, t, sid)
        lg = dg.train_step(x.cuda(), t.cuda(), sid.cuda()).cpu()
        assert torch.equal(torch.isnan(lg), torch.isnan(lc)), (it, lg, lc)
        assert bool(torch.isnan(lg[S - 1]))
        act = ~torch.isnan(lc)
        torch.testing.assert_close(lg[act], lc[act], rtol=1e-4, atol=0.0)
        assert torch.equal(dg.step.cpu(), dc.step)
    for name in ("params", "exp_avg", "exp_avg_sq"):
        e = rel_err(getattr(dg, name), getattr(dc, name))
        assert e <= 1e-4, f"{name}: relative error {e:.2e}"
    torch.testing.assert_close(dg.params.cpu(), dc.params, rtol=1e-4, atol=1e-6)
    sc, sg = dc.stats(), dg.stats()
    assert sg["rows_trained"] == sc["rows_trained"] and sg["rows_skipped"] == sc["rows_skipped"]
    assert sg["steps"] == sc["steps"] == 20
    assert sc["rows_skipped"] > 0 and sc["rows_trained"] > 0
    assert math.isclose(sg["loss_sum"], sc["loss_sum"], rel_tol=1e-4)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_distiller_train_step_half_inputs_agree_with_cpu(dtype, engine):
    H, R, L, S, N = 128, 8, 1, 3, 24
    dc, dg = make_distillers(H, R, L, S, 5)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        x = torch.randn(N, H, generator=g).to(dtype)
        t = torch.randn(N, H, generator=g).to(dtype)
        sid = torch.randint(0, S, (N,), generator=g)
        lc = dc.train_step(x, t, sid)
        lg = dg.train_step(x.cuda(), t.cuda(), sid.cuda()).cpu()
        torch.testing.assert_close(lg, lc, rtol=1e-4, atol=0.0, equal_nan=True)
    assert rel_err(dg.params, dc.params) <= 1e-4


def test_distiller_train_step_empty_batch(engine):
    dc, dg = make_distillers(64, 4, 1, 3, 7)
    before = dg.params.clone()
    losses = dg.train_step(torch.empty(0, 64, device="cuda"), torch.empty(0, 64, device="cuda"),
                           torch.empty(0, dtype=torch.int64, device="cuda"))
    assert bool(torch.isnan(losses).all())
    assert torch.equal(dg.params, before) and int(dg.step.sum()) == 0
    assert dg.stats() == {"rows_trained": 0, "rows_skipped": 0, "loss_sum": 0.0, "steps": 0}


def test_distiller_reset_agrees_with_cpu():
    H, R, L, S = 96, 8, 2, 4
    gamma = torch.rand(H) + 0.5
    dc = esamp.Distiller(H, R, L, S, seed=11, gamma_init=gamma)
    dg = esamp.Distiller(H, R, L, S, seed=11, gamma_init=gamma.cuda(), device="cuda")
    torch.testing.assert_close(dg.params.cpu(), dc.params, rtol=1e-5, atol=1e-8)  # device vs host libm
    # train a little, then reset slots 1 and 3 on both
    g = torch.Generator().manual_seed(12)
    x, t = torch.randn(16, H, generator=g), torch.randn(16, H, generator=g)
    sid = torch.arange(16) % S
    dc.train_step(x, t, sid)
    dg.train_step(x.cuda(), t.cuda(), sid.cuda())
    trained = dg.params.clone()
    dc.reset([1, 3])
    dg.reset([1, 3])
    torch.testing.assert_close(dg.params.cpu(), dc.params, rtol=1e-4, atol=1e-7)
    for s in (1, 3):
        assert bool((dg.exp_avg[s] == 0).all()) and bool((dg.exp_avg_sq[s] == 0).all()) and int(dg.step[s]) == 0
        assert torch.equal(dg.params[s].cpu(), dc.params[s]) or rel_err(dg.params[s], dc.params[s]) < 1e-6
    for s in (0, 2):
        assert torch.equal(dg.params[s], trained[s]) and int(dg.step[s]) == 1


def test_distiller_out_of_range_cuda_slot_ids_are_defensive(engine):
    """CUDA slot ids are not value-checked by the binding (no host sync): forward writes NaN rows for
    ids outside [0, S), train_step counts those rows as skipped (documented in csrc/cuda/distiller.cu)."""
    H, R, L, S = 64, 4, 1, 3
    _, dg = make_distillers(H, R, L, S, 13)
    x = torch.randn(4, H, device="cuda")
    sid = torch.tensor([0, 7, -1, 2], device="cuda")
    y = dg.forward(x, sid)
    assert bool(torch.isnan(y[1]).all()) and bool(torch.isnan(y[2]).all())
    assert bool(torch.isfinite(y[0]).all()) and bool(torch.isfinite(y[3]).all())
    dg.train_step(x, x, sid)
    st = dg.stats()
    assert st["rows_trained"] == 2 and st["rows_skipped"] == 2


def test_distiller_train_step_cuda_graph_replay(engine):
    H, R, L, S, N = 128, 8, 2, 3, 12
    _, da = make_distillers(H, R, L, S, 14)
    _, db = make_distillers(H, R, L, S, 14)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(N, H, generator=g).cuda()
    t = torch.randn(N, H, generator=g).cuda()
    sid = (torch.arange(N) % 2).cuda()
    for _ in range(3):  # eager
        la = da.train_step(x, t, sid)
    losses = torch.empty(S, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    snap = [v.clone() for v in (db.params, db.exp_avg, db.exp_avg_sq, db.step, db.counters)]
    with torch.cuda.stream(side):
        db.train_step(x, t, sid, losses=losses)  # warm-up, undone below
    torch.cuda.current_stream().wait_stream(side)
    for v, s in zip((db.params, db.exp_avg, db.exp_avg_sq, db.step, db.counters), snap):
        v.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        db.train_step(x, t, sid, losses=losses)
    assert torch.equal(db.params, snap[0])  # capture does not run the kernels
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(db.params, da.params) and torch.equal(db.exp_avg, da.exp_avg)
    assert torch.equal(db.step, da.step) and torch.equal(losses, la) and torch.equal(db.counters, da.counters)


# --------------------------------------------------------------------------------------------------
# opcheck on CUDA tensors
# --------------------------------------------------------------------------------------------------
def _reweight_args(seed=True, bias=True):
    g = torch.Generator().manual_seed(16)
    B, V, H = 4, 300, 40
    a = [torch.randn(B, V, generator=g), torch.randn(B, H, generator=g), torch.randn(V, H, generator=g),
         torch.randn(V, generator=g) if bias else None, torch.full((B,), 0.25), torch.tensor([1.0, 0.0, 0.7, 1.3]),
         torch.tensor([0, 5, 0, 50]), torch.tensor([1.0, 1.0, 0.8, 0.9]), torch.tensor([0.0, 0.0, 0.05, 0.0])]
    if seed:
        a += [esamp.ops.derive_row_seeds(3, B), torch.arange(B)]
    return tuple(None if t is None else t.cuda() for t in a)


@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_reweight_cuda(bias):
    torch.library.opcheck(torch.ops.esamp.reweight.default, _reweight_args(True, bias))
    torch.library.opcheck(torch.ops.esamp.reweight_logits.default, _reweight_args(False, bias))


def test_opcheck_mix_hidden_cuda():
    h = torch.randn(5, 33, device="cuda")
    torch.library.opcheck(torch.ops.esamp.mix_hidden.default, (h, torch.randn_like(h), torch.rand(5, device="cuda")))


def test_opcheck_distiller_cuda():
    _, d = make_distillers(33, 4, 2, 3, 17)
    x = torch.randn(5, 33, device="cuda")
    t = torch.randn(5, 33, device="cuda")
    sid = torch.tensor([0, 2, 2, 1, 0], device="cuda")
    torch.library.opcheck(torch.ops.esamp.distiller_forward.default, (d.params, x, sid, 4, 2, 1e-6, None))
    torch.library.opcheck(torch.ops.esamp.distiller_forward.default, (d.params, x.to(BF16), sid, 4, 2, 1e-6, F32))
    losses = torch.empty(3, device="cuda")
    torch.library.opcheck(torch.ops.esamp.distiller_train_step.default,
                          (d.params, d.exp_avg, d.exp_avg_sq, d.step, losses, d.counters, x, t, sid, 4, 2, 1e-6,
                           4e-4, 0.9, 0.999, 1e-4, 0.5))
    torch.library.opcheck(torch.ops.esamp.distiller_reset.default,
                          (d.params, d.exp_avg, d.exp_avg_sq, d.step, torch.tensor([0, 2], device="cuda"), 33, 4, 2,
                           7, torch.ones(33, device="cuda")))


# --------------------------------------------------------------------------------------------------
# Bad input on CUDA: error type and the argument named in the message
# --------------------------------------------------------------------------------------------------
def test_bad_input_reweight_device_mix():
    a = list(_reweight_args())
    for i, name in ((1, "pred_hidden"), (2, "lm_head_weight"), (3, "lm_head_bias"), (4, "beta"), (5, "temperature"),
                    (6, "top_k"), (9, "seed"), (10, "step")):
        bad = list(a)
        bad[i] = bad[i].cpu()
        with pytest.raises(RuntimeError, match=f"{name}: expected a tensor on cuda"):
            torch.ops.esamp.reweight(*bad)
    bad = list(a)
    bad[2] = bad[2][:-1]  # V mismatch
    with pytest.raises(RuntimeError, match="lm_head_weight: expected 2-D"):
        torch.ops.esamp.reweight(*bad)
    # the Python wrapper checks the device of per-row tensors itself (ValueError)
    with pytest.raises(ValueError, match="temperature: expected a tensor on cuda"):
        ops.reweight(a[0], a[1], a[2], temperature=torch.ones(4))


def test_bad_input_distiller_device_mix():
    _, d = make_distillers(32, 4, 1, 2, 18)
    x = torch.randn(3, 32, device="cuda")
    sid = torch.tensor([0, 1, 1], device="cuda")
    with pytest.raises(RuntimeError, match="x: expected a tensor on cuda"):
        torch.ops.esamp.distiller_forward(d.params, x.cpu(), sid, 4, 1, 1e-6, None)
    with pytest.raises(RuntimeError, match="slot_ids: expected a tensor on cuda"):
        torch.ops.esamp.distiller_forward(d.params, x, sid.cpu(), 4, 1, 1e-6, None)
    losses = torch.empty(2, device="cuda")
    with pytest.raises(RuntimeError, match="losses: expected .* on cuda"):
        torch.ops.esamp.distiller_train_step(d.params, d.exp_avg, d.exp_avg_sq, d.step, losses.cpu(), d.counters, x,
                                             x, sid, 4, 1, 1e-6, 4e-4, 0.9, 0.999, 1e-4, 0.5)
    with pytest.raises(RuntimeError, match="target: expected a tensor on cuda"):
        torch.ops.esamp.distiller_train_step(d.params, d.exp_avg, d.exp_avg_sq, d.step, losses, d.counters, x,
                                             x.cpu(), sid, 4, 1, 1e-6, 4e-4, 0.9, 0.999, 1e-4, 0.5)
    with pytest.raises(RuntimeError, match="exp_avg: expected a tensor on cuda"):
        torch.ops.esamp.distiller_train_step(d.params, d.exp_avg.cpu(), d.exp_avg_sq, d.step, losses, d.counters,
                                             x, x, sid, 4, 1, 1e-6, 4e-4, 0.9, 0.999, 1e-4, 0.5)
    with pytest.raises(RuntimeError, match="slot_ids: expected a tensor on cuda"):
        torch.ops.esamp.distiller_reset(d.params, d.exp_avg, d.exp_avg_sq, d.step, torch.tensor([0]), 32, 4, 1, 0,
                                        None)
    with pytest.raises(RuntimeError, match="gamma_init: expected .* on cuda"):
        torch.ops.esamp.distiller_reset(d.params, d.exp_avg, d.exp_avg_sq, d.step, torch.tensor([0], device="cuda"),
                                        32, 4, 1, 0, torch.ones(32))


def test_bad_input_mix_hidden_device_mix():
    h = torch.randn(3, 8, device="cuda")
    with pytest.raises(RuntimeError, match="pred_hidden: expected a tensor on cuda"):
        torch.ops.esamp.mix_hidden(h, h.cpu(), torch.ones(3, device="cuda"))
    with pytest.raises(RuntimeError, match="beta: expected a tensor on cuda"):
        torch.ops.esamp.mix_hidden(h, h, torch.ones(3))


# --------------------------------------------------------------------------------------------------
# Second pass (issue 12): dense candidate path, parallel sampling tail, multi-block rows, filter paths,
# distiller engines and bounded workspace, rows on gridDim.x, trainer stream ordering.
# --------------------------------------------------------------------------------------------------
def _problem(B, V, H, ldt, pdt, wdt, seed, bias=False):
    """LM-like problem with separate dtypes for logits, prediction and LM head."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) / H ** 0.5
    hid = torch.randn(B, H, generator=g) * 3.0
    logits = (hid @ W.T).to(ldt)
    pred = (hid + 0.5 * torch.randn(B, H, generator=g)).to(pdt)
    b = (torch.randn(V, generator=g) * 0.1).to(wdt) if bias else None
    return logits, pred, W.to(wdt), b, g


def _params(B, g, *, beta=0.3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    full = lambda v, dt=torch.float32: torch.full((B,), v, dtype=dt)  # noqa: E731
    return {"beta": full(beta), "temperature": full(temperature), "top_k": full(top_k, torch.int64),
            "top_p": full(top_p), "min_p": full(min_p)}


DENSE_GEMMS = ["cublas", "fused"]  # ESAMP_CUDA_REWEIGHT_DENSE_GEMM: the two variants of the dense path


def _compare_reweight(logits, pred, W, b, rp, seed_t, steps=4, min_agree=0.995):
    """CUDA vs CPU: candidate sets and mixed logits (reweight_logits) and tokens / logprobs (reweight)."""
    tol = m_bound(logits, pred, W, b, rp)
    oc = run_reweight_logits("cpu", logits, pred, W, b, rp)
    og = run_reweight_logits("cuda", logits, pred, W, b, rp).cpu()
    lf = logits.float().numpy()
    B = logits.shape[0]
    for r in range(B):
        if torch.equal(torch.isneginf(oc[r]), torch.isneginf(og[r])):
            assert_m_close(og[r], oc[r], tol[r])
        else:
            margin = threshold_margin(lf[r], float(rp["temperature"][r]), int(rp["top_k"][r]), float(rp["top_p"][r]),
                                      float(rp["min_p"][r]))
            assert margin < 1e-5, f"row {r}: candidate sets differ away from every threshold (margin {margin:.2e})"
    agree = total = 0
    for step in range(steps):
        tc, lc = run_reweight("cpu", logits, pred, W, b, rp, seed_t, step)
        tg, lg = run_reweight("cuda", logits, pred, W, b, rp, seed_t, step)
        tg, lg = tg.cpu(), lg.cpu()
        same = tg == tc
        agree += int(same.sum())
        total += B
        assert_logprobs_close(lg[same], lc[same], tol[same], oc[same])
    assert agree >= math.ceil(min_agree * total), f"tokens agree on {agree}/{total} rows"
    return oc, og


@pytest.mark.parametrize("ldt,pdt,wdt", [(BF16, BF16, BF16), (F16, F16, F16), (BF16, F32, BF16), (F32, F32, F32),
                                         (F32, BF16, F16)])
@pytest.mark.parametrize("mode", ["auto", "force", "off"])
@pytest.mark.parametrize("gemm", DENSE_GEMMS)
def test_reweight_dense_path_agrees_with_cpu(ldt, pdt, wdt, mode, gemm, monkeypatch):
    """Rows without a filter and beta > 0 take the dense path, in either variant: 'fused' (tensor-core
    d = pred W^T + fused epilogue; bf16 x bf16 and fp16 x fp16 use 16-bit MMA, the other dtype pairs TF32 with
    split operands) or 'cublas' (cublasGemmEx into a float32 workspace + streaming pass; pairs cuBLAS cannot
    take exactly -- a 16-bit LM head with a prediction of another dtype -- stay on the fused kernel).  'force'
    sends every beta > 0 row (also filtered ones) through it, 'off' none."""
    monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE", mode)
    monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", gemm)
    B, V, H = 40, 5003, 200  # V: not a multiple of the 128-token tile; H: not of the K step
    logits, pred, W, b, g = _problem(B, V, H, ldt, pdt, wdt, 21, bias=True)
    rp = _params(B, g, beta=0.4)
    rp["beta"][::7] = 0.0                 # some beta = 0 rows (never a dot product)
    rp["temperature"][::5] = 0.0          # some greedy rows
    rp["min_p"][1::6] = 0.05              # some filtered rows
    rp["top_k"][2::6] = 40
    rp["top_p"][3::6] = 0.9
    seed_t = esamp.ops.derive_row_seeds(5, B)
    _compare_reweight(logits, pred, W, b, rp, seed_t)


@pytest.mark.parametrize("gemm", DENSE_GEMMS)
def test_reweight_dense_rows_spread_over_row_tiles(gemm, monkeypatch):
    """More than 64 dense rows (several row tiles of the dense GEMM), interleaved with sparse rows."""
    monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", gemm)
    B, V, H = 150, 2049, 96
    logits, pred, W, b, g = _problem(B, V, H, BF16, BF16, BF16, 22)
    rp = _params(B, g, beta=0.25)
    rp["min_p"][::3] = 0.1
    seed_t = esamp.ops.derive_row_seeds(6, B)
    _compare_reweight(logits, pred, W, b, rp, seed_t, steps=2)


def test_reweight_beta0_no_filter_tokens_are_exact():
    """beta = 0 and no filter (plain Gumbel-max over V, evaluated by every thread, one Philox call per 4 ids):
    m = z exactly on both backends, so the tokens must be identical, not just agree on 99.5 %."""
    for B, V, H, dt in ((64, 32000, 64, BF16), (3, 152064, 32, F32), (17, 4099, 8, F16)):
        logits, pred, W, b, g = _problem(B, V, H, dt, dt, dt, 23)
        rp = _params(B, g, beta=0.0, temperature=0.8)
        seed_t = esamp.ops.derive_row_seeds(7, B)
        oc = run_reweight_logits("cpu", logits, pred, W, b, rp)
        og = run_reweight_logits("cuda", logits, pred, W, b, rp).cpu()
        assert torch.equal(oc, og)  # z = l / T: one IEEE division on both
        for step in (0, 1, 2):
            tc, lc = run_reweight("cpu", logits, pred, W, b, rp, seed_t, step)
            tg, lg = run_reweight("cuda", logits, pred, W, b, rp, seed_t, step)
            assert torch.equal(tg.cpu(), tc), (B, V, step)
            torch.testing.assert_close(lg.cpu(), lc, rtol=0, atol=1e-5)


@pytest.mark.parametrize("B", [1, 2, 5, 16])
def test_reweight_small_batches_several_blocks_per_row(B):
    """Small B: a row is split over a cluster of blocks (sm_90); every filter path against the CPU, and the
    tokens of a row do not depend on the batch it is in (same row alone vs. in a batch of 128)."""
    V, H = 152064, 64
    logits, pred, W, b, g = _problem(128, V, H, BF16, BF16, BF16, 24)
    rp = _params(128, g, beta=0.3)
    kinds = [dict(min_p=0.1), dict(top_k=50), dict(top_p=0.9), dict(top_k=300, top_p=0.8), dict(min_p=0.02, top_p=0.95),
             dict(), dict(beta=0.0), dict(top_k=5000, top_p=0.99)]
    for r in range(128):
        for k, v in kinds[r % len(kinds)].items():
            rp[k][r] = v
    seed_t = esamp.ops.derive_row_seeds(8, 128)
    sub = lambda t: t[:B]  # noqa: E731
    rps = {k: sub(v) for k, v in rp.items()}
    _compare_reweight(sub(logits), sub(pred), W, b, rps, sub(seed_t), steps=3)
    t_small, _ = run_reweight("cuda", sub(logits), sub(pred), W, b, rps, sub(seed_t), 4)
    t_big, _ = run_reweight("cuda", logits, pred, W, b, rp, seed_t, 4)
    assert torch.equal(t_small.cpu(), t_big[:B].cpu())


def test_reweight_filter_paths_agree_with_cpu():
    """The filter paths: min-p (histogram count bound), top-k (radix levels 1-2 after the pass-1 level 0),
    top-p over the whole row (Z + mass levels), top-k / min-p + top-p (gathered list), large top-k + top-p
    (list too big: global passes), ties at the top-k boundary, and duplicate maxima."""
    B, V, H = 64, 32000, 128
    logits, pred, W, b, g = _problem(B, V, H, F32, F32, BF16, 25)
    logits[60:, :] = torch.round(logits[60:, :] * 2) / 2  # many ties
    logits[63, 10] = logits[63, 20] = logits[63].max() + 1  # two maxima
    rp = _params(B, g, beta=0.25)
    combos = [dict(min_p=0.05), dict(top_k=1), dict(top_k=37), dict(top_p=0.5), dict(top_p=0.999),
              dict(top_k=100, top_p=0.9), dict(min_p=0.01, top_p=0.7), dict(top_k=20000, top_p=0.95),
              dict(top_k=3000), dict(min_p=0.3, top_k=10, top_p=0.6)]
    for r in range(B):
        for k, v in combos[r % len(combos)].items():
            rp[k][r] = v
    seed_t = esamp.ops.derive_row_seeds(9, B)
    _compare_reweight(logits, pred, W, b, rp, seed_t, steps=3)


@pytest.mark.parametrize("gemm", DENSE_GEMMS)
def test_reweight_dense_path_cuda_graph_replay(gemm, monkeypatch):
    """Capture + replay of the dense path (the cuBLAS variant's GEMM runs on torch's handle, bound to the
    capturing stream); replays match eager calls bit for bit."""
    monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", gemm)
    B, V, H = 24, 8000, 128
    logits, pred, W, b, g = _problem(B, V, H, BF16, BF16, BF16, 26)
    rp = _params(B, g, beta=0.3)
    rp["min_p"][::2] = 0.05  # half sparse, half dense
    logits, pred, W = cuda(logits, pred, W)
    rpc = {k: v.cuda() for k, v in rp.items()}
    seed_c = esamp.ops.derive_row_seeds(10, B).cuda()
    args = lambda st: (logits, pred, W, None, rpc["beta"], rpc["temperature"], rpc["top_k"], rpc["top_p"],  # noqa
                       rpc["min_p"], seed_c, st)
    eager = [torch.ops.esamp.reweight(*args(torch.full((B,), k, dtype=torch.int64, device="cuda"))) for k in range(4)]
    mixed_eager = torch.ops.esamp.reweight_logits(*args(None)[:9])
    step_t = torch.zeros(B, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.ops.esamp.reweight(*args(step_t))
            torch.ops.esamp.reweight_logits(*args(None)[:9])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tok, lp = torch.ops.esamp.reweight(*args(step_t))
        mixed = torch.ops.esamp.reweight_logits(*args(None)[:9])
        step_t.add_(1)
    for k in range(4):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(tok, eager[k][0]) and torch.equal(lp, eager[k][1]), f"replay {k}"
        assert torch.equal(mixed, mixed_eager)


@pytest.mark.parametrize("layout", ["broadcast_pred", "strided_pred", "overlapping_pred", "strided_W",
                                    "f32_W_bf16_pred", "f32_W_f16_pred"])
@pytest.mark.parametrize("gemm", DENSE_GEMMS)
def test_reweight_dense_operand_layouts_agree_with_cpu(layout, gemm, monkeypatch):
    """Operand layouts of the dense GEMM: a broadcast prediction (row stride 0: one GEMM row), strided and
    overlapping prediction rows (the latter copied compact for cuBLAS), strided LM-head rows (lda), and an
    fp32 LM head with a 16-bit prediction (widened exactly to fp32 for cuBLAS).  The CPU gets contiguous
    copies of the same values."""
    monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", gemm)
    B, V, H = 24, 3001, 72
    pdt = {"f32_W_f16_pred": F16}.get(layout, BF16)
    wdt = F32 if layout.startswith("f32_W") else BF16
    logits, pred, W, b, g = _problem(B, V, H, BF16, pdt, wdt, 27, bias=True)
    if layout == "broadcast_pred":
        pred_g = pred[:1].cuda().expand(B, H)
    elif layout == "strided_pred":
        pred_g = torch.zeros(B, 2 * H, dtype=pdt, device="cuda")[:, :H]
        pred_g.copy_(pred.cuda())
    elif layout == "overlapping_pred":
        flat = pred.flatten()[: (B - 1) * (H // 2) + H].cuda()
        pred_g = flat.as_strided((B, H), (H // 2, 1))
    else:
        pred_g = pred.cuda()
    pred_c = pred_g.cpu().contiguous()  # the values the CUDA op sees
    if layout == "strided_W":
        W_g = torch.zeros(V, H + 8, dtype=wdt, device="cuda")[:, :H]
        W_g.copy_(W.cuda())
    else:
        W_g = W.cuda()
    rp = _params(B, g, beta=0.35)
    rp["temperature"][::9] = 0.0
    seed_t = esamp.ops.derive_row_seeds(11, B)
    tol = m_bound(logits, pred_c, W, b, rp)
    lg_, b_g = logits.cuda(), b.cuda()
    r = {k: v.cuda() for k, v in rp.items()}
    oc = run_reweight_logits("cpu", logits, pred_c, W, b, rp)
    og = ops.reweight_logits(lg_, pred_g, W_g, lm_head_bias=b_g, **r).cpu()
    assert torch.equal(torch.isneginf(oc), torch.isneginf(og))
    assert_m_close(og, oc, tol)
    agree = 0
    for step in range(3):
        tc, lc = run_reweight("cpu", logits, pred_c, W, b, rp, seed_t, step)
        tg, lgp = ops.reweight(lg_, pred_g, W_g, lm_head_bias=b_g, seed=seed_t.cuda(),
                               step=torch.full((B,), step, dtype=torch.int64, device="cuda"), **r)
        tg, lgp = tg.cpu(), lgp.cpu()
        same = tg == tc
        agree += int(same.sum())
        assert_logprobs_close(lgp[same], lc[same], tol[same], oc[same])
    assert agree >= math.ceil(0.995 * 3 * B), f"tokens agree on {agree}/{3 * B} rows"


def test_reweight_dense_gemm_variants_agree_with_each_other(monkeypatch):
    """The two variants draw the same Gumbel keys (same Philox counters) and mix identically; only d differs
    by float32 summation order, so their tokens agree as closely as each agrees with the CPU."""
    B, V, H = 64, 6007, 160
    logits, pred, W, b, g = _problem(B, V, H, BF16, BF16, BF16, 28, bias=True)
    rp = _params(B, g, beta=0.3)
    seed_t = esamp.ops.derive_row_seeds(12, B)
    got = {}
    for gemm in DENSE_GEMMS:
        monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", gemm)
        got[gemm] = [run_reweight("cuda", logits, pred, W, b, rp, seed_t, step)[0].cpu() for step in range(4)]
    agree = sum(int((a == c).sum()) for a, c in zip(got["cublas"], got["fused"]))
    assert agree >= math.ceil(0.995 * 4 * B), f"variants agree on {agree}/{4 * B} tokens"


def test_bad_dense_gemm_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", "tensorcore")
    B, V, H = 2, 1500, 16
    logits, pred, W, b, g = _problem(B, V, H, F32, F32, F32, 29)
    rp = _params(B, g)
    with pytest.raises(RuntimeError, match="ESAMP_CUDA_REWEIGHT_DENSE_GEMM: expected auto, fused or cublas"):
        run_reweight_logits("cuda", logits, pred, W, None, rp)


def test_capture_and_mix_hidden_beyond_65535_rows():
    """Rows are on gridDim.x: more rows than the 65,535 of gridDim.y (a large max_num_batched_tokens)."""
    N, H = 70001, 24
    h = torch.randn(N, H, device="cuda", dtype=BF16)
    res = torch.randn(N, H, device="cuda", dtype=BF16)
    out = torch.empty(N + 5, H, device="cuda", dtype=F32)
    ops.capture(h, res, out)
    torch.testing.assert_close(out[:N], h.float() + res.float(), rtol=0, atol=0)
    p = torch.randn(N, H, device="cuda", dtype=BF16)
    beta = torch.rand(N, device="cuda")
    got = ops.mix_hidden(h, p, beta)
    want = ops.mix_hidden(h.cpu(), p.cpu(), beta.cpu())
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("shape", ["shared", "8x16", "decode", "warm"])
def test_distiller_engines_agree_with_cpu(shape, engine):
    """Every engine on the shapes that choose them: shared mode (cuBLAS + gradient buffer), 8 slots x 16 rows,
    decode (one row per slot), a warm start (one slot with many rows in a larger bank)."""
    H, R, L = 160, 16, 2
    S, counts = {"shared": (1, [48]), "8x16": (8, [16] * 8), "decode": (64, [1] * 64),
                 "warm": (16, [300] + [0] * 15)}[shape]
    dc, dg = make_distillers(H, R, L, S, 30)
    g = torch.Generator().manual_seed(31)
    sid = torch.cat([torch.full((c,), s, dtype=torch.int64) for s, c in enumerate(counts) if c > 0])
    sid = sid[torch.randperm(sid.shape[0], generator=g)]
    for it in range(6):
        x = torch.randn(sid.shape[0], H, generator=g)
        t = 0.5 * x + 0.3 * torch.randn(sid.shape[0], H, generator=g)
        if it == 2:
            x[3, 1] = float("nan")
        lc = dc.train_step(x, t, sid)
        lg = dg.train_step(x.cuda(), t.cuda(), sid.cuda()).cpu()
        assert torch.equal(torch.isnan(lg), torch.isnan(lc)), (it, lg, lc)
        act = ~torch.isnan(lc)
        torch.testing.assert_close(lg[act], lc[act], rtol=1e-4, atol=0.0)
    for name in ("params", "exp_avg", "exp_avg_sq"):
        e = rel_err(getattr(dg, name), getattr(dc, name))
        assert e <= 1e-4, f"{name}: relative error {e:.2e}"
    assert torch.equal(dg.step.cpu(), dc.step)
    xq = torch.randn(37, H, generator=g)
    sq = sid[:37]
    torch.testing.assert_close(dg.forward(xq.cuda(), sq.cuda()).cpu(), dc.forward(xq, sq), rtol=1e-4, atol=1e-5)
    sc, sg = dc.stats(), dg.stats()
    assert sg["rows_trained"] == sc["rows_trained"] and sg["rows_skipped"] == sc["rows_skipped"] == 1


def test_distiller_warm_start_workspace_within_64mb(monkeypatch):
    """Issue 12: a 1,024-row warm start of one slot in a 256-slot bank (H = 3584, R = 64, L = 2) must not
    allocate more than 64 MB of workspace (the old kernels allocated ~1.4 GB of gradients)."""
    monkeypatch.delenv("ESAMP_CUDA_DISTILLER_ENGINE", raising=False)
    H, R, L, S, N = 3584, 64, 2, 256, 1024
    d = esamp.Distiller(H, R, L, S, device="cuda")
    x = torch.randn(N, H, device="cuda")
    t = 0.5 * x + 0.1 * torch.randn_like(x)
    sid = torch.zeros(N, dtype=torch.int64, device="cuda")
    losses = torch.empty(S, device="cuda")
    d.train_step(x, t, sid, losses=losses)  # warm-up: lazily created handles and their workspaces
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    d.train_step(x, t, sid, losses=losses)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 64 * 10**6, f"the train step allocated {extra / 1e6:.1f} MB"
    assert int(d.step[0]) == 2 and int(d.step[1:].sum()) == 0 and bool(torch.isfinite(losses[0]))


def test_trainer_stats_fresh_and_non_blocking():
    """stats() (fresh) includes every observed update; stats(fresh=False) never waits: while the trainer
    stream waits behind a sleeping caller stream it still returns the previous counters at once."""
    tr = esamp.Trainer(64, 8, 2, 4, device="cuda", ring_rows=32, ring_segments=2)
    x = torch.randn(10, 64, device="cuda")
    sid = torch.arange(10, device="cuda") % 4
    tr.observe(x, x, sid)
    assert tr.stats()["rows_trained"] == 10
    torch.cuda._sleep(int(4e8))  # ~0.2 s on the caller's stream; the next update waits behind it
    tr.observe(x, x, sid)
    snap = tr._impl.stats(False)
    assert snap.device.type == "cpu" and snap.dtype == torch.float64 and snap.shape == (4,)
    assert int(snap[0]) == 10, "stats(fresh=False) waited for the queued update"
    assert tr.stats()["rows_trained"] == 20 and tr.stats()["steps"] == 2


def test_trainer_load_state_waits_for_the_callers_stream():
    tr = esamp.Trainer(32, 4, 1, 2, device="cuda", ring_rows=8)
    sd = tr.state_dict()
    cur = tr._impl.state()
    src = [torch.empty_like(c) for c in cur]
    torch.cuda._sleep(int(4e8))  # the caller's stream is busy; the sources are written after the sleep
    for s_, c in zip(src, cur):
        s_.copy_(c)
    src[0].add_(1.5)
    tr._impl.load_state(src)
    after = tr._impl.state()
    assert torch.equal(after[0], src[0]) and torch.equal(after[1], src[1])
    assert sd["params"].shape == tuple(after[0].shape)


def test_trainer_construction_is_ordered_after_the_callers_stream():
    H, R, L, S = 48, 4, 2, 3
    gamma = torch.empty(H, device="cuda")
    torch.cuda._sleep(int(4e8))
    gamma.fill_(0.75)  # queued behind the sleep on the caller's stream
    tr = esamp.Trainer(H, R, L, S, device="cuda", seed=4, gamma_init=gamma, ring_rows=16)
    ref = esamp.Distiller(H, R, L, S, device="cuda", seed=4, gamma_init=torch.full((H,), 0.75, device="cuda"))
    x = torch.randn(6, H, device="cuda")
    sid = torch.tensor([0, 1, 2, 0, 1, 2], device="cuda")
    tr.observe(x, x * 0.5, sid)
    ref.train_step(x, x * 0.5, sid)
    torch.testing.assert_close(tr.predict(x, sid), ref.forward(x, sid), rtol=0, atol=0)


def test_trainer_destruction_with_pending_updates():
    x = torch.randn(64, 128, device="cuda")
    sid = torch.arange(64, device="cuda") % 8
    for _ in range(3):
        tr = esamp.Trainer(128, 16, 2, 8, device="cuda", ring_rows=64)
        torch.cuda._sleep(int(2e8))
        tr.observe(x, x, sid)
        del tr  # the update is still queued behind the sleep
    y = torch.full((4096, 4096), 3.0, device="cuda")  # reuses freed blocks
    torch.cuda.synchronize()
    assert bool((y == 3.0).all())


def test_trainer_counters_mirror_many_updates():
    tr = esamp.Trainer(32, 4, 2, 2, device="cuda", ring_rows=8, ring_segments=3)
    x = torch.randn(5, 32, device="cuda")
    sid = torch.tensor([0, 1, 0, 1, 1], device="cuda")
    for i in range(50):
        tr.observe(x, x, sid)
        s = tr._impl.stats(False)
        assert 0 <= int(s[0]) <= 5 * (i + 1) and int(s[0]) % 5 == 0  # consistent snapshots only
    st = tr.stats()
    assert st["rows_trained"] == 250 and st["steps"] == 50
