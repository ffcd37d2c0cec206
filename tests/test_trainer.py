"""esamp.Trainer (SPEC 6): ordering guarantee, buffer reuse, counters, concurrency, errors."""
import threading

import pytest
import torch

import esamp

H, R, L, S = 24, 8, 2, 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(gen, n, device, slots=S):
    x = torch.randn(n, H, generator=gen).to(device)
    t = torch.randn(n, H, generator=gen).to(device)
    s = torch.randint(0, slots, (n,), generator=gen).to(device)
    return x, t, s


@pytest.mark.parametrize("device", DEVICES)
def test_predict_sees_every_observed_update(device):
    gen = torch.Generator().manual_seed(0)
    tr = esamp.Trainer(H, R, L, S, device=device, seed=3, ring_rows=64, ring_segments=2)
    ref = esamp.Distiller(H, R, L, S, device=device, seed=3)
    for it in range(12):
        x, t, s = _batch(gen, 10, device)
        tr.observe(x, t, s)
        ref.train_step(x, t, s)
        if it == 6:
            tr.reset([1, 2])
            ref.reset([1, 2])
        xq, _, sq = _batch(gen, 5, device)
        # same kernels, same order of updates => bit-identical predictions
        torch.testing.assert_close(tr.predict(xq, sq), ref.forward(xq, sq), rtol=0, atol=0)
    st = tr.stats()
    assert st["rows_trained"] == 120 and st["steps"] == 12 and st["rows_skipped"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_caller_may_reuse_buffers_immediately(device):
    gen = torch.Generator().manual_seed(1)
    tr = esamp.Trainer(H, R, L, S, device=device, ring_rows=32, ring_segments=3)
    ref = esamp.Distiller(H, R, L, S, device=device)
    x = torch.empty(8, H, device=device)
    t = torch.empty(8, H, device=device)
    s = torch.empty(8, dtype=torch.int64, device=device)
    for _ in range(10):
        xn, tn, sn = _batch(gen, 8, device)
        x.copy_(xn), t.copy_(tn), s.copy_(sn)
        tr.observe(x, t, s)
        ref.train_step(xn, tn, sn)
        x.fill_(float("nan")), t.fill_(1e9), s.fill_(0)  # scribble over the caller's buffers at once
    xq, _, sq = _batch(gen, 6, device)
    torch.testing.assert_close(tr.predict(xq, sq), ref.forward(xq, sq), rtol=0, atol=0)
    assert tr.stats()["rows_skipped"] == 0


def test_state_round_trip_and_mismatch(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tr = esamp.Trainer(H, R, L, S)
    for _ in range(3):
        tr.observe(*_batch(gen, 6, "cpu"))
    sd = tr.state_dict()
    torch.save(sd, tmp_path / "trainer.pt")
    tr2 = esamp.Trainer(H, R, L, S, seed=99)
    tr2.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    xq, _, sq = _batch(gen, 4, "cpu")
    torch.testing.assert_close(tr2.predict(xq, sq), tr.predict(xq, sq), rtol=0, atol=0)
    with pytest.raises(ValueError, match="rank"):
        esamp.Trainer(H, R + 1, L, S).load_state_dict(sd)


def test_concurrent_threads_cpu():
    """Several Python threads observe/predict on their own slots concurrently (also run under TSan)."""
    tr = esamp.Trainer(H, R, L, S, ring_rows=16, ring_segments=2)
    errors = []

    def work(slot):
        try:
            gen = torch.Generator().manual_seed(slot)
            for _ in range(25):
                x = torch.randn(4, H, generator=gen)
                t = torch.randn(4, H, generator=gen)
                ids = torch.full((4,), slot, dtype=torch.int64)
                tr.observe(x, t, ids)
                y = tr.predict(x, ids)
                assert torch.isfinite(y).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(S)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    tr.synchronize()
    assert not errors, errors
    st = tr.stats()
    assert st["rows_trained"] == S * 25 * 4 and st["steps"] == S * 25


def test_bad_input_errors_name_the_argument():
    tr = esamp.Trainer(H, R, L, S, ring_rows=8)
    x = torch.randn(9, H)
    with pytest.raises(RuntimeError, match="ring_rows"):
        tr.observe(x, x, torch.zeros(9, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="x: expected"):
        tr.observe(torch.randn(2, H + 1), torch.randn(2, H + 1), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="slot_ids"):
        tr.observe(torch.randn(2, H), torch.randn(2, H), torch.tensor([0, S]))
    with pytest.raises(RuntimeError, match="slot_ids"):
        tr.reset([-1])
    with pytest.raises(ValueError, match="slots"):
        esamp.Trainer(H, R, L, 0)
    # the trainer is still usable after rejected calls
    tr.observe(torch.randn(2, H), torch.randn(2, H), torch.tensor([0, 1]))
    tr.synchronize()
    assert tr.stats()["rows_trained"] == 2
