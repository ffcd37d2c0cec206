"""Reliability (issue 7): bad-input catalogue run in child processes (a crash, abort or hang of a case
fails the test instead of killing pytest), defined results for degenerate inputs, long runs with slot
reassignment (flat memory, no state leak), NaN safety."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import esamp

HERE = os.path.dirname(os.path.abspath(__file__))

# Each case: (name, python expression building and calling, expected exception type or "ok", argument
# name that the message must contain).  Executed in a child process per group.
_PRELUDE = textwrap.dedent("""
    import json, sys, torch, esamp
    B, V, H = 3, 50, 8
    L = torch.randn(B, V); P = torch.randn(B, H); W = torch.randn(V, H)
    d = esamp.Distiller(H, 4, 2, 3)
    x = torch.randn(5, H); t = torch.randn(5, H); s = torch.tensor([0, 1, 2, 0, 1])
    def run(name, fn):
        try:
            r = fn()
            print(json.dumps({"case": name, "result": "ok", "repr": repr(r)[:200]}), flush=True)
        except Exception as e:
            print(json.dumps({"case": name, "result": type(e).__name__, "msg": str(e)[:400]}), flush=True)
""")

REWEIGHT_CASES = [
    ("logits 1-D", "esamp.ops.reweight(L[0], P, W)", "ValueError", "logits"),
    ("logits int", "esamp.ops.reweight(L.long(), P, W)", "RuntimeError", "logits"),
    ("pred rows", "esamp.ops.reweight(L, P[:2], W)", "RuntimeError", "pred_hidden"),
    ("V mismatch", "esamp.ops.reweight(L, P, W[:-1])", "RuntimeError", "lm_head_weight"),
    ("H mismatch", "esamp.ops.reweight(L, P, W[:, :-1])", "RuntimeError", "lm_head_weight"),
    ("bias shape", "esamp.ops.reweight(L, P, W, lm_head_bias=torch.zeros(V + 1))", "RuntimeError", "lm_head_bias"),
    ("top_p 0", "esamp.ops.reweight(L, P, W, top_p=0.0)", "ValueError", "top_p"),
    ("top_p 1.5", "esamp.ops.reweight(L, P, W, top_p=1.5)", "ValueError", "top_p"),
    ("top_p tensor 0", "esamp.ops.reweight(L, P, W, top_p=torch.tensor([0.5, 0.0, 1.0]))", "RuntimeError", "top_p"),
    ("temperature -1", "esamp.ops.reweight(L, P, W, temperature=-1.0)", "ValueError", "temperature"),
    ("temperature tensor -1", "esamp.ops.reweight(L, P, W, temperature=torch.tensor([1.0, -1.0, 1.0]))",
     "RuntimeError", "temperature"),
    ("beta -0.1", "esamp.ops.reweight(L, P, W, beta=-0.1)", "ValueError", "beta"),
    ("beta nan", "esamp.ops.reweight(L, P, W, beta=float('nan'))", "ValueError", "beta"),
    ("min_p 1", "esamp.ops.reweight(L, P, W, min_p=1.0)", "ValueError", "min_p"),
    ("row param length", "esamp.ops.reweight(L, P, W, beta=torch.zeros(B + 1))", "ValueError", "beta"),
    ("seed float", "esamp.ops.reweight(L, P, W, seed=1.5)", "TypeError", "seed"),
    ("seed tensor length", "esamp.ops.reweight(L, P, W, seed=torch.zeros(B + 2, dtype=torch.int64))",
     "ValueError", "seed"),
    ("transposed logits", "esamp.ops.reweight(torch.randn(V, B).t(), P, W)", "RuntimeError", "logits"),
    ("raw op wrong dtype", "torch.ops.esamp.reweight(L, P, W, None, torch.zeros(B, dtype=torch.float64), "
     "torch.ones(B), torch.zeros(B, dtype=torch.long), torch.ones(B), torch.zeros(B), "
     "torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long))", "RuntimeError", "beta"),
    ("empty batch", "esamp.ops.reweight(L[:0], P[:0], W)", "ok", None),
    ("V = 1", "esamp.ops.reweight(L[:, :1], P, W[:1])", "ok", None),
    ("H = 1", "esamp.ops.reweight(L, P[:, :1], W[:, :1].contiguous())", "ok", None),
    ("all -inf row", "esamp.ops.reweight(torch.full((B, V), float('-inf')), P, W)", "ok", None),
    ("NaN logits", "esamp.ops.reweight(torch.where(torch.rand(B, V) < 0.5, float('nan'), L), P, W, top_p=0.9)",
     "ok", None),
    ("reweight_logits top_p 0", "esamp.ops.reweight_logits(L, P, W, top_p=0.0)", "ValueError", "top_p"),
    ("mix_hidden shape", "esamp.ops.mix_hidden(P, P[:, :-1])", "RuntimeError", "pred_hidden"),
    ("mix_hidden beta len", "esamp.ops.mix_hidden(P, P, beta=torch.zeros(B + 1))", "ValueError", "beta"),
]

DISTILLER_CASES = [
    ("slot out of range", "d.train_step(x, t, torch.tensor([0, 1, 2, 3, 0]))", "RuntimeError", "slot_ids"),
    ("slot negative", "d.forward(x, torch.tensor([0, -1, 0, 0, 0]))", "RuntimeError", "slot_ids"),
    ("slot length", "d.forward(x, torch.tensor([0, 1]))", "RuntimeError", "slot_ids"),
    ("x H mismatch", "d.forward(torch.randn(5, H + 1), s)", "RuntimeError", "params"),
    ("target shape", "d.train_step(x, t[:, :-1], s)", "RuntimeError", "target"),
    ("x 3-D", "d.forward(x[None], s)", "RuntimeError", "x"),
    ("x int", "d.forward(x.long(), s)", "RuntimeError", "x"),
    ("float slots", "d.forward(x, s.float())", "TypeError", "slot_ids"),
    ("reset out of range", "d.reset([3])", "RuntimeError", "slot_ids"),
    ("slot_state_dict range", "d.slot_state_dict(3)", "ValueError", "slot"),
    ("load mismatched slot state", "d.load_slot_state_dict(0, {k: torch.zeros(1) for k in "
     "('A', 'G', 'B', 'c', 'gamma')})", "ValueError", "sd"),
    ("load mismatched bank", "d.load_state_dict(esamp.Distiller(H, 8, 2, 3).state_dict())", "ValueError", "rank"),
    ("rank 0", "esamp.Distiller(H, 0, 2, 3)", "ValueError", "rank"),
    ("raw op lr nan", "torch.ops.esamp.distiller_train_step(d.params, d.exp_avg, d.exp_avg_sq, d.step, "
     "torch.zeros(3), d.counters, x, t, s, 4, 2, 1e-6, float('nan'), 0.9, 0.999, 1e-4, 0.5)", "RuntimeError", "lr"),
    ("raw op stats dtype", "torch.ops.esamp.distiller_train_step(d.params, d.exp_avg, d.exp_avg_sq, d.step, "
     "torch.zeros(3), torch.zeros(4), x, t, s, 4, 2, 1e-6, 4e-4, 0.9, 0.999, 1e-4, 0.5)", "RuntimeError", "stats"),
    ("raw op wrong layers", "torch.ops.esamp.distiller_forward(d.params, x, s, 4, 3, 1e-6, None)",
     "RuntimeError", "params"),
    ("empty batch train", "d.train_step(x[:0], t[:0], s[:0])", "ok", None),
    ("empty batch forward", "d.forward(x[:0], s[:0])", "ok", None),
    ("H = 1 bank", "esamp.Distiller(1, 1, 1, 1).train_step(torch.randn(2, 1), torch.randn(2, 1), [0, 0])",
     "ok", None),
]


def _run_group(cases):
    code = _PRELUDE + "\n".join(f"run({name!r}, lambda: {expr})" for name, expr, _, _ in cases)
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                       cwd=os.path.dirname(HERE))
    results = {}
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["case"]] = r
    return p, results


@pytest.mark.parametrize("group", ["reweight", "distiller"])
def test_bad_input_catalogue_in_child_process(group):
    cases = REWEIGHT_CASES if group == "reweight" else DISTILLER_CASES
    p, results = _run_group(cases)
    done = [n for n, *_ in cases if n in results]
    assert p.returncode == 0, (
        f"child process died with code {p.returncode} after cases {done[-3:]}; stderr tail:\n{p.stderr[-2000:]}")
    for name, _, expected, arg in cases:
        r = results.get(name)
        assert r is not None, f"{name}: no result"
        assert r["result"] == expected, f"{name}: expected {expected}, got {r}"
        if arg is not None:
            assert arg in r["msg"], f"{name}: message does not name {arg!r}: {r['msg']}"


def test_degenerate_rows_have_defined_results():
    B, V, H = 4, 37, 8
    W = torch.randn(V, H)
    P = torch.randn(B, H)
    logits = torch.full((B, V), float("-inf"))
    logits[1, 5] = 0.0                                   # one finite value
    logits[2] = float("nan")                             # all NaN
    logits[3, :10] = torch.randn(10)
    logits[3, 10:] = float("nan")                        # NaN treated as -inf
    for kw in ({}, {"top_p": 0.5}, {"min_p": 0.1, "top_k": 3}, {"temperature": 0.0}):
        tok, lp = esamp.ops.reweight(logits, P, W, seed=3, **kw)
        assert ((tok >= 0) & (tok < V)).all(), (kw, tok)
        assert tok[1].item() == 5
        assert tok[3].item() < 10, "a NaN logit was sampled"
        assert not (lp > 1e-6).any(), lp
        m = esamp.ops.reweight_logits(logits, P, W, **kw)
        assert m.shape == (B, V) and not torch.isnan(m[1]).any() and not torch.isnan(m[3]).any()


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_long_run_slot_reassignment_flat_memory_no_leak():
    H, R, L, S = 32, 8, 2, 8
    d = esamp.Distiller(H, R, L, S, seed=11)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 16, H, generator=g)
    ts = torch.randn(64, 16, H, generator=g)
    slot_seq = torch.randint(0, S, (64, 16), generator=g)
    losses = torch.empty(S)
    rss = {}
    steps = 10_000
    for i in range(steps):
        k = i % 64
        d.train_step(xs[k], ts[k], slot_seq[k], losses=losses)
        if i % 7 == 0:
            d.reset(i % S)                      # constantly reassign slots to new "requests"
        if i == 1000:
            rss["start"] = _rss_kb()
    rss["end"] = _rss_kb()
    st = d.stats()
    assert st["steps"] == steps and st["rows_trained"] == steps * 16 and st["rows_skipped"] == 0
    assert torch.isfinite(d.params).all() and torch.isfinite(d.exp_avg_sq).all()
    growth_mb = (rss["end"] - rss["start"]) / 1024
    assert growth_mb < 16, f"RSS grew by {growth_mb:.1f} MB over {steps - 1000} steps"
    # A reset slot behaves exactly like a fresh one.
    d.reset(3)
    fresh = esamp.Distiller(H, R, L, S, seed=11)
    for k in range(5):
        sl = torch.full((16,), 3, dtype=torch.int64)
        l1 = d.train_step(xs[k], ts[k], sl)
        l2 = fresh.train_step(xs[k], ts[k], sl)
        assert torch.equal(l1[3], l2[3])
    assert torch.equal(d.params[3], fresh.params[3]) and torch.equal(d.exp_avg[3], fresh.exp_avg[3])
    assert torch.equal(d.step[3], fresh.step[3])


def test_nan_rows_never_poison_a_distiller():
    H, R, L, S = 16, 4, 2, 3
    g = torch.Generator().manual_seed(5)
    a = esamp.Distiller(H, R, L, S)
    b = esamp.Distiller(H, R, L, S)
    for i in range(20):
        x = torch.randn(9, H, generator=g)
        t = torch.randn(9, H, generator=g)
        s = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
        xb, tb = x.clone(), t.clone()
        xb[1, 3] = float("nan")
        tb[4, 0] = float("inf")
        xb[7] = float("-inf")
        keep = torch.tensor([0, 2, 3, 5, 6, 8])
        a.train_step(xb, tb, s)
        b.train_step(x[keep], t[keep], s[keep])
    assert torch.isfinite(a.params).all() and torch.isfinite(a.exp_avg).all() and torch.isfinite(a.exp_avg_sq).all()
    torch.testing.assert_close(a.params, b.params, rtol=1e-6, atol=1e-7)
    assert a.stats()["rows_skipped"] == 20 * 3 and a.stats()["rows_trained"] == 20 * 6
