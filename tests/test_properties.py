"""Property-based tests (hypothesis) of the esamp operators against the plain-PyTorch references
(python/esamp/reference/sampling.py and python/esamp/reference/distiller.py).

Every example draws a whole problem (shapes, storage dtypes, layouts, per-row parameters, the kind of logits:
Gaussian, LM-like head, many exact ties, NaN/+-inf entries) and checks the operator against the reference.
The tolerances are those of tests/test_reweight.py and tests/test_distiller.py (the bounds are explained
there):

* reweight_logits: candidate sets exactly; m within the reference's per-element bound ``m_tol`` (float32
  accumulation of the distiller dot product), bit-exact for beta = 0 and greedy rows.
* reweight: tokens exactly, logprobs within 2 max(m_tol) + 1e-6 + 2^-22 |logprob|.
* mix_hidden: one rounding of the output dtype plus three float32 roundings.
* distiller_forward: rtol/atol 2e-5 (float32 out), one unit in the last place (bf16 / fp16 out).
* distiller_train_step: losses rtol 1e-5; params rtol 1e-4 + atol 1e-6; Adam moments rtol 1e-4 +
  atol 1e-5 max|ref|; step counters, row counters and idle slots exact.

Exact equality is only defined away from decision boundaries.  As in tests/test_reweight.py, an example is
rejected (``assume``) when a row has a value within 1e-5 (relative) of a filter threshold (the reference's
``margin``), when the two best perturbed scores of a sampled row are closer than max(1e-4, 2 m_tol)
(``key_gap``), or, for train steps, when a slot's gradient norm lies within 0.1 % of the clip threshold.
Properties that hold everywhere (tokens in [0, V), no NaN, greedy rows, beta = 0 exactness, counters) are
asserted before any ``assume``.

``derandomize=True`` makes every run draw the same examples (reproducible CI); the example counts are
sized so that the whole file runs in well under a minute on two cores.
"""
import math

import numpy as np
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import esamp
from esamp.reference import distiller as dref
from esamp.reference import sampling as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MARGIN = 1e-5
KEY_GAP = 1e-4
FLT_MAX = float(np.finfo(np.float32).max)


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------------------
# Problem generators
# ---------------------------------------------------------------------------------------------------------
def _logits(kind, B, V, scale, rng):
    if kind == "ties":  # few distinct values: exact ties everywhere (argmax, top-k boundary, top-p)
        return rng.integers(-3, 4, size=(B, V)).astype(np.float32) * np.float32(scale / 3)
    l = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    if kind == "lm":  # Zipf-shaped head on up to 32 tokens over a Gaussian background
        for r in range(B):
            head = rng.permutation(V)[: min(32, V)]
            l[r, head] = 8.0 + 4 * rng.random() - 1.5 * np.log(np.arange(1, head.shape[0] + 1))
    elif kind == "nonfinite":
        u = rng.random((B, V))
        l[u < 0.15] = -np.inf
        l[(u >= 0.15) & (u < 0.25)] = np.nan
        if rng.random() < 0.3:
            l[rng.integers(B), rng.integers(V)] = np.inf
        if rng.random() < 0.3:
            l[rng.integers(B)] = -np.inf if rng.random() < 0.5 else np.nan
    return l


def _t(a: np.ndarray) -> torch.Tensor:
    """torch tensor of a float32/int64 numpy array.  An empty array gets the usual row-major strides: torch.from_numpy
    gives an empty [0, H] array strides (0, 0), which the operators reject (see test_empty_batch_any_strides)."""
    return torch.from_numpy(a) if a.size else torch.empty(a.shape, dtype=torch.from_numpy(a).dtype)


def _place(a: torch.Tensor, dtype, padded: bool) -> torch.Tensor:
    """a in dtype; with padded, a view whose row stride exceeds its width (a non-contiguous layout)."""
    if not padded:
        return a.to(dtype)
    big = torch.zeros(a.shape[0], a.shape[1] + 3, dtype=dtype)
    big[:, : a.shape[1]] = a.to(dtype)
    return big[:, : a.shape[1]]


