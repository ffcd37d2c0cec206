"""esamp.hf.generate: what the distiller learns from, checked independently; row compaction, stop strings and
in-loop base-model log-probabilities.

The independent check (issue: "what the distiller learns from in the Hugging Face path") recomputes x (output of
decoder layer `source_layer`) and t (final-norm output = LM-head input) for every prompt and generated sequence with
the model's own ``output_hidden_states`` on an unpadded, uncached forward pass, and compares them with the rows
ESamp received: the warm-start rows at prefill (every prompt position), the prefill update (last prompt position,
one row per prompt) and every decode step (the rows still running, in row order) -- with left padding, n > 1,
rows stopping early and the batch being compacted."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from esamp import hf, metrics  # noqa: E402
from esamp.config import ESampConfig  # noqa: E402
from esamp.sampler import ESamp  # noqa: E402
from test_hf import PROMPTS, make_model, make_tokenizer  # noqa: E402


class Recorder(ESamp):
    """An ESamp that records the (x, t, slot) rows handed to its warm start and updates."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.warm, self.updates = [], []

    def warm_start(self, x, t, slot_ids, steps=None):
        self.warm.append((x.detach().clone(), t.detach().clone(), slot_ids.clone()))
        return super().warm_start(x, t, slot_ids, steps)

    def update(self, x, t, slot_ids):
        self.updates.append((x.detach().clone(), t.detach().clone(), slot_ids.clone()))
        return super().update(x, t, slot_ids)


