"""Runs one offline vLLM engine (``vllm.LLM``) for tests/engine and writes what it produced as JSON.

    python tests/engine/_driver.py SPEC.json OUT.json

SPEC: {"engine": {LLM keyword arguments}, "phases": [[request, ...], ...]} where a request is
{"prompt_token_ids": [...], "params": {SamplingParams keyword arguments}} (optionally "expect_error": true: the
request is submitted on its own and the exception it raises is recorded).  The requests of a phase are submitted
together (one ``generate`` call, so they share batches); phases run one after the other on the same engine.

OUT: {"phases": [[{"outputs": [{"token_ids", "logprobs", "finish_reason"}], "prompt_logprobs"} | {"error":
{"type", "message"}}, ...], ...], "stats": collective_rpc("esamp_stats") after the last phase, "load_s", "run_s"}.
The engine runs in this process; environment variables (VLLM_*, ESAMP_*) come from the caller.
"""
import json
import sys
import time


def _logprobs(lps):
    if lps is None:
        return None
    out = []
    for pos in lps:
        if pos is None:
            out.append(None)
            continue
        out.append({str(tok): float(lp.logprob) for tok, lp in pos.items()})
    return out


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.time()
    from vllm import LLM, SamplingParams
    llm = LLM(**spec["engine"])
    t1 = time.time()
    phases = []
    for phase in spec["phases"]:
        results = [None] * len(phase)
        batch = [(i, r) for i, r in enumerate(phase) if not r.get("expect_error")]
        for i, r in enumerate(phase):
            if r.get("expect_error"):
                try:
                    llm.generate([{"prompt_token_ids": r["prompt_token_ids"]}], SamplingParams(**r["params"]),
                                 use_tqdm=False)
                    results[i] = {"error": None}
                except Exception as e:  # the test checks type and message
                    results[i] = {"error": {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                                            "message": str(e)}}
        if batch:
            outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for _, r in batch],
                                [SamplingParams(**r["params"]) for _, r in batch], use_tqdm=False)
            for (i, _), o in zip(batch, outs):
                results[i] = {"outputs": [{"token_ids": list(c.token_ids), "logprobs": _logprobs(c.logprobs),
                                           "finish_reason": c.finish_reason} for c in o.outputs],
                              "prompt_logprobs": _logprobs(o.prompt_logprobs)}
        phases.append(results)
    t2 = time.time()
    try:
        stats = llm.collective_rpc("esamp_stats")
    except Exception as e:  # no esamp plugin in this engine (VLLM_PLUGINS="")
        stats = {"error": f"{type(e).__name__}: {e}"}
    with open(out_path, "w") as f:
        json.dump({"phases": phases, "stats": stats, "load_s": t1 - t0, "run_s": t2 - t1}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