@st.composite
def reweight_problems(draw, max_B=4, dense=False):
    """One reweight problem.  dense=True: V >= 1024 and no filter, so rows with beta > 0 take the kernel's
    dense path (distiller logits of the whole vocabulary from one GEMM)."""
    B = draw(st.integers(1, max_B))
    if dense:
        V = draw(st.sampled_from([1024, 1031, 1500, 2053]))
    else:
        V = draw(st.one_of(st.integers(1, 96), st.sampled_from([257, 1031, 1500])))
    H = draw(st.integers(1, 40))
    ldt, pdt, wdt = (draw(st.sampled_from(DTYPES)) for _ in range(3))
    kind = draw(st.sampled_from(["normal", "lm", "ties", "nonfinite"]))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 20.0]))
    padded = draw(st.booleans())
    bias = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    l = _t(_logits(kind, B, V, scale, rng))
    p = _t(rng.standard_normal((B, H)).astype(np.float32))
    W = _t((rng.standard_normal((V, H)) * draw(st.sampled_from([0.1, 1.0, 4.0])) / math.sqrt(H))
                         .astype(np.float32))
    b = _t((rng.standard_normal(V) * 0.5).astype(np.float32)).to(wdt) if bias else None

    def rows(strategy):
        return draw(st.lists(strategy, min_size=B, max_size=B))

    # A quarter of the problems (half of those with V >= 1024): no filter on any row, so that rows with
    # beta > 0 take the dense GEMM path of the kernel.
    unfiltered = dense or draw(st.integers(0, 3)) == 0 or (V >= 1024 and draw(st.booleans()))
    params = dict(
        beta=torch.tensor(rows(st.one_of(st.just(0.0), st.floats(0.0, 3.0))), dtype=torch.float32),
        temperature=torch.tensor(rows(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.05, 4.0))),
                                 dtype=torch.float32),
        top_k=torch.tensor(rows(st.one_of(st.just(0), st.integers(-2, V + 2))), dtype=torch.int64),
        top_p=torch.tensor(rows(st.one_of(st.just(1.0), st.floats(0.01, 1.0))), dtype=torch.float32),
        min_p=torch.tensor(rows(st.one_of(st.just(0.0), st.floats(0.0, 0.9))), dtype=torch.float32),
    )
    if unfiltered:
        params.update(top_k=torch.zeros(B, dtype=torch.int64), top_p=torch.ones(B), min_p=torch.zeros(B))
    seeds = torch.tensor(rows(st.integers(-(2**63), 2**63 - 1)), dtype=torch.int64)
    steps = torch.tensor(rows(st.integers(-(2**63), 2**63 - 1)), dtype=torch.int64)
    dense_rows = V >= 1024 and bool(((params["beta"] > 0) & (params["temperature"] > 0) & (params["top_k"] <= 0)
                                & (params["top_p"] == 1) & (params["min_p"] == 0)).any())
    event(f"logits={kind}")
    event(f"V>=1024 with an unfiltered beta>0 row (dense GEMM path)={dense_rows}")
    note(f"B={B} V={V} H={H} dtypes={ldt},{pdt},{wdt} kind={kind} scale={scale} padded={padded} bias={bias} "
         f"params={params}")
    return (_place(l, ldt, padded), _place(p, pdt, padded), _place(W, wdt, padded), b, params, seeds, steps)


def _greedy_token(l_row: torch.Tensor) -> int:
    """SPEC 3.1 with the documented non-finite rules: NaN counts as -inf, +inf as FLT_MAX, smallest id on ties."""
    a = l_row.float().numpy()
    a = np.where(np.isnan(a), -np.inf, np.minimum(a, FLT_MAX))
    return int(np.argmax(a))


# ---------------------------------------------------------------------------------------------------------
# reweight_logits / reweight
# ---------------------------------------------------------------------------------------------------------
@_settings(100)
@given(reweight_problems())
def test_reweight_logits_property(problem):
    _check_reweight_logits(problem)


@_settings(100)
@given(reweight_problems())
def test_reweight_tokens_property(problem):
    _check_reweight_tokens(problem)


