"""esamp::reweight and esamp::reweight_logits (CPU) against the plain reference of SPEC 3/4
(python/esamp/reference/sampling.py).

Tolerances.  The kernels convert every input (fp32, bf16 or fp16 logits, prediction, weight, bias) to
float32 exactly, so the storage dtype does not enter the error: the only difference between kernel and
reference is how d_c = pred . W_c is summed (kernel: float32, vectorised order; reference: float64, rounded
once).  For every element the reference returns the bound

    |m_kernel - m_ref| <= m_tol = beta/T * ((H + 2) u sum_i |p_i W_ci| + 2u|d|) + 4u(|(1+beta) l| + beta|d|)/T + 4u|m|

with u = 2^-24: the classical worst-case bound of a float32 sum of H products in any order, plus the
roundings of the bias add and of the mix.  The table below is therefore the same for every storage dtype;
it is spelled out so that a reviewer can see that no dtype gets a looser tolerance:

    dtype of logits / pred / W | conversion to fp32 | accumulation | tolerance on m
    float32                    | exact              | fp32         | m_tol
    bfloat16                   | exact              | fp32         | m_tol
    float16                    | exact              | fp32         | m_tol

beta = 0 rows must match exactly (no dot product, m = z).  Logprobs: 2 max(m_tol) + 1e-6 + 2^-22 |logprob|
(the kernel's exp has relative error < 2^-22, sums are in double, the result is rounded to float32).

Exact comparisons (candidate sets and tokens) are made where they are meaningful: candidate sets on rows
whose values all lie farther than 1e-5 (relative) from every threshold decision, tokens on rows whose two
best perturbed scores differ by more than 1e-4 (and more than twice the m tolerance).  Each test asserts
that most rows were compared.
"""
import math

import numpy as np
import pytest
import torch

import esamp
from esamp.reference import sampling as ref

ops = torch.ops.esamp
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DNAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
MARGIN = 1e-5
KEY_GAP = 1e-4

FILTERS = [
    dict(),
    dict(min_p=0.05),
    dict(top_k=17),
    dict(top_p=0.9),
    dict(top_p=0.5, top_k=40),
    dict(min_p=0.01, top_k=100, top_p=0.95),
]


def lm_logits(B, V, gen, scale=2.0, head_base=8.0):
    """LM-like rows: N(0, scale^2) background plus a Zipf-shaped head on 32 random tokens."""
    l = torch.randn(B, V, generator=gen) * scale
    for r in range(B):
        head = torch.randperm(V, generator=gen)[:min(32, V)]
        s = head_base + 4 * torch.rand((), generator=gen).item()
        l[r, head] = s - 1.5 * torch.log(torch.arange(1, head.numel() + 1, dtype=torch.float32))
    return l


def make_problem(B, V, H, ldt=torch.float32, wdt=torch.float32, pdt=None, bias=False, layout="contiguous",
                 seed=0, head_base=8.0):
    """Logits [B, V], pred [B, H], W [V, H], bias [V] or None, with the requested memory layout:
    'contiguous', 'padded' (row stride > width for logits, pred and W: big[:, :V]) or 'strided' (every other
    row of a bigger tensor: big[::2])."""
    g = torch.Generator().manual_seed(seed)
    pdt = pdt or wdt
    l = lm_logits(B, V, g, head_base=head_base)
    p = torch.randn(B, H, generator=g)
    W = torch.randn(V, H, generator=g) * (1.0 / math.sqrt(H))
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    if layout == "padded":
        L2 = torch.zeros(B, V + 5, dtype=ldt)
        L2[:, :V] = l.to(ldt)
        P2 = torch.zeros(B, H + 3, dtype=pdt)
        P2[:, :H] = p.to(pdt)
        W2 = torch.zeros(V, H + 7, dtype=wdt)
        W2[:, :H] = W.to(wdt)
        lt, pt, Wt = L2[:, :V], P2[:, :H], W2[:, :H]
    elif layout == "strided":
        L2 = torch.zeros(2 * B, V, dtype=ldt)
        L2[::2] = l.to(ldt)
        P2 = torch.zeros(2 * B, H, dtype=pdt)
        P2[::2] = p.to(pdt)
        lt, pt, Wt = L2[::2], P2[::2], W.to(wdt)
    else:
        lt, pt, Wt = l.to(ldt), p.to(pdt), W.to(wdt)
    return lt, pt, Wt, (None if b is None else b.to(wdt))


def row_seeds(B, base=1234):
    return torch.tensor([base + 7919 * r for r in range(B)], dtype=torch.int64)


