"""esamp.ESampConfig and the engine-agnostic sampler state esamp.sampler.ESamp."""
import math

import pytest
import torch

import esamp  # noqa: F401  (loads the operators)
from esamp import ops
from esamp.config import ESampConfig
from esamp.sampler import ESamp, filters_active, row_seeds, sample_tokens

H, V = 24, 50


# ------------------------------------------------------------------------------------------------ config
def test_config_defaults():
    c = ESampConfig()
    assert (c.beta, c.mode, c.layers, c.lr, c.adam_eps, c.clip, c.source_layer) == (0.25, "per_prompt", 2, 4e-4,
                                                                                     1e-4, 0.5, 0)
    assert c.effective_rank == 64 and ESampConfig(mode="shared").effective_rank == 384
    assert ESampConfig(rank=8).effective_rank == 8
    assert c.async_trainer is False and c.slots is None and c.dtype is None
    assert ESampConfig(dtype="bf16").dtype is torch.bfloat16
    d = c.replace(beta=0.5).to_dict()
    assert d["beta"] == 0.5 and d["rank"] == 64 and d["dtype"] is None


@pytest.mark.parametrize("field,value", [
    ("beta", -0.1), ("beta", float("nan")), ("beta", float("inf")), ("beta", "0.25"), ("beta", True),
    ("mode", "per_request"), ("rank", 0), ("rank", 2.0), ("layers", 0), ("lr", -1.0), ("lr", float("nan")),
    ("adam_eps", 0.0), ("clip", 0.0), ("clip", float("nan")), ("slots", 0), ("source_layer", 1.5),
    ("warmup_steps", -1), ("warmup_steps", 2.0), ("dtype", torch.int32), ("dtype", "float64"), ("dtype", ["bf16"]),
    ("async_trainer", 1), ("init_seed", "0"),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError) as e:
        ESampConfig(**{field: value})
    assert f"ESampConfig.{field}" in str(e.value) and "expected" in str(e.value) and repr(value) in str(e.value)


def test_config_shared_mode_needs_one_slot():
    with pytest.raises(ValueError, match="slots"):
        ESampConfig(mode="shared", slots=4)
    assert ESampConfig(mode="shared", slots=1).slots == 1


def test_config_is_frozen():
    with pytest.raises(Exception):
        ESampConfig().beta = 1.0


# ------------------------------------------------------------------------------------------------ helpers
def test_filters_active():
    assert not filters_active(vocab_size=V)
    assert not filters_active(top_k=V, vocab_size=V) and not filters_active(top_k=-1, vocab_size=V)
    assert filters_active(top_k=5, vocab_size=V)
    assert filters_active(top_p=0.9, vocab_size=V)
    assert filters_active(min_p=0.01, vocab_size=V)
    assert filters_active(min_p=torch.tensor([0.0, 0.1]), vocab_size=V)
    assert not filters_active(min_p=torch.tensor([0.0, 0.0]), vocab_size=V)


def test_row_seeds_distinct_and_prefix_stable():
    s = row_seeds(7, 64)
    assert s.dtype == torch.int64 and s.unique().numel() == 64
    assert torch.equal(row_seeds(7, 8), s[:8])
    assert not torch.equal(row_seeds(8, 8), s[:8])


def _problem(B=6, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, H, generator=g) * (scale / math.sqrt(H))
    t = torch.randn(B, H, generator=g)
    t_hat = t + 0.7 * torch.randn(B, H, generator=g)
    return W, t, t_hat


def _sampler(config=None, slots=2, H_=H, **kw):
    return ESamp(config or ESampConfig(rank=4, warmup_steps=3), hidden_size=H_, slots=slots, **kw)


def test_latent_mixing_equals_fused_reweight():
    """No filter: sampling from W mix(t, t_hat) at beta = 0 == the fused reweight of W t with t_hat (same seeds)."""
    W, t, t_hat = _problem(B=64)
    es = _sampler(ESampConfig(beta=0.5, rank=4))
    seeds = row_seeds(3, 64)
    for T in (1.0, 0.7):
        h = es.mix(t, t_hat, T)
        torch.testing.assert_close(h, 1.5 * t - 0.5 * t_hat)
        tok_l, lp_l = es.sample(h @ W.T, t_hat, W, latent_mixed=True, temperature=T, seeds=seeds, step=5)
        tok_f, lp_f = es.sample(t @ W.T, t_hat, W, latent_mixed=False, temperature=T, seeds=seeds, step=5)
        assert torch.equal(tok_l, tok_f)
        torch.testing.assert_close(lp_l, lp_f, rtol=0, atol=1e-4)


def test_beta_zero_sample_is_vanilla_and_greedy_rows_are_unchanged():
    W, t, t_hat = _problem(B=16)
    logits = t @ W.T
    seeds = row_seeds(0, 16)
    es0 = _sampler(ESampConfig(beta=0.0, rank=4))
    van = sample_tokens(logits, W, temperature=1.0, min_p=0.02, seeds=seeds, step=2)
    got = es0.sample(logits, t_hat, W, latent_mixed=False, temperature=1.0, min_p=0.02, seeds=seeds, step=2)
    assert torch.equal(van[0], got[0]) and torch.equal(van[1], got[1])
    # greedy rows: argmax of the reference logits whatever beta (SPEC 3.1), also through latent mixing
    es = _sampler(ESampConfig(beta=2.0, rank=4))
    T = torch.tensor([0.0, 1.0] * 8)
    tok, lp = es.sample(logits, t_hat, W, latent_mixed=False, temperature=T, seeds=seeds)
    assert torch.equal(tok[T == 0], logits.argmax(-1)[T == 0]) and torch.all(lp[T == 0] == 0)
    h = es.mix(t, t_hat, T)
    assert torch.equal(h[T == 0], t[T == 0])
    assert torch.equal(es.row_betas(T, 16, "cpu"), torch.where(T > 0, 2.0, 0.0))


def test_esamp_shifts_mass_along_the_prediction_error():
    """Tokens aligned with t - t_hat gain probability: mixed logits minus reference logits = beta W (t - t_hat)."""
    W, t, t_hat = _problem(B=4)
    es = _sampler(ESampConfig(beta=0.25, rank=4))
    m = ops.reweight_logits(t @ W.T, t_hat, W, beta=0.25)
    torch.testing.assert_close(m - t @ W.T, 0.25 * (t - t_hat) @ W.T, rtol=1e-4, atol=1e-4)
    assert es.latent_mixing(vocab_size=V) and not es.latent_mixing(min_p=0.1, vocab_size=V)


# ------------------------------------------------------------------------------------------------ slots
def test_acquire_resets_slot_and_release_frees_it():
    es = _sampler(slots=2)
    fresh = _sampler(slots=2)
    a = es.acquire("a")
    b = es.acquire("b")
    assert {a, b} == {0, 1} and es.active_requests == 2
    with pytest.raises(RuntimeError, match="in use"):
        es.acquire("c")
    with pytest.raises(ValueError, match="already active"):
        es.acquire("a")
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, H, generator=g), torch.randn(8, H, generator=g)
    for _ in range(5):
        es.update(x, t, torch.full((8,), a))
    assert not _same_state(es.distiller.slot_state_dict(a), fresh.distiller.slot_state_dict(a))
    es.release("a")
    with pytest.raises(KeyError):
        es.release("a")
    a2 = es.acquire("a2")
    assert a2 == a
    # the re-used slot holds the initial parameters and optimizer state again
    assert _same_state(es.distiller.slot_state_dict(a2), fresh.distiller.slot_state_dict(a2))
    assert int(es.distiller.step[a2]) == 0 and float(es.distiller.exp_avg[a2].abs().sum()) == 0.0
    # predictions of the reset slot equal a fresh bank's
    torch.testing.assert_close(es.predict(x, torch.full((8,), a2)), fresh.predict(x, torch.full((8,), a2)),
                               rtol=0, atol=0)