@_settings(25)
@given(reweight_problems(dense=True))
def test_dense_path_property(problem):
    _check_reweight_logits(problem)
    _check_reweight_tokens(problem)


def _check_reweight_logits(problem):
    l, p, W, b, params, _, _ = problem
    B, V = l.shape
    out = esamp.ops.reweight_logits(l, p, W, lm_head_bias=b, **params)
    # Everywhere: shape, dtype, no NaN, greedy rows hold exactly one 0 at the greedy token.
    assert out.shape == (B, V) and out.dtype == torch.float32
    assert not torch.isnan(out).any()
    for r in range(B):
        if params["temperature"][r] == 0:
            want = torch.full((V,), float("-inf"))
            want[_greedy_token(l[r])] = 0.0
            assert torch.equal(out[r], want), f"row {r}: greedy row"
    rows = ref.reweight_details(l, p, W, b, **params)
    assume(all(row["margin"] >= MARGIN for row in rows))
    for r, row in enumerate(rows):
        o = out[r].numpy()
        got = np.isfinite(o)
        assert np.array_equal(got, row["mask"]), (
            f"row {r}: candidate sets differ: kernel-only {np.nonzero(got & ~row['mask'])[0][:10]}, "
            f"reference-only {np.nonzero(row['mask'] & ~got)[0][:10]}")
        assert np.all(o[~got] == -np.inf)
        m = row["m"][got]
        if params["beta"][r] == 0 or row["greedy"]:
            assert np.array_equal(o[got], m), f"row {r}: beta = 0 / greedy must be exact"
        else:
            err = np.abs(o[got].astype(np.float64) - m.astype(np.float64))
            tol = row["m_tol"][got]
            assert (err <= tol).all(), f"row {r}: |m - ref| {err[err > tol][:5]} > tol {tol[err > tol][:5]}"


def _check_reweight_tokens(problem):
    l, p, W, b, params, seeds, steps = problem
    B, V = l.shape
    tok, lp = esamp.ops.reweight(l, p, W, lm_head_bias=b, seed=seeds, step=steps, **params)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and tok.shape == lp.shape == (B,)
    assert bool(((tok >= 0) & (tok < V)).all()), tok
    assert not torch.isnan(lp).any() and bool((lp <= 0).all()), lp
    for r in range(B):
        if params["temperature"][r] == 0:
            assert int(tok[r]) == _greedy_token(l[r]) and float(lp[r]) == 0.0, f"row {r}: greedy"
    # Same call, same result (no hidden state).
    tok2, lp2 = esamp.ops.reweight(l, p, W, lm_head_bias=b, seed=seeds, step=steps, **params)
    assert torch.equal(tok, tok2) and torch.equal(lp, lp2)
    rows = ref.reweight_details(l, p, W, b, seed=seeds, step=steps, **params)
    tols = [float(row["m_tol"][row["mask"]].max()) if row["mask"].any() else 0.0 for row in rows]
    assume(all(row["margin"] >= MARGIN and row["key_gap"] > max(KEY_GAP, 2 * t) for row, t in zip(rows, tols)))
    for r, (row, tol) in enumerate(zip(rows, tols)):
        assert int(tok[r]) == row["token"], f"row {r}: token {int(tok[r])} != reference {row['token']}"
        if row["logprob"] == -math.inf:
            assert float(lp[r]) == -math.inf
        else:
            lp_tol = 2 * tol + 1e-6 + 2.0 ** -22 * abs(row["logprob"])
            assert abs(float(lp[r]) - row["logprob"]) <= lp_tol, (r, float(lp[r]), row["logprob"], lp_tol)


