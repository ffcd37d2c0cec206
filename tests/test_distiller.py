"""Distiller bank (SPEC 2, 5, 7) on the CPU: esamp::distiller_forward / _train_step / _reset and esamp.Distiller
against the plain-PyTorch reference in esamp.reference.distiller (torch.autograd + clip_grad_norm_ +
torch.optim.Adam, computed in float64 so that the comparison measures the kernels' float32 error).

Tolerances (reference in float64 on the same, already-rounded inputs):
  forward, float32 output: |d| <= 2e-5 + 2e-5 |ref|  -- float32 accumulation over K <= max(H, 2R) in two
      blocks and an RMSNorm; the measured error is ~1e-6.
  forward, bf16 / fp16 output: one unit in the last place of the output dtype (rtol 2^-7 / 2^-10, compared
      with the float64 result rounded to that dtype): the kernel's float32 result may round the other way.
  train (>= 20 steps): losses rtol 1e-5; params rtol 1e-4 + atol 1e-6 (parameters are O(0.02..1));
      exp_avg / exp_avg_sq rtol 1e-4 + atol 1e-5 * max|ref| of that tensor (elements whose gradient is a
      cancellation of larger terms carry float32 rounding of the larger terms); step counters exact.
"""
import math

import pytest
import torch

import esamp
from esamp.reference import distiller as ref

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
FWD_TOL = {F32: dict(rtol=2e-5, atol=2e-5), BF16: dict(rtol=2.0 ** -7, atol=1e-5),
           F16: dict(rtol=2.0 ** -10, atol=1e-5)}
ops = torch.ops.esamp


def randomise(d: esamp.Distiller, gen: torch.Generator, scale: float = 0.15) -> None:
    """Give every slot distinct non-trivial parameters (fresh slots have B = 0, i.e. identity blocks)."""
    H, R, L = d.hidden_size, d.rank, d.layers
    for s in range(d.slots):
        sd = {"A": torch.randn(L, H, R, generator=gen) * scale / math.sqrt(H) * 4,
              "G": torch.randn(L, H, R, generator=gen) * scale / math.sqrt(H) * 4,
              "c": 1.0 + 0.5 * torch.randn(L, R, generator=gen),
              "B": torch.randn(L, R, H, generator=gen) * scale,
              "gamma": 1.0 + 0.2 * torch.randn(H, generator=gen)}
        d.load_slot_state_dict(s, sd)


def bank_state(d: esamp.Distiller):
    return [t.clone() for t in (d.params, d.exp_avg, d.exp_avg_sq, d.step, d.counters)]


# ----------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("H,R,L", [(33, 4, 1), (64, 8, 2), (577, 16, 2)])
def test_forward_matches_reference(dtype, H, R, L):
    gen = torch.Generator().manual_seed(H * 10 + L)
    S, N = 3, 11
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    # Non-contiguous row slice: rows with stride 2*(H+3), last dimension dense.
    big = torch.randn(2 * N, H + 3, generator=gen).to(dtype)
    x = big[::2, 1:1 + H]
    assert not x.is_contiguous() and x.stride(1) == 1
    sid = torch.tensor([2, 0, 0, 1, 2, 2, 0, 1, 1, 2, 0])
    y = d.forward(x, sid)
    assert y.dtype == dtype and y.shape == (N, H)
    want = ref.forward_bank(d.params, x, sid, H, R, L, out_dtype=torch.float64)
    torch.testing.assert_close(y, want.to(dtype), **FWD_TOL[dtype])
    # out_dtype=float32 from low-precision input: float32 tolerance.
    y32 = d.forward(x, sid, out_dtype=F32)
    assert y32.dtype == F32
    torch.testing.assert_close(y32.double(), want.double(), **FWD_TOL[F32])