def reference_xt(model, ids, source_layer):
    """x and t at every position of one unpadded sequence, from output_hidden_states (no hooks of ours)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    hs = out.hidden_states
    n_layers = len(hf.find_decoder_layers(model))
    assert len(hs) == n_layers + 1
    layer = source_layer % n_layers
    # hidden_states[i] is the input of decoder layer i (the output of layer i - 1); the last entry is the output of
    # the final norm, i.e. the LM-head input
    x = hs[layer + 1][0] if layer + 1 < n_layers else None
    return x, hs[-1][0]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("source_layer", [0, 1])
def test_rows_the_distiller_learns_from_match_an_independent_computation(family, source_layer):
    model = make_model(family, seed=3)
    tok = make_tokenizer()
    cfg = ESampConfig(rank=8, warmup_steps=2, source_layer=source_layer)
    n, T = 3, 9
    # a stop token that some rows sample early, so that rows finish at different steps and the batch compacts
    probe = hf.generate(model, tok, PROMPTS, n=n, max_new_tokens=T, esamp=None, seed=4, chat=False,
                        progress=False, ignore_eos=True)
    stop_tok = probe.token_ids[1][0][3]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop_tok
    es = Recorder(cfg, hidden_size=32, slots=len(PROMPTS), gamma_init=hf.find_final_norm(model))
    try:
        out = hf.generate(model, tok, PROMPTS, n=n, max_new_tokens=T, esamp=es, seed=4, chat=False,
                          progress=False)
    finally:
        model.generation_config.eos_token_id = old
    lens = [len(ids) for g in out.token_ids for ids in g]
    assert min(lens) < T and max(lens) == T            # some rows stopped early, some ran to the end
    assert out.stats["compactions"] >= 1

    P = len(PROMPTS)
    prompt_ids = out.prompt_token_ids
    assert len({len(p) for p in prompt_ids}) > 1         # left padding was needed
    ref = {}
    for p in range(P):
        for j in range(n):
            seq = prompt_ids[p] + out.token_ids[p][j]
            ref[p, j] = reference_xt(model, seq, source_layer)

    def close(a, b):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()

    # warm start: every prompt position of every prompt, prompt-major, slot of the prompt
    assert len(es.warm) == 1
    wx, wt, ws = es.warm[0]
    r = 0
    for p in range(P):
        L = len(prompt_ids[p])
        x_ref, t_ref = ref[p, 0]
        close(wx[r:r + L], x_ref[:L])
        close(wt[r:r + L], t_ref[:L])
        assert ws[r:r + L].tolist() == [ws[r].item()] * L
        r += L
    assert r == wx.shape[0]
    # prefill update: one row per prompt, the last prompt position
    ux, ut, us = es.updates[0]
    assert ux.shape[0] == P
    for p in range(P):
        L = len(prompt_ids[p])
        close(ux[p], ref[p, 0][0][L - 1])
        close(ut[p], ref[p, 0][1][L - 1])
    slots = us.tolist()
    # decode step k: every row with more than k generated tokens, in row order, at position len(prompt) - 1 + k
    assert len(es.updates) == max(lens)
    for k in range(1, max(lens)):
        ux, ut, us = es.updates[k]
        running = [(p, j) for p in range(P) for j in range(n) if len(out.token_ids[p][j]) > k]
        assert ux.shape[0] == len(running) > 0
        for i, (p, j) in enumerate(running):
            pos = len(prompt_ids[p]) - 1 + k
            close(ux[i], ref[p, j][0][pos])
            close(ut[i], ref[p, j][1][pos])
            assert us[i].item() == slots[p]


def test_compaction_changes_no_token():
    model = make_model("llama", seed=5)
    tok = make_tokenizer()
    probe = hf.generate(model, tok, PROMPTS, n=4, max_new_tokens=10, esamp=None, seed=1, chat=False,
                        progress=False, ignore_eos=True)
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = probe.token_ids[0][1][2]
    try:
        for es in (None, ESampConfig(rank=8, warmup_steps=2)):
            kw = dict(n=4, max_new_tokens=10, esamp=es, seed=1, chat=False, progress=False)
            a = hf.generate(model, tok, PROMPTS, compact=True, **kw)
            b = hf.generate(model, tok, PROMPTS, compact=False, **kw)
            assert a.stats["compactions"] >= 1 and b.stats["compactions"] == 0
            assert a.token_ids == b.token_ids and a.texts == b.texts
            for ga, gb in zip(a.logprobs, b.logprobs):
                for la, lb in zip(ga, gb):
                    assert la == pytest.approx(lb, abs=1e-5)
            if es is not None:
                assert a.stats["trainer"]["rows_trained"] == b.stats["trainer"]["rows_trained"]
        # with a filter (fused reweight path) as well
        kw = dict(n=4, max_new_tokens=10, esamp=ESampConfig(rank=8, warmup_steps=2), seed=1, chat=False,
                  progress=False, min_p=0.05)
        a = hf.generate(model, tok, PROMPTS, compact=True, **kw)
        b = hf.generate(model, tok, PROMPTS, compact=False, **kw)
        assert a.token_ids == b.token_ids
    finally:
        model.generation_config.eos_token_id = old


def test_stop_strings_end_rows_and_cut_the_text():
    model = make_model("qwen2", seed=6)
    tok = make_tokenizer()
    full = hf.generate(model, tok, PROMPTS, n=2, max_new_tokens=10, esamp=None, seed=3, chat=False, progress=False,
                       ignore_eos=True)
    word = tok.decode([full.token_ids[0][0][4]], skip_special_tokens=True).strip()
    out = hf.generate(model, tok, PROMPTS, n=2, max_new_tokens=10, esamp=None, seed=3, chat=False, progress=False,
                      ignore_eos=True, stop=[word])
    for p in range(len(PROMPTS)):
        for j in range(2):
            ref = full.token_ids[p][j]
            texts = [tok.decode([t], skip_special_tokens=True) for t in ref]
            first = next((i for i, s in enumerate(texts) if word in s), None)
            want = ref if first is None else ref[:first + 1]
            assert out.token_ids[p][j] == want
            assert word not in out.texts[p][j]
    assert len(out.token_ids[0][0]) == 5 or word in tok.decode(full.token_ids[0][0][:4])
    with pytest.raises(ValueError, match="stop"):
        hf.generate(model, tok, PROMPTS, stop=[""], chat=False, progress=False)


@pytest.mark.parametrize("kw", [dict(esamp=None), dict(esamp=ESampConfig(rank=8, warmup_steps=2)),
                                dict(esamp=ESampConfig(rank=8, warmup_steps=2), min_p=0.05),
                                dict(esamp=None, temperature=0.7, top_k=5)])
def test_base_logprobs_equal_a_scoring_pass(kw):
    model = make_model("llama", seed=7)
    tok = make_tokenizer()
    out = hf.generate(model, tok, PROMPTS, n=3, max_new_tokens=8, seed=2, chat=False, progress=False,
                      base_logprobs=True, ignore_eos=True, **kw)
    prompts, comps = [], []
    for p, g in enumerate(out.token_ids):
        for ids in g:
            prompts.append(out.prompt_token_ids[p])
            comps.append(ids)
    ppl = metrics.perplexity(model, prompts, comps, pad_id=0, batch_size=4)
    got = [lp for g in out.base_logprobs for lp in g]
    for i, lp in enumerate(got):
        assert len(lp) == len(comps[i])
        assert -sum(lp) == pytest.approx(ppl["nll"][i], rel=1e-4, abs=1e-4)
    if kw.get("esamp") is not None:
        # the sampled distribution differs from the base model's, so the two logprob streams differ
        assert any(abs(a - b) > 1e-3 for g1, g2 in zip(out.logprobs, out.base_logprobs)
                   for l1, l2 in zip(g1, g2) for a, b in zip(l1, l2))
    assert all(math.isfinite(v) and v <= 0 for lp in got for v in lp)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_preallocated_kv_cache_gives_the_same_results_as_dynamic_cache(family, monkeypatch):
    from transformers import DynamicCache

    model = make_model(family, seed=8)
    tok = make_tokenizer()
    kw = dict(n=3, max_new_tokens=12, esamp=ESampConfig(rank=8, warmup_steps=2), seed=9, chat=False, progress=False)
    a = hf.generate(model, tok, PROMPTS, **kw)
    monkeypatch.setattr(hf, "_growing_cache", lambda model, capacity: DynamicCache(config=model.config))
    b = hf.generate(model, tok, PROMPTS, **kw)
    assert a.token_ids == b.token_ids
    for ga, gb in zip(a.logprobs, b.logprobs):
        for la, lb in zip(ga, gb):
            assert la == pytest.approx(lb, abs=1e-5)


@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_bfloat16_model_end_to_end(min_p):
    """A bf16 model through generate: ESamp trains (fp32 master weights), beta = 0 equals vanilla token for token,
    base log-probabilities are finite."""
    model = make_model("qwen2", seed=10).to(torch.bfloat16)
    tok = make_tokenizer()
    kw = dict(n=3, max_new_tokens=8, seed=11, chat=False, progress=False, min_p=min_p, base_logprobs=True)
    es = hf.make_sampler(model, ESampConfig(rank=8, warmup_steps=2))
    out = hf.generate(model, tok, PROMPTS, esamp=es, **kw)
    assert out.stats["trainer"]["rows_trained"] > 0 and out.stats["trainer"]["rows_skipped"] == 0
    sd = es.distiller.slot_state_dict(0)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert all(math.isfinite(v) for g in out.base_logprobs for lp in g for v in lp)
    van = hf.generate(model, tok, PROMPTS, esamp=None, **kw)
    zero = hf.generate(model, tok, PROMPTS, esamp=ESampConfig(beta=0.0, rank=8, warmup_steps=2), **kw)
    assert zero.token_ids == van.token_ids
    assert out.token_ids != van.token_ids


@pytest.mark.parametrize("min_p", [0.0, 0.05])
def test_experimental_gates(min_p):
    """explore_tokens / gate_rel_err: a gate that closes everywhere gives vanilla's tokens; one that never closes
    gives plain ESamp's; the explore window mixes exactly the first tokens."""
    model = make_model("llama", seed=12)
    tok = make_tokenizer()
    kw = dict(n=3, max_new_tokens=8, seed=13, chat=False, progress=False, min_p=min_p, ignore_eos=True)
    cfg = ESampConfig(beta=1.0, rank=8, warmup_steps=2)
    van = hf.generate(model, tok, PROMPTS, esamp=None, **kw)
    plain = hf.generate(model, tok, PROMPTS, esamp=cfg, **kw)
    assert plain.token_ids != van.token_ids
    closed = hf.generate(model, tok, PROMPTS, esamp=cfg.replace(gate_rel_err=1e-12), **kw)
    assert closed.token_ids == van.token_ids
    # the prefill step decides once per prompt (its n rows share the LM-head input), then per row
    assert closed.stats["trainer"]["gated_rows"] == 3 + 9 * 7 and closed.stats["trainer"]["rows_trained"] > 0
    opened = hf.generate(model, tok, PROMPTS, esamp=cfg.replace(gate_rel_err=1e12), **kw)
    assert opened.token_ids == plain.token_ids and opened.stats["trainer"]["gated_rows"] == 0
    assert hf.generate(model, tok, PROMPTS, esamp=cfg.replace(explore_tokens=100), **kw).token_ids == plain.token_ids
    win = hf.generate(model, tok, PROMPTS, esamp=cfg.replace(explore_tokens=3), **kw)
    assert win.stats["trainer"]["gated_rows"] == 9 * 5
    for g_w, g_p in zip(win.token_ids, plain.token_ids):
        for a, b in zip(g_w, g_p):
            assert a[:3] == b[:3]
    assert win.token_ids != plain.token_ids
    with pytest.raises(ValueError, match="explore_tokens"):
        ESampConfig(explore_tokens=-1)
    with pytest.raises(ValueError, match="gate_rel_err"):
        ESampConfig(gate_rel_err=0)