@_settings(60)
@given(reweight_problems())
def test_reweight_samples_reweight_logits_with_spec_noise(problem):
    """Cross-op property, independent of the reference's candidate set: the token of reweight is the argmax of
    reweight_logits' m plus the SPEC 4 Gumbel noise of (seed, step, v), and its logprob is log softmax(m)."""
    l, p, W, b, params, seeds, steps = problem
    B, V = l.shape
    tok, lp = esamp.ops.reweight(l, p, W, lm_head_bias=b, seed=seeds, step=steps, **params)
    m = esamp.ops.reweight_logits(l, p, W, lm_head_bias=b, **params).double().numpy()
    rows = ref.reweight_details(l, p, W, b, **params)  # only for the m tolerance of each row
    checked = []
    for r in range(B):
        fin = np.isfinite(m[r])
        if params["temperature"][r] == 0 or not fin.any():
            continue
        assert fin[int(tok[r])], f"row {r}: token {int(tok[r])} has m = -inf"
        idx = np.nonzero(fin)[0]
        keys = m[r, idx] + ref.gumbel_noise(int(seeds[r]), int(steps[r]), idx).astype(np.float64)
        tol = float(rows[r]["m_tol"][rows[r]["mask"]].max()) if rows[r]["mask"].any() else 0.0
        srt = np.sort(keys)[::-1]
        gap = srt[0] - srt[1] if srt.shape[0] > 1 else math.inf
        checked.append((r, idx[int(np.argmax(keys))], gap, tol))
        mx = m[r, idx].max()
        want_lp = m[r, int(tok[r])] - (mx + math.log(np.exp(m[r, idx] - mx).sum()))
        assert abs(float(lp[r]) - want_lp) <= 2 * tol + 1e-6 + 2.0 ** -22 * abs(want_lp), (r, float(lp[r]), want_lp)
    assume(all(gap > max(KEY_GAP, 4 * tol) for _, _, gap, tol in checked))
    for r, want, _, _ in checked:
        assert int(tok[r]) == int(want), f"row {r}: token {int(tok[r])} != argmax(m + g) = {want}"


@_settings(40)
@given(reweight_problems(), st.sampled_from(["nan", "inf", "garbage"]))
def test_beta_zero_ignores_the_distiller(problem, poison):
    """beta = 0 rows never read pred_hidden / W / bias: poisoning them changes nothing (bit-exact)."""
    l, p, W, b, params, seeds, steps = problem
    params = dict(params, beta=torch.zeros_like(params["beta"]))
    def poisoned(t):
        fill = {"nan": float("nan"), "inf": float("inf"), "garbage": torch.finfo(t.dtype).max}[poison]
        return torch.full_like(t, fill)

    p2, W2 = poisoned(p), poisoned(W)
    b2 = None if b is None else poisoned(b)
    a = esamp.ops.reweight_logits(l, p, W, lm_head_bias=b, **params)
    c = esamp.ops.reweight_logits(l, p2, W2, lm_head_bias=b2, **params)
    assert torch.equal(a, c)
    t1 = esamp.ops.reweight(l, p, W, lm_head_bias=b, seed=seeds, step=steps, **params)
    t2 = esamp.ops.reweight(l, p2, W2, lm_head_bias=b2, seed=seeds, step=steps, **params)
    assert torch.equal(t1[0], t2[0]) and torch.equal(t1[1], t2[1])


@_settings(60)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**32 - 1), st.booleans())
def test_greedy_tie_break_and_nonfinite(B, V, data_seed, nonfinite):
    """T = 0 rows: the smallest id among the maxima (NaN = -inf, +inf = FLT_MAX), logprob 0, whatever the
    filters and beta; drawn from a handful of values so that ties are the rule."""
    rng = np.random.default_rng(data_seed)
    l = rng.integers(-2, 3, size=(B, V)).astype(np.float32)
    if nonfinite:
        u = rng.random((B, V))
        l[u < 0.2] = np.nan
        l[(u >= 0.2) & (u < 0.3)] = -np.inf
        l[(u >= 0.3) & (u < 0.33)] = np.inf
    l = _t(l)
    p = _t(rng.standard_normal((B, 3)).astype(np.float32))
    W = _t(rng.standard_normal((V, 3)).astype(np.float32))
    tok, lp = esamp.ops.reweight(l, p, W, temperature=0.0, beta=float(rng.random() * 2), top_k=int(rng.integers(0, 4)),
                                 top_p=float(rng.random() * 0.9 + 0.1), seed=data_seed)
    assert tok.tolist() == [_greedy_token(l[r]) for r in range(B)]
    assert lp.tolist() == [0.0] * B


