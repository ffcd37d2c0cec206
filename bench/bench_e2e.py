"""End-to-end throughput: ESamp vs vanilla sampling through the same generation loop (esamp.hf.generate), and
against Hugging Face's own `model.generate` (what users run today; the peer a regression must not fall behind).

Default workload (issue 4): SmolLM2-135M-Instruct, 4 prompts x n = 16 rows, 128 new tokens, CPU, with no filter
(ESamp uses latent mixing) and with min_p = 0.05 (ESamp uses the fused reweight).  Every run ignores EOS so both
methods do exactly the same number of decode steps over the same rows.

Methods, interleaved in one process (each repeat runs every method once; the order alternates between repeats):
  hf-generate  transformers' model.generate(do_sample=True, num_return_sequences=n, top_k=0, top_p=1, min_p as
               given, min_new_tokens = max_new_tokens so that EOS does not end rows early); prompts chat-formatted
               and left-padded exactly as esamp.hf.generate encodes them
  vanilla      esamp.hf.generate(esamp=None): plain sampling through esamp's own loop
  esamp        esamp.hf.generate with ESamp (default config)
Reported per filter setting and method:
  * tokens/s of each whole run (prefill + decode), median over --repeats runs (methods alternate their order);
  * wall tokens/s: generated tokens / wall time of the whole call (for every method; the only figure hf-generate
    has, and the one its ratio uses);
  * the median decode-step time over every decode step of every run (>= 20 samples: 127 steps per run);
  * the ESamp / vanilla ratios of both (target >= 0.90), and the trainer counters of the ESamp runs.
A run whose distiller trained zero rows (or skipped any) is reported as FAILED, and the program exits non-zero.

    python bench/bench_e2e.py                       # the default workload
    python bench/bench_e2e.py --repeats 5 --async-trainer --json out.json
    python bench/bench_e2e.py --sweep 1x1,1x8,4x4,8x16 --max-new-tokens 64 --filters 'none;min_p=0.05;top_p=0.9'
    python bench/bench_e2e.py --no-hf-generate      # without the Hugging Face model.generate baseline
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
    ap.add_argument("--no-hf-generate", action="store_true", help="leave out the Hugging Face model.generate baseline")
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
    methods = {} if args.no_hf_generate else {"hf-generate": HF_GENERATE}
    methods.update({"vanilla": None, "esamp": ESampConfig(**kw)})
    if args.async_trainer:
        methods["esamp-async"] = ESampConfig(async_trainer=True, **kw)

    t0 = time.perf_counter()
    model, tok = models.load(args.model)
    print(f"model {type(model).__name__} loaded in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    for cfg in methods.values():   # warm-up: first-call costs out of the timings
        run_method(model, tok, cfg, PROMPTS[:1], n=2, T=3, seed=0, filt={})
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
    print(f"\nratio = method / vanilla throughput (tokens/s of prefill + decode; inverse ratio of median decode-step "
          f"time); target for ESamp >= 0.90.  vs HF = wall tokens/s / hf-generate's wall tokens/s.  load average at "
          f"the end {os.getloadavg()[0]:.2f}")
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
                runs[m].append(run_method(model, tok, methods[m], prompts, n=n, T=T, seed=r, filt=filt))
        row = {"filter": fspec, "methods": {}}
        for m, stats in runs.items():
            tps = [s["tokens_per_s"] for s in stats]
            wall = [s["wall_tokens_per_s"] for s in stats]
            entry = {"tokens_per_s_median": statistics.median(tps), "tokens_per_s_runs": tps,
                     "wall_tokens_per_s_median": statistics.median(wall), "wall_tokens_per_s_runs": wall}
            if m != "hf-generate":
                steps = [x for s in stats for x in s["step_times"][1:]]
                entry.update({"decode_step_ms_median": 1e3 * statistics.median(steps), "decode_steps": len(steps),
                              "prefill_s_median": statistics.median(s["prefill_s"] for s in stats),
                              "latent_mixing": stats[0]["latent_mixing"]})
            if m not in ("vanilla", "hf-generate"):
                tr = [s["trainer"] for s in stats]
                entry["trainer"] = tr
                entry["warmup_s_median"] = statistics.median(s["warmup_s"] for s in stats)
                bad = [t for t in tr if t["rows_trained"] == 0 or t["rows_skipped"] != 0]
                entry["status"] = "FAILED (rows trained = 0 or rows skipped)" if bad else "ok"
                failed |= bool(bad)
            row["methods"][m] = entry
        van = row["methods"]["vanilla"]
        hfg = row["methods"].get("hf-generate")
        print(f"\nfilter: {fspec}")
        print(f"  {'method':<12} {'tokens/s':>9} {'ratio':>6} {'wall t/s':>9} {'vs HF':>6} {'step ms':>8} {'ratio':>6} "
              f"{'prefill s':>9} {'warm-up s':>9}  trainer (rows trained / skipped / steps, per run)")
        for m, e in row["methods"].items():
            e["ratio_tokens_per_s"] = e["tokens_per_s_median"] / van["tokens_per_s_median"]
            e["ratio_vs_hf_generate"] = (e["wall_tokens_per_s_median"] / hfg["wall_tokens_per_s_median"]
                                         if hfg else None)
            vs_hf = f"{e['ratio_vs_hf_generate']:>6.3f}" if hfg else f"{'-':>6}"
            if m == "hf-generate":
                print(f"  {m:<12} {e['tokens_per_s_median']:>9.1f} {e['ratio_tokens_per_s']:>6.3f} "
                      f"{e['wall_tokens_per_s_median']:>9.1f} {vs_hf}  (transformers' own loop: no step times)")
                continue
            e["ratio_step"] = van["decode_step_ms_median"] / e["decode_step_ms_median"]
            tr = ", ".join(f"{t['rows_trained']}/{t['rows_skipped']}/{t['steps']}" for t in e.get("trainer", []))
            print(f"  {m:<12} {e['tokens_per_s_median']:>9.1f} {e['ratio_tokens_per_s']:>6.3f} "
                  f"{e['wall_tokens_per_s_median']:>9.1f} {vs_hf} {e['decode_step_ms_median']:>8.1f} "
                  f"{e['ratio_step']:>6.3f} {e['prefill_s_median']:>9.2f} {e.get('warmup_s_median', 0.0):>9.2f}  "
                  f"{tr}{'' if m == 'vanilla' else '  ' + e['status']}")
        results.append(row)
    return results, failed


HF_GENERATE = "hf-generate"


def run_method(model, tok, method, prompts, *, n, T, seed, filt):
    """One run of a method; returns its stats (esamp.hf.generate's, or the same keys for model.generate), with
    wall_tokens_per_s = generated tokens / wall time of the whole call."""
    t0 = time.perf_counter()
    if method is HF_GENERATE:
        gen = hf_model_generate(model, tok, prompts, n=n, T=T, seed=seed, filt=filt)
        wall = time.perf_counter() - t0
        return {"tokens_per_s": gen / wall, "wall_tokens_per_s": gen / wall, "generated_tokens": gen}
    out = hf.generate(model, tok, prompts, n=n, max_new_tokens=T, seed=seed, esamp=method, ignore_eos=True,
                      progress=False, **filt)
    wall = time.perf_counter() - t0
    st = dict(out.stats)
    st["wall_tokens_per_s"] = st["generated_tokens"] / wall
    return st


@torch.no_grad()
def hf_model_generate(model, tok, prompts, *, n, T, seed, filt) -> int:
    """transformers' model.generate on the same prompts (chat-formatted and left-padded as esamp.hf.generate
    encodes them), n samples each, exactly T new tokens per row.  Returns the number of generated tokens."""
    ids = hf._encode(tok, prompts, chat=True)
    L = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (L - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids])
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, num_return_sequences=n,
                         max_new_tokens=T, min_new_tokens=T, temperature=1.0, top_k=filt.get("top_k", 0),
                         top_p=filt.get("top_p", 1.0),
                         min_p=filt.get("min_p"), pad_token_id=pad)
    new = out.shape[1] - L
    if new != T:
        raise RuntimeError(f"hf-generate: expected {T} new tokens per row, got {new}")
    return out.shape[0] * new


if __name__ == "__main__":
    sys.exit(main())