@pytest.mark.parametrize("out_dtype", [F32, BF16, F16])
def test_forward_out_dtype_and_single_row(out_dtype):
    gen = torch.Generator().manual_seed(5)
    H, R, L, S = 64, 8, 2, 4
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    x = torch.randn(1, H, generator=gen)
    for s in range(S):
        y = d.forward(x, torch.tensor([s]), out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.shape == (1, H)
        want = ref.forward_bank(d.params, x, torch.tensor([s]), H, R, L, out_dtype=torch.float64)
        torch.testing.assert_close(y, want.to(out_dtype), **FWD_TOL[out_dtype])


def test_forward_slots_are_independent_and_nonfinite_rows_stay_local():
    gen = torch.Generator().manual_seed(7)
    H, R, L, S = 33, 4, 2, 3
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    x = torch.randn(6, H, generator=gen)
    sid = torch.tensor([0, 1, 2, 0, 1, 2])
    y = d.forward(x, sid)
    # Each row equals its own single-row prediction (slot grouping and row order do not matter).
    for i in range(6):
        assert torch.equal(d.forward(x[i:i + 1], sid[i:i + 1])[0], y[i])
    # Different slots give different predictions for the same row.
    y_all = torch.stack([d.forward(x[:1], torch.tensor([s]))[0] for s in range(S)])
    assert not torch.allclose(y_all[0], y_all[1]) and not torch.allclose(y_all[1], y_all[2])
    bad = x.clone()
    bad[1, 3] = float("nan")
    bad[4, 0] = float("inf")
    yb = d.forward(bad, sid)
    assert not torch.isfinite(yb[1]).all() and not torch.isfinite(yb[4]).all()
    keep = [0, 2, 3, 5]
    assert torch.equal(yb[keep], y[keep])


def test_overlapping_input_rows():
    """Inputs may be expanded (row stride 0) or single rows with an arbitrary row stride."""
    H, R, L, S = 33, 4, 2, 2
    gen = torch.Generator().manual_seed(8)
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    row = torch.randn(1, H, generator=gen)
    xe = row.expand(4, H)
    assert xe.stride(0) == 0
    sid = torch.tensor([0, 1, 0, 1])
    assert torch.equal(d.forward(xe, sid), d.forward(xe.contiguous(), sid))
    xt = torch.randn(H, 1, generator=gen).t()  # shape [1, H], strides (1, 1)
    assert xt.stride() == (1, 1)
    assert torch.equal(d.forward(xt, [1]), d.forward(xt.contiguous(), [1]))
    e = esamp.Distiller(H, R, L, S)
    e.params.copy_(d.params)
    te = torch.randn(1, H, generator=gen).expand(4, H)
    assert torch.equal(d.train_step(xe, te, sid), e.train_step(xe.contiguous(), te.contiguous(), sid))
    assert torch.equal(d.params, e.params) and torch.equal(d.exp_avg_sq, e.exp_avg_sq)


def test_forward_empty_batch():
    d = esamp.Distiller(33, 4, 1, 2)
    y = d.forward(torch.empty(0, 33), torch.empty(0, dtype=torch.int64))
    assert y.shape == (0, 33)


# ----------------------------------------------------------------------------------------- training
def _train_schedule(gen, S, steps):
    """Per step: row counts per slot (some 0 = idle), different counts per slot."""
    sched = []
    for k in range(steps):
        counts = torch.randint(1, 6, (S,), generator=gen)
        counts[k % S] = 0                      # one slot idle on every step (a different one each time)
        if k % 7 == 3:
            counts[(k + 1) % S] = 0            # sometimes two idle slots
        sched.append(counts.tolist())
    return sched


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_train_step_matches_autograd_clip_adam(dtype):
    H, R, L, S, steps = 64, 8, 2, 4, 24
    lr, clip = 3e-3, 0.5
    gen = torch.Generator().manual_seed(11)
    d = esamp.Distiller(H, R, L, S, lr=lr, clip=clip, seed=3)
    randomise(d, gen, scale=0.05)
    rb = ref.ReferenceBank(d.params, H, R, L, lr=lr, betas=(0.9, 0.999), eps=1e-4, clip=clip)
    # Targets of different scale per slot: gradient norms below and above the clip threshold.
    t_scale = torch.tensor([0.3, 1.0, 3.0, 10.0])
    clipped, unclipped = 0, 0
    for k, counts in enumerate(_train_schedule(gen, S, steps)):
        sid = torch.cat([torch.full((c,), s, dtype=torch.int64) for s, c in enumerate(counts)])
        sid = sid[torch.randperm(sid.numel(), generator=gen)]          # slots interleaved in the batch
        x = torch.randn(sid.numel(), H, generator=gen).to(dtype)
        t = (torch.randn(sid.numel(), H, generator=gen) * t_scale[sid, None]).to(dtype)
        before = bank_state(d)
        losses = d.train_step(x, t, sid)
        want = rb.train_step(x, t, sid)
        idle = [s for s in range(S) if counts[s] == 0]
        assert torch.isnan(losses[idle]).all() and not torch.isnan(losses[[s for s in range(S) if s not in idle]]).any()
        torch.testing.assert_close(losses.double(), want, rtol=1e-5, atol=0, equal_nan=True)
        for s in idle:  # idle slots are bit-identical to before
            for a, b in zip(bank_state(d)[:4], before[:4]):
                assert torch.equal(a[s], b[s])
        for s in range(S):
            if counts[s]:
                n = rb.last_norms[s]
                assert abs(n / clip - 1) > 1e-3, "gradient norm too close to the clip threshold to compare"
                clipped += bool(rb.last_clipped[s])
                unclipped += not rb.last_clipped[s]
        torch.testing.assert_close(d.params.double(), rb.params(), rtol=1e-4, atol=1e-6)
    assert clipped >= 5 and unclipped >= 5, (clipped, unclipped)
    assert torch.equal(d.step, rb.steps())
    assert (d.step > 0).all()
    torch.testing.assert_close(d.params.double(), rb.params(), rtol=1e-4, atol=1e-6)
    for mine, theirs in ((d.exp_avg, rb.exp_avg()), (d.exp_avg_sq, rb.exp_avg_sq())):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5 * theirs.abs().max().item())
    c = d.counters
    assert c[0].item() == rb.stats[0] and c[1].item() == 0 and c[3].item() == steps
    assert math.isclose(c[2].item(), rb.stats[2], rel_tol=1e-5)