# ---------------------------------------------------------------------------------------------------------
# mix_hidden
# ---------------------------------------------------------------------------------------------------------
@_settings(100)
@given(st.integers(0, 9), st.integers(1, 700), st.sampled_from(DTYPES), st.sampled_from(DTYPES),
       st.booleans(), st.sampled_from([1e-3, 1.0, 1e3]), st.integers(0, 2**32 - 1),
       st.one_of(st.floats(0.0, 4.0), st.just("rows")))
def test_mix_hidden_property(B, H, hdt, pdt, padded, scale, data_seed, beta):
    rng = np.random.default_rng(data_seed)
    h = _place(_t((rng.standard_normal((B, H)) * scale).astype(np.float32)), hdt, padded)
    t = _place(_t((rng.standard_normal((B, H)) * scale).astype(np.float32)), pdt, padded)
    if beta == "rows":
        beta = _t((rng.random(B) * 3).astype(np.float32))
        if B:
            beta[0] = 0.0
    out = esamp.ops.mix_hidden(h, t, beta=beta)
    assert out.dtype == hdt and out.shape == (B, H) and out.is_contiguous()
    want = ref.mix_hidden(h, t, beta)
    bt = torch.as_tensor(beta, dtype=torch.float32)
    bt = bt[:, None] if bt.dim() == 1 else bt
    fscale = ((1 + bt) * h.float()).abs() + (bt * t.float()).abs()
    tol = torch.finfo(hdt).eps * want.float().abs() + 3 * 2.0 ** -24 * fscale
    err = (out.float() - want.float()).abs()
    assert bool((err <= tol).all()), f"max err {float(err.max()) if err.numel() else 0}"
    zero_rows = (bt.reshape(-1).expand(B) == 0) if B else torch.zeros(0, dtype=torch.bool)
    assert torch.equal(out[zero_rows], h[zero_rows].contiguous()), "beta = 0 must return hidden unchanged"


# ---------------------------------------------------------------------------------------------------------
# Distiller ops
# ---------------------------------------------------------------------------------------------------------
FWD_TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-5),
           torch.float16: dict(rtol=2.0 ** -10, atol=1e-5)}