def compare_logits(out, rows, exact_beta0=False):
    """Returns the number of rows whose candidate set was compared; asserts on those rows."""
    compared = 0
    for r, row in enumerate(rows):
        o = out[r].numpy()
        if row["margin"] < MARGIN:
            continue
        compared += 1
        want_mask = row["mask"]
        got_mask = np.isfinite(o)
        assert np.array_equal(got_mask, want_mask), (
            f"row {r}: candidate sets differ: kernel-only {np.nonzero(got_mask & ~want_mask)[0][:10]}, "
            f"reference-only {np.nonzero(want_mask & ~got_mask)[0][:10]}")
        assert np.all(o[~got_mask] == -np.inf)
        m = row["m"]
        if exact_beta0:
            assert np.array_equal(o[got_mask], m[got_mask]), f"row {r}: beta = 0 must give m = z exactly"
        else:
            err = np.abs(o[got_mask].astype(np.float64) - m[got_mask].astype(np.float64))
            tol = row["m_tol"][got_mask]
            bad = err > tol
            assert not bad.any(), f"row {r}: |m - ref| {err[bad][:5]} > tol {tol[bad][:5]}"
    return compared


def compare_tokens(tokens, logprobs, rows):
    compared = 0
    for r, row in enumerate(rows):
        C = row["mask"]
        tol = float(row["m_tol"][C].max()) if C.any() else 0.0
        assert C[int(tokens[r])] or not C.any(), f"row {r}: token {int(tokens[r])} outside the candidate set"
        lp_tol = 2 * tol + 1e-6 + 2.0**-22 * abs(row["logprob"])
        if row["margin"] < MARGIN or row["key_gap"] <= max(KEY_GAP, 2 * tol):
            continue
        compared += 1
        assert int(tokens[r]) == row["token"], f"row {r}: token {int(tokens[r])} != reference {row['token']}"
        if row["logprob"] == -math.inf:
            assert float(logprobs[r]) == -math.inf
            continue
        assert abs(float(logprobs[r]) - row["logprob"]) <= lp_tol, (
            f"row {r}: logprob {float(logprobs[r])} vs reference {row['logprob']} (tol {lp_tol})")
    return compared


# ----------------------------------------------------------------------------------------------------
# Candidate sets and mixed logits
# ----------------------------------------------------------------------------------------------------
SHAPES = [(1, 1001, 577), (64, 1001, 577), (6, 5003, 96)]  # the last one takes the dense (GEMM) path