def test_train_step_no_clip_and_single_slot_bank():
    """clip <= 0 disables clipping (large gradients, large update); S = 1 (shared mode)."""
    H, R, L = 33, 4, 1
    gen = torch.Generator().manual_seed(2)
    d = esamp.Distiller(H, R, L, 1, lr=1e-2, clip=0.0)
    randomise(d, gen)
    rb = ref.ReferenceBank(d.params, H, R, L, lr=1e-2, clip=0.0)
    for _ in range(20):
        x = torch.randn(5, H, generator=gen)
        t = 5 * torch.randn(5, H, generator=gen)
        sid = torch.zeros(5, dtype=torch.int64)
        torch.testing.assert_close(d.train_step(x, t, sid).double(), rb.train_step(x, t, sid), rtol=1e-5, atol=0)
        assert rb.last_norms[0] > 1.0  # would have been clipped at 0.5
    torch.testing.assert_close(d.params.double(), rb.params(), rtol=1e-4, atol=1e-6)
    assert d.step.tolist() == [20]


@pytest.mark.parametrize("kwargs", [{"foreach": True}, {"fused": True}])
def test_batched_eager_baseline_computes_the_same_step(kwargs):
    """The benchmark baseline (bmm + autograd + per-slot clip + torch.optim.Adam) is a faithful step."""
    H, R, L, S, n = 64, 8, 2, 3, 4
    gen = torch.Generator().manual_seed(4)
    d = esamp.Distiller(H, R, L, S, lr=3e-3)
    randomise(d, gen, scale=0.05)
    base = ref.BatchedEagerDistiller(d.params, H, R, L, lr=3e-3, adam_kwargs=kwargs)
    t_scale = torch.tensor([0.3, 3.0, 10.0])[:, None, None]
    for _ in range(5):
        x = torch.randn(S, n, H, generator=gen)
        t = torch.randn(S, n, H, generator=gen) * t_scale
        sid = torch.arange(S).repeat_interleave(n)
        lo = d.train_step(x.reshape(-1, H), t.reshape(-1, H), sid)
        lb = base.train_step(x, t)
        torch.testing.assert_close(lo, lb, rtol=1e-5, atol=0)
    torch.testing.assert_close(d.params, base.params(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------- NaN / overflow
def test_nonfinite_rows_are_skipped_and_counted():
    H, R, L, S = 33, 4, 2, 3
    gen = torch.Generator().manual_seed(9)
    clean = esamp.Distiller(H, R, L, S, lr=1e-2)
    randomise(clean, gen)
    dirty = esamp.Distiller(H, R, L, S, lr=1e-2)
    dirty.params.copy_(clean.params)
    for _ in range(3):
        x = torch.randn(6, H, generator=gen)
        t = torch.randn(6, H, generator=gen)
        sid = torch.tensor([0, 1, 0, 1, 0, 1])
        # Bad rows: NaN in x (slot 0), +Inf in t (slot 1), -Inf in x (slot 0); slot 2 gets only bad rows.
        bx = torch.randn(4, H, generator=gen)
        bt = torch.randn(4, H, generator=gen)
        bx[0, 5] = float("nan")
        bt[1, 0] = float("inf")
        bx[2, 7] = float("-inf")
        bt[3, 2] = float("nan")
        bsid = torch.tensor([0, 1, 0, 2])
        xd = torch.cat([bx[:2], x[:3], bx[2:], x[3:]])
        td = torch.cat([bt[:2], t[:3], bt[2:], t[3:]])
        sd = torch.cat([bsid[:2], sid[:3], bsid[2:], sid[3:]])
        lc = clean.train_step(x, t, sid)
        ld = dirty.train_step(xd, td, sd)
        assert torch.isnan(lc[2]) and torch.isfinite(lc[:2]).all()
        assert torch.equal(lc[:2], ld[:2]) and torch.isnan(ld[2])
        for a, b in zip(bank_state(clean)[:4], bank_state(dirty)[:4]):
            assert torch.equal(a, b)
    for tsr in (dirty.params, dirty.exp_avg, dirty.exp_avg_sq):
        assert torch.isfinite(tsr).all()
    assert dirty.stats()["rows_skipped"] == 12 and dirty.stats()["rows_trained"] == 18
    assert clean.stats()["rows_skipped"] == 0 and clean.stats()["rows_trained"] == 18
    assert dirty.stats()["steps"] == 3 and dirty.step.tolist() == [3, 3, 0]
    assert dirty.counters[2].item() == clean.counters[2].item()


def test_overflowing_slot_is_not_updated():
    """Finite but huge inputs overflow the loss/gradient: the slot keeps its state, its rows count as skipped."""
    H, R, L, S = 33, 4, 2, 3
    gen = torch.Generator().manual_seed(10)
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    x = torch.randn(6, H, generator=gen)
    t = torch.randn(6, H, generator=gen)
    x[0] *= 1e30   # slot 0: activations overflow float32
    t[1] = 3e38    # slot 1: loss overflows float32
    sid = torch.tensor([0, 1, 2, 2, 0, 1])
    before = bank_state(d)
    losses = d.train_step(x, t, sid)
    assert torch.isnan(losses[:2]).all() and torch.isfinite(losses[2])
    for a, b in zip(bank_state(d)[:4], before[:4]):
        assert torch.equal(a[:2], b[:2])
        assert not torch.equal(a[2], b[2])
    for tsr in (d.params, d.exp_avg, d.exp_avg_sq):
        assert torch.isfinite(tsr).all()
    assert d.stats() == {"rows_trained": 2, "rows_skipped": 4, "loss_sum": losses[2].item(), "steps": 1}


def test_empty_batch_is_a_no_op():
    d = esamp.Distiller(33, 4, 1, 2)
    before = bank_state(d)
    losses = d.train_step(torch.empty(0, 33), torch.empty(0, 33), torch.empty(0, dtype=torch.int64))
    assert losses.shape == (2,) and torch.isnan(losses).all()
    for a, b in zip(bank_state(d), before):
        assert torch.equal(a, b)


def test_all_rows_bad_counts_no_step():
    d = esamp.Distiller(33, 4, 1, 2)
    before = bank_state(d)
    x = torch.full((3, 33), float("nan"))
    losses = d.train_step(x, torch.zeros(3, 33), torch.tensor([0, 1, 1]))
    assert torch.isnan(losses).all()
    for a, b in zip(bank_state(d)[:4], before[:4]):
        assert torch.equal(a, b)
    assert d.stats() == {"rows_trained": 0, "rows_skipped": 3, "loss_sum": 0.0, "steps": 0}


# ----------------------------------------------------------------------------------------- reset / init
def test_init_follows_documented_rule():
    H, R, L = 33, 4, 2
    d = esamp.Distiller(H, R, L, 2, seed=123)
    want = ref.init_slot(H, R, L, seed=123)
    for s in range(2):
        # A, G: float32 Box-Muller vs float64 from the same Philox words (|error| < 1e-7 at std 0.02).
        torch.testing.assert_close(d.params[s].double(), want, rtol=0, atol=1e-7)
    sd = d.slot_state_dict(0)
    assert torch.equal(sd["c"], torch.ones(L, R)) and torch.equal(sd["B"], torch.zeros(L, R, H))
    assert torch.equal(sd["gamma"], torch.ones(H))
    assert abs(sd["A"].std().item() - 0.02) < 0.003 and abs(sd["G"].mean().item()) < 0.003
    assert not torch.equal(sd["A"], sd["G"])
    other = esamp.Distiller(H, R, L, 1, seed=124)
    assert not torch.equal(other.params[0], d.params[0])
    assert (d.exp_avg == 0).all() and (d.exp_avg_sq == 0).all() and (d.step == 0).all()


def test_reset_restores_fresh_slots_only():
    H, R, L, S = 64, 8, 2, 4
    gen = torch.Generator().manual_seed(13)
    gamma = 1.0 + 0.1 * torch.randn(H, generator=gen)
    d = esamp.Distiller(H, R, L, S, seed=5, gamma_init=gamma)
    fresh = esamp.Distiller(H, R, L, S, seed=5, gamma_init=gamma)
    assert torch.equal(d.slot_state_dict(2)["gamma"], gamma)
    for _ in range(3):
        x = torch.randn(8, H, generator=gen)
        d.train_step(x, torch.randn(8, H, generator=gen), torch.arange(8) % S)
    assert not torch.equal(d.params, fresh.params) and (d.step == 3).all()
    before = bank_state(d)
    d.reset([1, 3])
    for s in (1, 3):
        for a, b in zip(bank_state(d)[:4], bank_state(fresh)[:4]):
            assert torch.equal(a[s], b[s])
    for s in (0, 2):
        for a, b in zip(bank_state(d)[:4], before[:4]):
            assert torch.equal(a[s], b[s])
    assert torch.equal(d.slot_state_dict(1)["gamma"], gamma)
    d.reset(torch.tensor([0, 0, 2]))  # tensor argument, duplicate ids
    for a, b in zip(bank_state(d)[:4], bank_state(fresh)[:4]):
        assert torch.equal(a, b)
    d.reset([])  # no-op
    assert torch.equal(d.params, fresh.params)


# ----------------------------------------------------------------------------------------- state dicts
def test_slot_state_dict_round_trip():
    H, R, L, S = 33, 4, 2, 3
    gen = torch.Generator().manual_seed(17)
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    d.train_step(torch.randn(6, H, generator=gen), torch.randn(6, H, generator=gen), torch.arange(6) % S)
    sd = d.slot_state_dict(1)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"A": (L, H, R), "G": (L, H, R), "B": (L, R, H),
                                                          "c": (L, R), "gamma": (H,)}
    assert all(v.dtype == F32 for v in sd.values())
    sd["A"].add_(1.0)  # a copy: the bank is unchanged
    assert not torch.equal(d.slot_state_dict(1)["A"], sd["A"])
    sd = d.slot_state_dict(1)
    e = esamp.Distiller(H, R, L, S)
    e.train_step(torch.randn(3, H, generator=gen), torch.randn(3, H, generator=gen), torch.tensor([2, 2, 2]))
    e.load_slot_state_dict(2, sd)
    assert torch.equal(e.params[2], d.params[1])
    assert (e.exp_avg[2] == 0).all() and (e.exp_avg_sq[2] == 0).all() and e.step[2].item() == 0
    x = torch.randn(4, H, generator=gen)
    assert torch.equal(e.forward(x, [2] * 4), d.forward(x, [1] * 4))
    assert d.nbytes_per_slot == (d.params[0].nbytes + d.exp_avg[0].nbytes + d.exp_avg_sq[0].nbytes
                                 + d.step[:1].nbytes)
    assert d.nbytes_per_slot == 12 * (L * (3 * H * R + R) + H) + 8
    with pytest.raises(ValueError, match=r"sd\['B'\]"):
        e.load_slot_state_dict(0, {**sd, "B": torch.zeros(L, H, R)})
    with pytest.raises(KeyError, match="gamma"):
        e.load_slot_state_dict(0, {k: v for k, v in sd.items() if k != "gamma"})
    with pytest.raises(ValueError, match="slot"):
        d.slot_state_dict(S)


def test_state_dict_save_load(tmp_path):
    H, R, L, S = 33, 4, 2, 2
    gen = torch.Generator().manual_seed(19)
    d = esamp.Distiller(H, R, L, S, lr=1e-2)
    for _ in range(3):
        d.train_step(torch.randn(4, H, generator=gen), torch.randn(4, H, generator=gen), torch.tensor([0, 1, 1, 0]))
    path = tmp_path / "bank.pt"
    d.save(path)
    e = esamp.Distiller(H, R, L, S, lr=1e-2)
    e.load(path)
    for a, b in zip(bank_state(d), bank_state(e)):
        assert torch.equal(a, b)
    x, t = torch.randn(4, H, generator=gen), torch.randn(4, H, generator=gen)
    sid = torch.tensor([1, 0, 1, 1])
    assert torch.equal(d.train_step(x, t, sid), e.train_step(x, t, sid))
    for a, b in zip(bank_state(d), bank_state(e)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="rank"):
        esamp.Distiller(H, R + 1, L, S).load(path)
    with pytest.raises(ValueError, match="slots"):
        esamp.Distiller(H, R, L, S + 1).load_state_dict(d.state_dict())
    with pytest.raises(ValueError, match="config"):
        e.load_state_dict({"params": d.params})


# ----------------------------------------------------------------------------------------- opcheck
def _op_args(H=33, R=4, L=2, S=3, N=5):
    gen = torch.Generator().manual_seed(23)
    d = esamp.Distiller(H, R, L, S)
    randomise(d, gen)
    x = torch.randn(N, H, generator=gen)
    t = torch.randn(N, H, generator=gen)
    sid = torch.tensor([0, 2, 2, 1, 0])[:N]
    losses = torch.empty(S)
    stats = torch.zeros(4, dtype=torch.float64)
    return d, x, t, sid, losses, stats


def test_opcheck_forward():
    d, x, _, sid, _, _ = _op_args()
    torch.library.opcheck(ops.distiller_forward.default, (d.params, x, sid, d.rank, d.layers, 1e-6, None))
    torch.library.opcheck(ops.distiller_forward.default, (d.params, x.to(BF16), sid, d.rank, d.layers, 1e-6, F32))


def test_opcheck_train_step():
    d, x, t, sid, losses, stats = _op_args()
    torch.library.opcheck(ops.distiller_train_step.default,
                          (d.params, d.exp_avg, d.exp_avg_sq, d.step, losses, stats, x, t, sid, d.rank, d.layers,
                           1e-6, 4e-4, 0.9, 0.999, 1e-4, 0.5))


def test_opcheck_reset():
    d, *_ = _op_args()
    torch.library.opcheck(ops.distiller_reset.default,
                          (d.params, d.exp_avg, d.exp_avg_sq, d.step, torch.tensor([1]), d.hidden_size, d.rank,
                           d.layers, 0, None))
    torch.library.opcheck(ops.distiller_reset.default,
                          (d.params, d.exp_avg, d.exp_avg_sq, d.step, torch.tensor([0, 2]), d.hidden_size, d.rank,
                           d.layers, 7, torch.ones(d.hidden_size)))


# ----------------------------------------------------------------------------------------- bad input
def _train_call(**over):
    d, x, t, sid, losses, stats = _op_args()
    a = dict(params=d.params, exp_avg=d.exp_avg, exp_avg_sq=d.exp_avg_sq, step=d.step, losses=losses, stats=stats,
             x=x, target=t, slot_ids=sid, rank=d.rank, layers=d.layers, norm_eps=1e-6, lr=4e-4, beta1=0.9,
             beta2=0.999, adam_eps=1e-4, clip=0.5)
    a.update({k: (v(a) if callable(v) else v) for k, v in over.items()})
    return lambda: ops.distiller_train_step(*a.values())


def _fwd_call(**over):
    d, x, _, sid, _, _ = _op_args()
    a = dict(params=d.params, x=x, slot_ids=sid, rank=d.rank, layers=d.layers, norm_eps=1e-6, out_dtype=None)
    a.update({k: (v(a) if callable(v) else v) for k, v in over.items()})
    return lambda: ops.distiller_forward(*a.values())


def _reset_call(**over):
    d, *_ = _op_args()
    a = dict(params=d.params, exp_avg=d.exp_avg, exp_avg_sq=d.exp_avg_sq, step=d.step, slot_ids=torch.tensor([0]),
             hidden_size=d.hidden_size, rank=d.rank, layers=d.layers, seed=0, gamma_init=None)
    a.update({k: (v(a) if callable(v) else v) for k, v in over.items()})
    return lambda: ops.distiller_reset(*a.values())


BAD = [
    # (name, call, pattern the message must contain)
    ("x 1-D", _fwd_call(x=lambda a: a["x"][0]), r"x: expected a 2-D"),
    ("x float64", _fwd_call(x=lambda a: a["x"].double()), r"x: expected dtype float32, bfloat16 or float16"),
    ("x int", _train_call(x=lambda a: a["x"].long()), r"x: expected dtype"),
    ("x last dim strided", _fwd_call(x=lambda a: torch.randn(33, 5).t()), r"x: expected the last dimension"),
    ("H mismatch", _fwd_call(x=lambda a: torch.randn(5, 34)), r"params: expected P = .* H = 34"),
    ("P mismatch rank", _train_call(rank=5), r"params: expected P = .*rank = 5"),
    ("P mismatch layers", _fwd_call(layers=3), r"params: expected P = .*layers = 3"),
    ("rank 0", _fwd_call(rank=0), r"rank: expected >= 1, got 0"),
    ("params float64", _fwd_call(params=lambda a: a["params"].double()), r"params: expected dtype float32"),
    ("params 1-D", _fwd_call(params=lambda a: a["params"][0]), r"params: expected a 2-D"),
    ("slot id too large", _fwd_call(slot_ids=torch.tensor([0, 1, 3, 0, 0])), r"slot_ids: .*\[0, 3\), got 3"),
    ("slot id negative", _train_call(slot_ids=torch.tensor([0, -1, 0, 0, 0])), r"slot_ids: .*got -1"),
    ("slot ids int32", _fwd_call(slot_ids=lambda a: a["slot_ids"].int()), r"slot_ids: expected dtype int64"),
    ("slot ids length", _train_call(slot_ids=torch.tensor([0, 1])), r"slot_ids: expected a 1-D tensor of length"),
    ("target shape", _train_call(target=lambda a: a["target"][:, :10]), r"target: expected shape \[5, 33\]"),
    ("target dtype", _train_call(target=lambda a: a["target"].double()), r"target: expected dtype"),
    ("losses dtype", _train_call(losses=torch.empty(3, dtype=torch.float64)), r"losses: expected a contiguous float32"),
    ("losses length", _train_call(losses=torch.empty(2)), r"losses: expected .*\[S\] with S = 3"),
    ("stats dtype", _train_call(stats=torch.zeros(4)), r"stats: expected a contiguous float64"),
    ("stats length", _train_call(stats=torch.zeros(3, dtype=torch.float64)), r"stats: expected .*\[4\]"),
    ("exp_avg shape", _train_call(exp_avg=lambda a: a["exp_avg"][:2]), r"exp_avg: expected a contiguous float32"),
    ("exp_avg_sq dtype", _train_call(exp_avg_sq=lambda a: a["exp_avg_sq"].double()), r"exp_avg_sq: expected"),
    ("step dtype", _train_call(step=lambda a: a["step"].int()), r"step: expected a contiguous int64"),
    ("lr negative", _train_call(lr=-1.0), r"lr: expected finite and >= 0, got -1"),
    ("beta1 = 1", _train_call(beta1=1.0), r"beta1: expected in \[0, 1\), got 1"),
    ("adam_eps 0", _train_call(adam_eps=0.0), r"adam_eps: expected finite and > 0, got 0"),
    ("out_dtype int", _fwd_call(out_dtype=torch.int64), r"out_dtype: expected dtype"),
    ("reset slot too large", _reset_call(slot_ids=torch.tensor([3])), r"slot_ids: .*got 3"),
    ("reset slot negative", _reset_call(slot_ids=torch.tensor([-2])), r"slot_ids: .*got -2"),
    ("reset hidden_size", _reset_call(hidden_size=32), r"params: expected P = .*H = 32"),
    ("reset gamma_init shape", _reset_call(gamma_init=torch.ones(5)), r"gamma_init: expected .*\[H\] with H = 33"),
]


@pytest.mark.parametrize("name,call,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_naming_the_argument(name, call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_bad_input_python_surface():
    with pytest.raises(ValueError, match="hidden_size"):
        esamp.Distiller(0)
    with pytest.raises(ValueError, match="rank"):
        esamp.Distiller(33, rank=-1)
    with pytest.raises(ValueError, match="gamma_init"):
        esamp.Distiller(33, 4, gamma_init=torch.ones(32))
    d = esamp.Distiller(33, 4, 1, 2)
    with pytest.raises(TypeError, match="slot_ids"):
        d.forward(torch.randn(2, 33), torch.tensor([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="slot_ids"):
        d.reset([2])
    # A failed call leaves the bank untouched.
    before = bank_state(d)
    with pytest.raises(RuntimeError, match="slot_ids"):
        d.train_step(torch.randn(2, 33), torch.randn(2, 33), [0, 5])
    for a, b in zip(bank_state(d), before):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- determinism
def _run_bank(threads, slot_pattern):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        H, R, L, S = 577, 16, 2, 4
        gen = torch.Generator().manual_seed(29)
        d = esamp.Distiller(H, R, L, S, lr=1e-2)
        randomise(d, gen, scale=0.05)
        outs = []
        for k in range(3):
            sid = slot_pattern(k)
            x = torch.randn(sid.numel(), H, generator=gen)
            t = torch.randn(sid.numel(), H, generator=gen)
            outs.append(d.train_step(x, t, sid).clone())
            outs.append(d.forward(x, sid))
        return outs + bank_state(d)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("pattern", ["many_slots", "one_slot"])
def test_deterministic_across_thread_counts(pattern):
    f = (lambda k: torch.arange(12) % 4) if pattern == "many_slots" else (lambda k: torch.full((12,), k % 4))
    a = _run_bank(1, f)
    b = _run_bank(2, f)
    for u, v in zip(a, b):
        assert torch.equal(u.isnan(), v.isnan()) and torch.equal(u.nan_to_num(), v.nan_to_num())