def _randomise(d: esamp.Distiller, rng, scale: float) -> None:
    """Distinct non-trivial parameters for every slot (fresh slots have B = 0: identity blocks)."""
    H, R, L = d.hidden_size, d.rank, d.layers
    for s in range(d.slots):
        f = lambda *shape: _t(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
        d.load_slot_state_dict(s, {"A": f(L, H, R) * scale * 4 / math.sqrt(H), "G": f(L, H, R) * scale * 4 / math.sqrt(H),
                                   "c": 1.0 + 0.5 * f(L, R), "B": f(L, R, H) * scale, "gamma": 1.0 + 0.2 * f(H)})


@st.composite
def banks(draw, max_H=64, min_H=1):
    H = draw(st.integers(min_H, max_H))
    R = draw(st.integers(1, 8))
    L = draw(st.integers(1, 3))
    S = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    note(f"H={H} R={R} L={L} S={S}")
    return H, R, L, S, rng


def _state(d):
    return [t.clone() for t in (d.params, d.exp_avg, d.exp_avg_sq, d.step, d.counters)]


@_settings(60)
@given(banks(max_H=96), st.integers(0, 13), st.sampled_from(DTYPES), st.sampled_from([None] + DTYPES),
       st.sampled_from([0.05, 0.15, 0.4]), st.booleans())
def test_distiller_forward_property(bank, N, xdt, out_dtype, scale, strided):
    H, R, L, S, rng = bank
    d = esamp.Distiller(H, R, L, S)
    _randomise(d, rng, scale)
    if strided:  # rows of a wider tensor: row stride H + 3, last dimension dense
        big = _t(rng.standard_normal((N, H + 3)).astype(np.float32) * 2).to(xdt)
        x = big[:, 1:1 + H]
        assert N < 2 or not x.is_contiguous()
    else:
        x = _t(rng.standard_normal((N, H)).astype(np.float32) * 2).to(xdt)
    sid = _t(rng.integers(0, S, N))
    y = d.forward(x, sid, out_dtype=out_dtype)
    od = out_dtype or xdt
    assert y.dtype == od and y.shape == (N, H)
    want = dref.forward_bank(d.params, x, sid, H, R, L, out_dtype=torch.float64)
    torch.testing.assert_close(y, want.to(od), **FWD_TOL[od])


@_settings(40)
@given(banks(min_H=2, max_H=48), st.integers(1, 3), st.sampled_from(DTYPES), st.sampled_from([4e-4, 3e-3, 1e-2]),
       st.sampled_from([0.0, 0.5, 5.0]), st.booleans(), st.floats(0.0, 0.4), st.sampled_from([0.3, 1.0, 5.0]))
def test_distiller_train_step_property(bank, n_steps, xdt, lr, clip, randomised, bad_frac, t_scale):
    H, R, L, S, rng = bank
    d = esamp.Distiller(H, R, L, S, lr=lr, clip=clip, seed=int(rng.integers(0, 2**31)))
    if randomised:
        _randomise(d, rng, 0.05)
    rb = dref.ReferenceBank(d.params, H, R, L, lr=lr, betas=(0.9, 0.999), eps=1e-4, clip=clip)
    trained = skipped = 0
    near_clip = False
    for _ in range(n_steps):
        N = int(rng.integers(0, 11))
        sid = _t(rng.integers(0, S, N))
        x = _t(rng.standard_normal((N, H)).astype(np.float32)).to(xdt)
        t = _t((rng.standard_normal((N, H)) * t_scale).astype(np.float32)).to(xdt)
        bad = _t(rng.random(N) < bad_frac)
        for i in torch.nonzero(bad)[:, 0].tolist():
            tgt = x if rng.random() < 0.5 else t
            tgt[i, int(rng.integers(H))] = [float("nan"), float("inf"), float("-inf")][int(rng.integers(3))]
        before = _state(d)
        losses = d.train_step(x, t, sid)
        want = rb.train_step(x, t, sid)
        good_rows = sid[~bad]
        active = set(good_rows.tolist())
        trained += int((~bad).sum())
        skipped += int(bad.sum())
        # Exact everywhere: idle slots (no finite row) are untouched and report NaN; counters count rows.
        assert losses.shape == (S,) and losses.dtype == torch.float32
        for s in range(S):
            if s not in active:
                assert math.isnan(float(losses[s]))
                for a, bb in zip(_state(d)[:4], before[:4]):
                    assert torch.equal(a[s], bb[s]), f"idle slot {s} changed"
        assert d.stats()["rows_trained"] == trained and d.stats()["rows_skipped"] == skipped
        assert torch.equal(d.step, rb.steps())
        for tsr in (d.params, d.exp_avg, d.exp_avg_sq):
            assert torch.isfinite(tsr).all()
        torch.testing.assert_close(losses.double(), want, rtol=1e-5, atol=0, equal_nan=True)
        if clip > 0:
            near_clip |= any(abs(rb.last_norms[s] / clip - 1) <= 1e-3 for s in active)
    assume(not near_clip)
    torch.testing.assert_close(d.params.double(), rb.params(), rtol=1e-4, atol=1e-6)
    for mine, theirs in ((d.exp_avg, rb.exp_avg()), (d.exp_avg_sq, rb.exp_avg_sq())):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5 * max(theirs.abs().max().item(), 1e-30))