@pytest.mark.parametrize("ldt", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("wdt", DTYPES, ids=DNAME.get)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%dV%dH%d" % s)
def test_reweight_logits_candidate_sets(ldt, wdt, shape):
    B, V, H = shape
    logits, pred, W, _ = make_problem(B, V, H, ldt, wdt, seed=B + V)
    total = compared = 0
    for filt in FILTERS:
        for beta in (0.0, 0.25):
            out = esamp.ops.reweight_logits(logits, pred, W, beta=beta, **filt)
            assert out.dtype == torch.float32 and out.shape == (B, V)
            rows = ref.reweight_details(logits, pred, W, beta=beta, **filt)
            compared += compare_logits(out, rows, exact_beta0=beta == 0)
            total += B
    assert compared >= 0.9 * total, f"only {compared} of {total} rows were away from thresholds"


@pytest.mark.parametrize("layout", ["padded", "strided"])
@pytest.mark.parametrize("V", [1001, 5003])
def test_noncontiguous_rows(layout, V):
    B, H = 8, 577
    args = make_problem(B, V, H, torch.bfloat16, torch.float16, torch.float32, bias=True, layout=layout, seed=3)
    dense = make_problem(B, V, H, torch.bfloat16, torch.float16, torch.float32, bias=True, seed=3)
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    for filt in (dict(), dict(top_p=0.9, min_p=0.02)):
        a = esamp.ops.reweight_logits(args[0], args[1], args[2], lm_head_bias=args[3], beta=0.5, **filt)
        b = esamp.ops.reweight_logits(dense[0], dense[1], dense[2], lm_head_bias=dense[3], beta=0.5, **filt)
        assert torch.equal(a, b), "layout must not change the result"
        rows = ref.reweight_details(*args, beta=0.5, **filt)
        assert compare_logits(a, rows) >= B - 1
        seeds, steps = row_seeds(B), torch.arange(B)
        t1, l1 = esamp.ops.reweight(args[0], args[1], args[2], lm_head_bias=args[3], beta=0.5, seed=seeds,
                                    step=steps, **filt)
        t2, l2 = esamp.ops.reweight(dense[0], dense[1], dense[2], lm_head_bias=dense[3], beta=0.5, seed=seeds,
                                    step=steps, **filt)
        assert torch.equal(t1, t2) and torch.equal(l1, l2)


def test_broadcast_row_stride_zero():
    # logits.expand(B, V) has row stride 0: accepted (rows are only read) and equal to a materialised copy.
    V, H, B = 257, 33, 16
    g = torch.Generator().manual_seed(5)
    l = torch.randn(1, V, generator=g) * 3
    p = torch.randn(B, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.2
    a = esamp.ops.reweight(l.expand(B, V), p, W, top_p=0.8, seed=row_seeds(B), step=3)
    b = esamp.ops.reweight(l.repeat(B, 1), p, W, top_p=0.8, seed=row_seeds(B), step=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_large_vocabulary():
    # A GPT-2-sized vocabulary (V = 50257) with a small H; every filter, beta in {0, 0.25, 1}.  The head is
    # strong enough that the top-p boundary falls inside it: with 50k background values the probabilities
    # next to a boundary inside the background are closer than 1e-5 (relative), and such rows are excluded.
    B, V, H = 4, 50257, 48
    logits, pred, W, bias = make_problem(B, V, H, torch.float32, torch.bfloat16, bias=True, seed=11, head_base=14.0)
    seeds = row_seeds(B, 99)
    compared = total = 0
    for filt in (dict(), dict(min_p=0.05), dict(top_k=50), dict(top_p=0.9), dict(top_k=200, top_p=0.7, min_p=0.001)):
        for beta in (0.0, 0.25, 1.0):
            out = esamp.ops.reweight_logits(logits, pred, W, lm_head_bias=bias, beta=beta, **filt)
            tok, lp = esamp.ops.reweight(logits, pred, W, lm_head_bias=bias, beta=beta, seed=seeds, step=5, **filt)
            rows = ref.reweight_details(logits, pred, W, bias, beta=beta, seed=seeds, step=5, **filt)
            compared += compare_logits(out, rows, exact_beta0=beta == 0)
            compared += compare_tokens(tok, lp, rows)
            total += 2 * B
    assert compared >= 0.85 * total, f"{compared} of {total}"


# ----------------------------------------------------------------------------------------------------
# Tokens and logprobs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ldt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.float32)], ids=lambda d: DNAME[d])
@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_tokens_match_reference(ldt, wdt, beta):
    B, V, H = 64, 1001, 577
    logits, pred, W, bias = make_problem(B, V, H, ldt, wdt, bias=True, seed=21)
    compared = total = 0
    for i, filt in enumerate(FILTERS):
        seeds, steps = row_seeds(B, 1000 * i + 1), torch.arange(B) * 3 + i
        tok, lp = esamp.ops.reweight(logits, pred, W, lm_head_bias=bias, beta=beta, seed=seeds, step=steps, **filt)
        assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and tok.shape == lp.shape == (B,)
        assert bool(((tok >= 0) & (tok < V)).all()) and bool((lp <= 0).all())
        rows = ref.reweight_details(logits, pred, W, bias, beta=beta, seed=seeds, step=steps, **filt)
        compared += compare_tokens(tok, lp, rows)
        total += B
    assert compared >= 0.9 * total, f"{compared} of {total}"


def test_dense_path_tokens_match_reference():
    # |C| >= V / 4 with beta != 0: distiller logits from the GEMM path (also with a bf16 and an fp16 W, which
    # the dense path converts in chunks of rows).
    B, V, H = 8, 5003, 64
    for wdt in DTYPES:
        logits, pred, W, bias = make_problem(B, V, H, torch.float32, wdt, bias=True, seed=31)
        seeds = row_seeds(B, 5)
        tok, lp = esamp.ops.reweight(logits, pred, W, lm_head_bias=bias, beta=0.25, seed=seeds, step=1)
        rows = ref.reweight_details(logits, pred, W, bias, beta=0.25, seed=seeds, step=1)
        assert all(r["mask"].sum() == V for r in rows)
        assert compare_tokens(tok, lp, rows) >= B - 1


def test_batch_invariance():
    # A row gives the same token whether it is sampled alone or inside a batch (sparse and dense rows mixed).
    B, V, H = 12, 5003, 64
    logits, pred, W, _ = make_problem(B, V, H, seed=41)
    top_p = torch.tensor([1.0, 0.9] * (B // 2))
    seeds = row_seeds(B, 77)
    tok, lp = esamp.ops.reweight(logits, pred, W, beta=0.5, top_p=top_p, seed=seeds, step=2)
    rows = ref.reweight_details(logits, pred, W, beta=0.5, top_p=top_p, seed=seeds, step=2)
    for r in range(B):
        t1, l1 = esamp.ops.reweight(logits[r:r + 1], pred[r:r + 1], W, beta=0.5, top_p=float(top_p[r]),
                                    seed=seeds[r:r + 1], step=2)
        tol = float(rows[r]["m_tol"][rows[r]["mask"]].max())
        if rows[r]["key_gap"] > max(KEY_GAP, 2 * tol):
            assert int(t1) == int(tok[r])
        assert abs(float(l1) - float(lp[r])) <= 2 * tol + 1e-6


def test_beta_zero_equals_scaled_logits_exactly():
    B, V, H = 16, 1001, 577
    logits, pred, W, _ = make_problem(B, V, H, torch.bfloat16, torch.float32, seed=51)
    T = torch.linspace(0.3, 2.0, B)
    out = esamp.ops.reweight_logits(logits, pred, W, beta=0.0, temperature=T, top_p=0.95)
    z = (logits.float().numpy() / T.numpy()[:, None]).astype(np.float32)
    fin = torch.isfinite(out)
    assert bool(fin.any(dim=1).all())
    assert torch.equal(out[fin], torch.from_numpy(z)[fin])
    # NaN in W or pred cannot leak into beta = 0 rows: no dot product is computed for them.
    W2 = W.clone()
    W2[:, 0] = float("nan")
    out2 = esamp.ops.reweight_logits(logits, pred, W2, beta=0.0, temperature=T, top_p=0.95)
    assert torch.equal(out, out2)


def test_chi_square_against_mixed_distribution():
    """N = 20000 draws (fixed seed, step = 0..N-1) of one row with V = 12, min_p and top_k active, beta = 1.
    Frequencies are compared with softmax(m) over C by Pearson's chi-square test at significance 1e-3
    (deterministic: the seed is fixed).  Power check: the same counts must REJECT softmax(z) over C, the
    distribution without the distiller term, at the same level."""
    V, H, N = 12, 16, 20000
    g = torch.Generator().manual_seed(7)
    l = torch.tensor([[2.0, 1.7, 1.5, 1.2, 1.0, 0.8, 0.5, 0.2, -0.4, -1.2, -2.5, -4.0]])
    pred = torch.randn(1, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.4
    kw = dict(beta=1.0, min_p=0.1, top_k=7)
    rows = ref.reweight_details(l, pred, W, **kw)
    C, m = rows[0]["mask"], rows[0]["m"].astype(np.float64)
    assert rows[0]["margin"] > 1e-3 and 3 <= C.sum() <= 7
    seed = torch.full((N,), 424242, dtype=torch.int64)
    tok, lp = esamp.ops.reweight(l.expand(N, V), pred.expand(N, H), W, seed=seed, step=torch.arange(N), **kw)
    assert bool(torch.from_numpy(C)[tok].all()), "a sample left the candidate set"
    counts = np.bincount(tok.numpy(), minlength=V)[C]
    p = np.exp(m[C] - m[C].max())
    p /= p.sum()
    # The logprob of every sample is log p(token).
    assert np.allclose(lp.numpy(), np.log(p)[np.searchsorted(np.nonzero(C)[0], tok.numpy())], atol=1e-5)

    def chi2_pvalue(expected_p):
        exp = N * expected_p
        stat = float(((counts - exp) ** 2 / exp).sum())
        df = C.sum() - 1
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))

    assert chi2_pvalue(p) > 1e-3
    z = l[0].numpy().astype(np.float64)[C]
    q = np.exp(z - z.max())
    q /= q.sum()
    assert np.abs(p - q).max() > 0.02, "test setup: the mixed distribution should differ from softmax(z)"
    assert chi2_pvalue(q) < 1e-3


# ----------------------------------------------------------------------------------------------------
# Greedy rows, per-row parameters, bias
# ----------------------------------------------------------------------------------------------------
def test_greedy_rows_and_ties():
    V, H = 11, 5
    l = torch.tensor([[0.0, 3.0, 1.0, 3.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]]).repeat(3, 1)
    l[2, 1] = float("nan")  # NaN counts as -inf: the first tie is now at 3
    p = torch.randn(3, H)
    W = torch.randn(V, H)
    tok, lp = esamp.ops.reweight(l, p, W, temperature=0.0, top_p=0.5, seed=1)
    assert tok.tolist() == [1, 1, 3] and lp.tolist() == [0.0, 0.0, 0.0]
    out = esamp.ops.reweight_logits(l, p, W, temperature=0.0)
    want = torch.full((3, V), float("-inf"))
    want[0, 1] = want[1, 1] = want[2, 3] = 0.0
    assert torch.equal(out, want)


def test_mixed_greedy_batch_and_per_row_parameters():
    B, V, H = 10, 1001, 577
    logits, pred, W, bias = make_problem(B, V, H, torch.float16, torch.bfloat16, bias=True, seed=61)
    params = dict(beta=torch.tensor([0.0, 0.25, 1.0, 0.5, 0.25, 2.0, 0.0, 0.1, 0.3, 0.25]),
                  temperature=torch.tensor([1.0, 0.0, 0.7, 1.3, 0.0, 1.0, 0.5, 2.0, 1.0, 0.9]),
                  top_k=torch.tensor([0, 5, 50, -1, 0, 1001, 2000, 20, 3, 0]),
                  top_p=torch.tensor([1.0, 0.9, 0.8, 1.0, 0.5, 0.95, 0.99, 0.7, 1.0, 0.6]),
                  min_p=torch.tensor([0.0, 0.1, 0.0, 0.05, 0.0, 0.01, 0.2, 0.0, 0.0, 0.02]))
    seeds, steps = row_seeds(B, 31), torch.arange(B) + 2**33
    for b in (bias, None):
        tok, lp = esamp.ops.reweight(logits, pred, W, lm_head_bias=b, seed=seeds, step=steps, **params)
        out = esamp.ops.reweight_logits(logits, pred, W, lm_head_bias=b, **params)
        rows = ref.reweight_details(logits, pred, W, b, seed=seeds, step=steps, **params)
        greedy = params["temperature"] == 0
        assert torch.equal(tok[greedy], logits.float().argmax(dim=1)[greedy])
        assert bool((lp[greedy] == 0).all())
        assert compare_logits(out, rows) >= B - 1
        assert compare_tokens(tok, lp, rows) >= B - 2
    # The bias matters: with it, the mixed logits of beta != 0 rows change.
    with_b = esamp.ops.reweight_logits(logits, pred, W, lm_head_bias=bias, **params)
    without = esamp.ops.reweight_logits(logits, pred, W, **params)
    assert not torch.equal(with_b[2], without[2])


# ----------------------------------------------------------------------------------------------------
# Non-finite values (rules stated at the top of csrc/cpu/sampling_cpu.cpp)
# ----------------------------------------------------------------------------------------------------
def test_nonfinite_logits():
    V, H = 64, 8
    g = torch.Generator().manual_seed(9)
    l = torch.randn(4, V, generator=g) * 2
    l[0, :10] = float("nan")
    l[1, :] = float("-inf")
    l[1, 5] = float("nan")
    l[2, 7] = float("inf")
    l[3, ::2] = float("-inf")
    p = torch.randn(4, H, generator=g)
    W = torch.randn(V, H, generator=g) * 0.3
    seeds = row_seeds(4)
    for filt in (dict(), dict(top_p=0.9), dict(min_p=0.1, top_k=5)):
        tok, lp = esamp.ops.reweight(l, p, W, beta=0.25, seed=seeds, step=0, **filt)
        out = esamp.ops.reweight_logits(l, p, W, beta=0.25, **filt)
        assert not torch.isnan(out).any() and not torch.isnan(lp).any()
        assert bool(((tok >= 0) & (tok < V)).all())
        # NaN logits behave exactly like -inf logits.
        l0 = l[0:1].clone()
        l0[0, :10] = float("-inf")
        assert torch.equal(out[0:1], esamp.ops.reweight_logits(l0, p[0:1], W, beta=0.25, **filt))
        assert bool(torch.isinf(out[0, :10]).all())
        # No finite logit: token 0, logprob -inf, all -inf mixed logits.
        assert int(tok[1]) == 0 and lp[1] == float("-inf") and bool((out[1] == float("-inf")).all())
        # +inf is clamped to FLT_MAX before dividing by T: that token dominates and is sampled.
        assert int(tok[2]) == 7 and float(lp[2]) == 0.0
        # -inf logits are never candidates.
        assert bool(torch.isinf(out[3, ::2]).all()) and int(tok[3]) % 2 == 1
        rows = ref.reweight_details(l, p, W, beta=0.25, seed=seeds, step=0, **filt)
        assert compare_logits(out, rows) >= 3
        assert compare_tokens(tok, lp, rows) >= 2
    # Greedy rows with +inf / NaN: the clamped argmax rule.
    tok, lp = esamp.ops.reweight(l, p, W, temperature=0.0, seed=seeds)
    assert tok.tolist()[1:3] == [0, 7]


def test_nonfinite_weights_never_crash():
    V, H, B = 300, 16, 6
    g = torch.Generator().manual_seed(10)
    l = torch.randn(B, V, generator=g) * 2
    p = torch.randn(B, H, generator=g)
    W = torch.randn(V, H, generator=g)
    W[::3, 2] = float("nan")
    W[1::3, 4] = float("inf")
    p[0, 0] = float("inf")
    tok, lp = esamp.ops.reweight(l, p, W, beta=0.5, seed=1)
    out = esamp.ops.reweight_logits(l, p, W, beta=0.5)
    assert bool(((tok >= 0) & (tok < V)).all())
    assert not torch.isnan(out).any() and not torch.isnan(lp).any()


def test_extreme_temperatures_and_params():
    V, H, B = 97, 4, 5
    g = torch.Generator().manual_seed(12)
    l = torch.randn(B, V, generator=g) * 50
    p = torch.randn(B, H, generator=g)
    W = torch.randn(V, H, generator=g)
    T = torch.tensor([1e-30, 1e-6, 1e6, 3e38, 1.0])
    tok, lp = esamp.ops.reweight(l, p, W, temperature=T, beta=0.25, seed=3, top_p=0.3, min_p=0.5, top_k=1)
    assert bool(((tok >= 0) & (tok < V)).all()) and not torch.isnan(lp).any()
    # top_k = 1 keeps the argmax (and its ties) only; with a distinct maximum the token is the argmax.
    assert torch.equal(tok, l.argmax(dim=1))
    assert bool((lp == 0).all())


# ----------------------------------------------------------------------------------------------------
# Shapes, determinism, opcheck
# ----------------------------------------------------------------------------------------------------
def test_empty_batch_and_tiny_shapes():
    tok, lp = esamp.ops.reweight(torch.empty(0, 7), torch.empty(0, 3), torch.randn(7, 3), seed=0)
    assert tok.shape == (0,) and lp.shape == (0,) and tok.dtype == torch.int64
    out = esamp.ops.reweight_logits(torch.empty(0, 7), torch.empty(0, 3), torch.randn(7, 3))
    assert out.shape == (0, 7) and out.dtype == torch.float32
    # V = 1, H = 1: the only token, logprob 0; mixed logit = (1+b) l - b d.
    l, p, W = torch.tensor([[0.5]]), torch.tensor([[2.0]]), torch.tensor([[3.0]])
    for T in (0.0, 1.0, 0.5):
        tok, lp = esamp.ops.reweight(l, p, W, beta=0.25, temperature=T, top_p=0.3, top_k=1, min_p=0.5, seed=4)
        assert tok.tolist() == [0] and lp.tolist() == [0.0]
    out = esamp.ops.reweight_logits(l, p, W, beta=0.25, temperature=0.5)
    assert out.tolist() == [[((1.25 * 0.5) - 0.25 * 6.0) / 0.5]]


def test_determinism_and_thread_count_independence():
    B, V, H = 64, 5003, 96
    logits, pred, W, bias = make_problem(B, V, H, torch.bfloat16, torch.float32, bias=True, seed=71)
    kw = dict(lm_head_bias=bias, beta=0.25, top_p=torch.tensor([0.9, 1.0] * (B // 2)), seed=row_seeds(B), step=9)
    a = esamp.ops.reweight(logits, pred, W, **kw)
    b = esamp.ops.reweight(logits, pred, W, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = esamp.ops.reweight(logits, pred, W, **kw)
        one_m = esamp.ops.reweight_logits(logits, pred, W, lm_head_bias=bias, beta=0.25, top_p=kw["top_p"])
        torch.set_num_threads(2)
        two = esamp.ops.reweight(logits, pred, W, **kw)
        two_m = esamp.ops.reweight_logits(logits, pred, W, lm_head_bias=bias, beta=0.25, top_p=kw["top_p"])
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one_m, two_m)
    # An int seed expands to distinct per-row seeds: identical rows get (almost surely) different tokens.
    l1 = torch.zeros(64, 50)
    t, _ = esamp.ops.reweight(l1, torch.zeros(64, 1), torch.zeros(50, 1), beta=0.0, seed=5)
    assert len(set(t.tolist())) > 20


def _op_args(B=3, V=13, H=5, bias=True, seed=True):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(B, V, generator=g), torch.randn(B, H, generator=g), torch.randn(V, H, generator=g),
            torch.randn(V, generator=g) if bias else None, torch.full((B,), 0.25), torch.tensor([1.0, 0.0, 0.7])[:B],
            torch.tensor([0, 3, 5])[:B], torch.tensor([0.9, 1.0, 0.5])[:B], torch.tensor([0.0, 0.1, 0.05])[:B]]
    if seed:
        args += [torch.arange(B, dtype=torch.int64) + 11, torch.full((B,), 4, dtype=torch.int64)]
    return args


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    torch.library.opcheck(ops.reweight.default, _op_args(bias=bias))
    torch.library.opcheck(ops.reweight_logits.default, _op_args(bias=bias, seed=False))


# ----------------------------------------------------------------------------------------------------
# Bad input (SPEC 5): error type and the argument named in the message
# ----------------------------------------------------------------------------------------------------
def _good():
    g = torch.Generator().manual_seed(1)
    return dict(logits=torch.randn(3, 10, generator=g), pred=torch.randn(3, 4, generator=g),
                W=torch.randn(10, 4, generator=g))


def _call(logits=None, pred=None, W=None, **kw):
    d = _good()
    return esamp.ops.reweight(d["logits"] if logits is None else logits, d["pred"] if pred is None else pred,
                              d["W"] if W is None else W, **kw)


BAD = [
    ("logits rank", lambda: _call(logits=torch.randn(10)), (ValueError, RuntimeError), "logits"),
    ("pred rank", lambda: _call(pred=torch.randn(3, 4, 1)), RuntimeError, "pred_hidden"),
    ("V mismatch", lambda: _call(W=torch.randn(11, 4)), RuntimeError, "lm_head_weight"),
    ("H mismatch", lambda: _call(W=torch.randn(10, 5)), RuntimeError, "lm_head_weight"),
    ("B mismatch", lambda: _call(pred=torch.randn(2, 4)), RuntimeError, "pred_hidden"),
    ("bias shape", lambda: _call(lm_head_bias=torch.randn(9)), RuntimeError, "lm_head_bias"),
    ("int logits", lambda: _call(logits=torch.ones(3, 10, dtype=torch.int32)), RuntimeError, "logits"),
    ("float64 W", lambda: _call(W=torch.randn(10, 4, dtype=torch.float64)), RuntimeError, "lm_head_weight"),
    ("float seed", lambda: _call(seed=1.5), TypeError, "seed"),
    ("float seed tensor", lambda: _call(seed=torch.tensor([1.0, 2.0, 3.0])), TypeError, "seed"),
    ("float step", lambda: _call(step=0.5), TypeError, "step"),
    ("top_p 0", lambda: _call(top_p=0.0), ValueError, "top_p"),
    ("top_p 1.5", lambda: _call(top_p=1.5), ValueError, "top_p"),
    ("top_p tensor 0", lambda: _call(top_p=torch.tensor([0.5, 0.0, 1.0])), RuntimeError, "top_p"),
    ("negative temperature", lambda: _call(temperature=-0.5), ValueError, "temperature"),
    ("temperature tensor negative", lambda: _call(temperature=torch.tensor([1.0, -1.0, 1.0])), RuntimeError,
     "temperature"),
    ("nan temperature", lambda: _call(temperature=float("nan")), ValueError, "temperature"),
    ("negative beta", lambda: _call(beta=-0.1), ValueError, "beta"),
    ("beta tensor negative", lambda: _call(beta=torch.tensor([0.1, -0.1, 0.0])), RuntimeError, "beta"),
    ("min_p 1.0", lambda: _call(min_p=1.0), ValueError, "min_p"),
    ("min_p negative", lambda: _call(min_p=-0.1), ValueError, "min_p"),
    ("per-row length", lambda: _call(top_k=torch.tensor([1, 2])), ValueError, "top_k"),
    ("per-row length (op)", lambda: ops.reweight(*_op_args()[:6], torch.tensor([1, 2]), *_op_args()[7:]),
     RuntimeError, "top_k"),
    ("top_k float tensor (op)", lambda: ops.reweight(*_op_args()[:6], torch.tensor([1.0, 2.0, 3.0]),
                                                     *_op_args()[7:]), RuntimeError, "top_k"),
    ("seed float tensor (op)", lambda: ops.reweight(*_op_args()[:9], torch.zeros(3), _op_args()[10]),
     RuntimeError, "seed"),
    ("transposed logits", lambda: _call(logits=torch.randn(10, 3).t()), RuntimeError, "logits"),
    ("transposed W", lambda: _call(W=torch.randn(4, 10).t()), RuntimeError, "lm_head_weight"),
    ("not a tensor", lambda: _call(logits=[[1.0, 2.0]]), TypeError, "logits"),
]


@pytest.mark.parametrize("name,fn,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, fn, exc, arg):
    with pytest.raises(exc) as e:
        fn()
    assert arg in str(e.value), f"message does not name {arg!r}: {e.value}"


def test_bad_input_wrong_device():
    if not torch.cuda.is_available() or not esamp.ops.has_cuda_kernels():
        pytest.skip("needs a GPU and the CUDA kernels")
    d = _good()
    with pytest.raises((RuntimeError, ValueError)) as e:
        esamp.ops.reweight(d["logits"].cuda(), d["pred"].cuda(), d["W"], seed=0)
    assert "lm_head_weight" in str(e.value)


def test_reweight_logits_bad_input():
    d = _good()
    with pytest.raises(ValueError, match="top_p"):
        esamp.ops.reweight_logits(d["logits"], d["pred"], d["W"], top_p=0.0)
    with pytest.raises(RuntimeError, match="lm_head_weight"):
        esamp.ops.reweight_logits(d["logits"], d["pred"], torch.randn(10, 5))


# ----------------------------------------------------------------------------------------------------
# Storage conversions over every bit pattern, and the benchmark baseline
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=DNAME.get)
def test_every_16bit_logit_pattern(dt):
    # All 65536 bit patterns as one row of logits (beta = 0, T = 1, no filter): the mixed logits are the
    # exact float32 values (subnormals included), NaN -> -inf (not a candidate), +inf -> FLT_MAX.
    l = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dt)[None, :]
    out = esamp.ops.reweight_logits(l, torch.zeros(1, 1), torch.zeros(l.shape[1], 1, dtype=dt), beta=0.0)
    want = l.float()
    want = torch.where(torch.isnan(want), torch.tensor(float("-inf")), want)
    want = torch.where(want == float("inf"), torch.tensor(torch.finfo(torch.float32).max), want)
    assert torch.equal(out, want)
    # Same patterns through the weight path: W = the patterns as one column, pred = 1, beta = 1, l = 0:
    # m_c = -d_c = -W_c exactly for every finite W_c.
    V = l.shape[1]
    W = l.reshape(V, 1)
    fin = torch.isfinite(W.float())[:, 0]
    for dense in (False, True):
        # no filter -> |C| = V -> dense GEMM path (W converted in chunks); top_k = V/8 -> sparse dot products
        kw = dict() if dense else dict(top_k=V // 8)
        lz = torch.zeros(1, V) if dense else torch.arange(V, dtype=torch.float32)[None, :] * 1e-3
        out = esamp.ops.reweight_logits(lz, torch.ones(1, 1), W, beta=1.0, **kw)
        cand = torch.isfinite(out[0]) & fin
        assert int(cand.sum()) > (V // 10 if not dense else V // 2)
        want = (2 * lz[0] - W[:, 0].float())
        assert torch.equal(out[0][cand], want[cand])


def test_eager_baseline_samples_the_same_distribution():
    # reweight_eager (the benchmark baseline) uses torch.rand noise, so its tokens differ from the kernels';
    # but every token must lie in the reference candidate set and its logprob must be log softmax(m)[token].
    B, V, H = 16, 1001, 64
    logits, pred, W, bias = make_problem(B, V, H, seed=81)
    full = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt)  # noqa: E731
    T = torch.tensor([1.0, 0.0, 0.7, 1.5] * 4)
    for filt in FILTERS:
        params = dict(beta=full(0.25), temperature=T, top_k=full(filt.get("top_k", 0), torch.int64),
                      top_p=full(filt.get("top_p", 1.0)), min_p=full(filt.get("min_p", 0.0)))
        tok, lp = ref.reweight_eager(logits, pred, W, bias, params["beta"], params["temperature"], params["top_k"],
                                     params["top_p"], params["min_p"], generator=torch.Generator().manual_seed(1))
        rows = ref.reweight_details(logits, pred, W, bias, **params)
        for r, row in enumerate(rows):
            if row["margin"] < MARGIN:
                continue
            assert row["mask"][int(tok[r])]
            m = row["m"][row["mask"]].astype(np.float64)
            want = 0.0 if row["greedy"] else float(row["m"][int(tok[r])]) - (m.max() + math.log(np.exp(m - m.max()).sum()))
            assert abs(float(lp[r]) - want) < 1e-4
