"""End-to-end throughput: ESamp vs vanilla sampling through the same generation loop (esamp.hf.generate).

Default workload (issue 4): SmolLM2-135M-Instruct, 4 prompts x n = 16 rows, 128 new tokens, CPU, with no filter
(ESamp uses latent mixing) and with min_p = 0.05 (ESamp uses the fused reweight).  Every run ignores EOS so both
methods do exactly the same number of decode steps over the same rows.

Reported per filter setting and method:
  * tokens/s of each whole run (prefill + decode), median over --repeats runs (methods alternate their order);
  * the median decode-step time over every decode step of every run (>= 20 samples: 127 steps per run);
  * the ESamp / vanilla ratios of both (target >= 0.90), and the trainer counters of the ESamp runs.
A run whose distiller trained zero rows (or skipped any) is reported as FAILED, and the program exits non-zero.

    python bench/bench_e2e.py                       # the default workload
    python bench/bench_e2e.py --repeats 5 --async-trainer --json out.json
    python bench/bench_e2e.py --sweep 1x1,1x8,4x4,8x16 --max-new-tokens 64 --filters 'none;min_p=0.05;top_p=0.9'
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import esamp  # noqa: E402,F401
from esamp import hf, models  # noqa: E402
from esamp.config import ESampConfig  # noqa: E402

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Describe your ideal weekend in a few sentences.",
    "Explain why the sky is blue to a curious child.",
    "Invent a new holiday and describe how people celebrate it.",
]


def parse_filter(spec: str) -> dict:
    if spec in ("none", ""):
        return {}
    out = {}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v) if k.strip() == "top_k" else float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="PATH|FILE.gguf (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--filters", default="none;min_p=0.05", help="';'-separated, e.g. 'none;min_p=0.05;top_k=50'")
    ap.add_argument("--beta", type=float, default=0.25)
    ap.add_argument("--warmup-steps", type=int, default=None)
    ap.add_argument("--async-trainer", action="store_true", help="also run ESamp with esamp.Trainer")
    ap.add_argument("--sweep", default=None,
                    help="comma-separated PROMPTSxN workloads run one after another in this process, e.g. "
                         "'1x1,1x8,4x4,8x16' (overrides --prompts / -n); a summary table ends the output")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    if args.sweep:
        try:
            workloads = [tuple(int(v) for v in w.lower().split("x")) for w in args.sweep.split(",") if w.strip()]
            assert workloads and all(len(w) == 2 and w[0] >= 1 and w[1] >= 1 for w in workloads)
        except (ValueError, AssertionError):
            ap.error(f"--sweep: expected PROMPTSxN pairs such as '1x1,4x16', got {args.sweep!r}")
    else:
        workloads = [(args.prompts, args.n)]
    kw = {"beta": args.beta}
    if args.warmup_steps is not None:
        kw["warmup_steps"] = args.warmup_steps
    methods = {"vanilla": None, "esamp": ESampConfig(**kw)}
    if args.async_trainer:
        methods["esamp-async"] = ESampConfig(async_trainer=True, **kw)

    t0 = time.perf_counter()
    model, tok = models.load(args.model)
    print(f"model {type(model).__name__} loaded in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for cfg in methods.values():   # warm-up: first-call costs out of the timings
        hf.generate(model, tok, PROMPTS[:1], n=2, max_new_tokens=3, esamp=cfg, progress=False)
    print(f"ESamp {methods['esamp'].to_dict()}")

    all_results, failed = [], False
    for n_prompts, n in workloads:
        res, bad = run_workload(model, tok, methods, n_prompts, n, args)
        all_results.append({"prompts": n_prompts, "n": n, "B": n_prompts * n, "results": res})
        failed |= bad
    if len(all_results) > 1:
        print("\nsummary: ESamp / vanilla tokens/s (median of runs)")
        fspecs = [r["filter"] for r in all_results[0]["results"]]
        print(f"  {'prompts x n':<12} {'rows':>5} " + " ".join(f"{f:>14}" for f in fspecs))
        for w in all_results:
            cells = [f"{r['methods']['esamp']['ratio_tokens_per_s']:>14.3f}" for r in w["results"]]
            print(f"  {str(w['prompts']) + ' x ' + str(w['n']):<12} {w['B']:>5} " + " ".join(cells))
    print(f"\nratio = ESamp / vanilla throughput (tokens/s of whole runs; inverse ratio of median decode-step "
          f"time); target >= 0.90.  load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            out = {"args": vars(args), "machine": platform.processor() or platform.machine(),
                   "torch": torch.__version__, "threads": torch.get_num_threads()}
            if len(all_results) == 1:
                out.update({"B": all_results[0]["B"], "results": all_results[0]["results"]})
            else:
                out["workloads"] = all_results
            json.dump(out, f, indent=1)
    if failed:
        print("FAILED: an ESamp run trained no rows (or skipped rows)")
        return 1
    return 0


def run_workload(model, tok, methods, n_prompts: int, n: int, args):
    prompts = (PROMPTS * ((n_prompts + len(PROMPTS) - 1) // len(PROMPTS)))[:n_prompts]
    B, T = len(prompts) * n, args.max_new_tokens
    print(f"\nworkload: {len(prompts)} prompts x n = {n} = {B} rows, {T} new tokens (EOS ignored), "
          f"{args.repeats} runs per method")
    results, failed = [], False
    for fspec in args.filters.split(";"):
        filt = parse_filter(fspec)
        runs = {m: [] for m in methods}
        for r in range(args.repeats):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for m in order:
                out = hf.generate(model, tok, prompts, n=n, max_new_tokens=T, seed=r, esamp=methods[m],
                                  ignore_eos=True, progress=False, **filt)
                runs[m].append(out.stats)
        row = {"filter": fspec, "methods": {}}
        for m, stats in runs.items():
            tps = [s["tokens_per_s"] for s in stats]
            steps = [x for s in stats for x in s["step_times"][1:]]
            entry = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_runs": tps,
                     "decode_step_ms_median": 1e3 * statistics.median(steps), "decode_steps": len(steps),
                     "prefill_s_median": statistics.median(s["prefill_s"] for s in stats),
                     "latent_mixing": stats[0]["latent_mixing"]}
            if m != "vanilla":
                tr = [s["trainer"] for s in stats]
                entry["trainer"] = tr
                entry["warmup_s_median"] = statistics.median(s["warmup_s"] for s in stats)
                bad = [t for t in tr if t["rows_trained"] == 0 or t["rows_skipped"] != 0]
                entry["status"] = "FAILED (rows trained = 0 or rows skipped)" if bad else "ok"
                failed |= bool(bad)
            row["methods"][m] = entry
        van = row["methods"]["vanilla"]
        print(f"\nfilter: {fspec}")
        print(f"  {'method':<12} {'tokens/s':>9} {'ratio':>6} {'step ms':>8} {'ratio':>6} {'prefill s':>9} "
              f"{'warm-up s':>9}  trainer (rows trained / skipped / steps, per run)")
        for m, e in row["methods"].items():
            r_tps = e["tokens_per_s_median"] / van["tokens_per_s_median"]
            r_step = van["decode_step_ms_median"] / e["decode_step_ms_median"]
            e["ratio_tokens_per_s"], e["ratio_step"] = r_tps, r_step
            tr = ", ".join(f"{t['rows_trained']}/{t['rows_skipped']}/{t['steps']}" for t in e.get("trainer", []))
            print(f"  {m:<12} {e['tokens_per_s_median']:>9.1f} {r_tps:>6.3f} {e['decode_step_ms_median']:>8.1f} "
                  f"{r_step:>6.3f} {e['prefill_s_median']:>9.2f} {e.get('warmup_s_median', 0.0):>9.2f}  "
                  f"{tr}{'' if m == 'vanilla' else '  ' + e['status']}")
        results.append(row)
    return results, failed


if __name__ == "__main__":
    sys.exit(main())