@_settings(30)
@given(banks(max_H=48), st.lists(st.integers(0, 3), min_size=0, max_size=6), st.integers(0, 2**40))
def test_distiller_reset_property(bank, reset_ids, seed):
    """reset(ids) makes exactly those slots bit-identical to a fresh bank (parameters, Adam state, step) and
    leaves every other slot bit-identical to before; duplicate ids are allowed."""
    H, R, L, S, rng = bank
    reset_ids = [i % S for i in reset_ids]
    gamma = _t(1 + 0.1 * rng.standard_normal(H).astype(np.float32)) if rng.random() < 0.5 else None
    d = esamp.Distiller(H, R, L, S, seed=seed, gamma_init=gamma)
    fresh = esamp.Distiller(H, R, L, S, seed=seed, gamma_init=gamma)
    for _ in range(2):
        N = 2 * S
        d.train_step(_t(rng.standard_normal((N, H)).astype(np.float32)),
                     _t(rng.standard_normal((N, H)).astype(np.float32)), torch.arange(N) % S)
    before = _state(d)
    d.reset(reset_ids)
    after, want = _state(d), _state(fresh)
    for s in range(S):
        src = want if s in reset_ids else before
        for name, a, b in zip(("params", "exp_avg", "exp_avg_sq", "step"), after[:4], src[:4]):
            assert torch.equal(a[s], b[s]), f"slot {s} ({'reset' if s in reset_ids else 'kept'}): {name}"
    # The initial parameters follow the documented rule (reference.distiller.init_slot).
    torch.testing.assert_close(fresh.params[0].double(), dref.init_slot(H, R, L, seed=seed, gamma_init=gamma),
                               rtol=0, atol=1e-7)


@_settings(30)
@given(banks(max_H=48), st.integers(0, 3), st.integers(0, 3))
def test_slot_state_dict_round_trip_property(bank, src, dst):
    H, R, L, S, rng = bank
    src, dst = src % S, dst % S
    a = esamp.Distiller(H, R, L, S)
    _randomise(a, rng, 0.15)
    b = esamp.Distiller(H, R, L, S, seed=1)
    N = 3
    b.train_step(_t(rng.standard_normal((N, H)).astype(np.float32)),
                 _t(rng.standard_normal((N, H)).astype(np.float32)), torch.full((N,), dst))
    sd = a.slot_state_dict(src)
    b.load_slot_state_dict(dst, sd)
    back = b.slot_state_dict(dst)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert torch.equal(b.params[dst], a.params[src])
    assert (b.exp_avg[dst] == 0).all() and (b.exp_avg_sq[dst] == 0).all() and int(b.step[dst]) == 0
    x = _t(rng.standard_normal((4, H)).astype(np.float32))
    assert torch.equal(b.forward(x, [dst] * 4), a.forward(x, [src] * 4))


# ---------------------------------------------------------------------------------------------------------
# Empty batches
# ---------------------------------------------------------------------------------------------------------
@_settings(20)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 12), st.integers(0, 3))
def test_empty_batch_any_strides(V, H, row_stride, col_stride):
    """An empty batch is valid input and gives an empty result (issue 7), whatever the strides of the empty
    tensors: torch calls every tensor with no element contiguous, and common constructors make such strides
    (torch.from_numpy / torch.tensor of an empty numpy array give [0, H] tensors the strides (0, 0))."""
    def empty(n_cols):
        t = torch.empty_strided((0, n_cols), (row_stride, col_stride))
        assert t.is_contiguous() and t.contiguous().stride() == t.stride()  # .contiguous() cannot help
        return t

    W = torch.randn(V, H)
    tok, lp = esamp.ops.reweight(empty(V), empty(H), W, seed=0)
    assert tok.shape == (0,) and lp.shape == (0,)
    assert esamp.ops.reweight_logits(empty(V), empty(H), W).shape == (0, V)
    assert esamp.ops.mix_hidden(empty(H), empty(H)).shape == (0, H)
    d = esamp.Distiller(H, 2, 1, 2)
    before = d.params.clone()
    sid = torch.empty(0, dtype=torch.int64)
    assert d.forward(empty(H), sid).shape == (0, H)
    assert torch.isnan(d.train_step(empty(H), empty(H), sid)).all()
    assert torch.equal(d.params, before) and d.stats()["steps"] == 0
    out = torch.zeros(2, H)
    esamp.ops.capture(empty(H), None, out)
    assert (out == 0).all()