def _same_state(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items())


def test_shared_mode_keeps_learning_across_requests():
    es = _sampler(ESampConfig(mode="shared", rank=4))
    init = es.distiller.slot_state_dict(0)
    assert es.slots == 1
    assert es.acquire("a") == 0 and es.acquire("b") == 0
    x, t = torch.randn(4, H), torch.randn(4, H)
    for _ in range(3):
        es.update(x, t, torch.zeros(4, dtype=torch.long))
    trained = es.distiller.slot_state_dict(0)
    assert not _same_state(trained, init)
    es.release("a")
    es.release("b")
    assert es.acquire("c") == 0
    assert _same_state(es.distiller.slot_state_dict(0), trained)   # a new request does not reset it
    es.reset()
    assert _same_state(es.distiller.slot_state_dict(0), init)


def test_ensure_slots_grows_or_refuses():
    es = _sampler(slots=1)
    es.ensure_slots(3)
    assert es.slots == 3
    es.acquire("a")
    with pytest.raises(RuntimeError, match="active"):
        es.ensure_slots(5)
    fixed = _sampler(ESampConfig(rank=4, slots=2))
    with pytest.raises(ValueError, match="ESampConfig.slots = 2"):
        fixed.ensure_slots(3)


# ------------------------------------------------------------------------------------------------ training
def test_warm_start_trains_and_lowers_the_loss():
    g = torch.Generator().manual_seed(2)
    es = _sampler(ESampConfig(rank=8, lr=3e-3, warmup_steps=40), slots=2)
    x = torch.randn(12, H, generator=g)
    t = torch.tanh(x @ torch.randn(H, H, generator=g) / math.sqrt(H)) * 2.0
    slots = torch.tensor([0] * 6 + [1] * 6)
    first = es.warm_start(x, t, slots, steps=1).clone()
    last = es.warm_start(x, t, slots)
    assert torch.all(torch.isfinite(first)) and torch.all(last < first)
    st = es.stats()
    assert st["rows_trained"] == 12 * 41 and st["rows_skipped"] == 0 and st["warmup_steps"] == 41
    assert es.warm_start(x, t, slots, steps=0) is None and es.stats()["rows_trained"] == 12 * 41


def test_step_convenience_trains_one_step_per_call():
    W, t, _ = _problem(B=6)
    es = _sampler(ESampConfig(rank=4, beta=0.5))
    x = torch.randn(6, H)
    slots = torch.tensor([0, 0, 0, 1, 1, 1])
    tok, lp = es.step(x, t, slots, lambda h: h @ W.T, W, seeds=row_seeds(0, 6), step=0)
    assert tok.shape == (6,) and torch.all(lp <= 0)
    tok2, _ = es.step(x, t, slots, lambda h: h @ W.T, W, min_p=0.05, seeds=row_seeds(0, 6), step=1)
    assert es.stats()["rows_trained"] == 12 and es.stats()["decode_steps"] == 2


def test_dtype_casts_rows_for_the_distiller():
    es = _sampler(ESampConfig(rank=4, dtype=torch.bfloat16))
    y = es.predict(torch.randn(3, H), torch.zeros(3, dtype=torch.long))
    assert y.dtype == torch.bfloat16


def test_async_trainer_matches_synchronous_updates():
    g = torch.Generator().manual_seed(4)
    sync = _sampler(ESampConfig(rank=4, warmup_steps=2))
    asyn = _sampler(ESampConfig(rank=4, warmup_steps=2, async_trainer=True))
    assert asyn.trainer is not None and asyn.distiller is None
    slots = torch.tensor([0, 1, 1])
    for es in (sync, asyn):
        es.acquire("a"), es.acquire("b")
    xw, tw = torch.randn(5, H, generator=g), torch.randn(5, H, generator=g)
    sync.warm_start(xw, tw, torch.tensor([0, 0, 1, 1, 1]))
    asyn.warm_start(xw, tw, torch.tensor([0, 0, 1, 1, 1]))
    for _ in range(4):
        x, t = torch.randn(3, H, generator=g), torch.randn(3, H, generator=g)
        torch.testing.assert_close(asyn.predict(x, slots), sync.predict(x, slots), rtol=0, atol=0)
        sync.update(x, t, slots)
        assert asyn.update(x, t, slots) is None
    assert asyn.stats()["rows_trained"] == sync.stats()["rows_trained"] == 2 * 5 + 4 * 3


def test_async_trainer_ring_grows_with_the_call():
    es = _sampler(ESampConfig(rank=4, async_trainer=True), ring_rows=4)
    es.ensure_slots(2, rows=10)
    assert es.ring_rows == 10
    es.update(torch.randn(10, H), torch.randn(10, H), torch.zeros(10, dtype=torch.long))
    assert es.stats()["rows_trained"] == 10


def test_bad_arguments():
    with pytest.raises(TypeError, match="config"):
        ESamp({"beta": 0.1}, hidden_size=H)
    with pytest.raises(ValueError, match="hidden_size"):
        ESamp(ESampConfig(), hidden_size=0)
    with pytest.raises(TypeError, match="seeds"):
        sample_tokens(torch.zeros(2, V), torch.zeros(V, H), seeds=0)
