"""CPU benchmark of esamp.ops.reweight against the PyTorch composition an engine would write.

    PYTHONPATH=python python bench/bench_reweight.py [--reps 30] [--warmup 3] [--wdtype f32|bf16]
                                                     [--threads N] [--no-compile] [--cases abc]

Problem: B = 64 rows, V = 49152, H = 576 (SmolLM2-135M's LM head), beta = 0.25, T = 1.
LM-like logits (same recipe as bench/cpp/bench_reweight_cpu.cpp): each row is a 2 * N(0, 1) background
over the vocabulary plus a Zipf-shaped head on 256 random tokens, head_j = s - a ln(j) with s ~ U(12, 18)
and a ~ U(1, 2.5) per row, so rows range from peaked (a few candidates) to flat (thousands of candidates
under top-p 0.9); the candidate-set sizes are printed with the timings.  W ~ N(0, 0.05^2), pred ~ N(0, 1).
Cases: (a) min_p = 0.05, (b) top_p = 0.9, (c) no filter.

Implementations timed (all return tokens and logprobs of the same distribution; the baselines draw their
Gumbel noise from torch.rand instead of the Philox stream, which costs them less, not more):
  esamp     esamp.ops.reweight (fused: filters from z alone, candidate-only dot products, Philox Gumbel-max)
  eager     esamp.reference.sampling.reweight_eager: min-p mask, one sort for top-k/top-p (skipped when no
            row uses them), dense d = pred @ W.T, mix, Gumbel-max, log_softmax
  compiled  torch.compile(eager) (inductor, CPU), when it compiles on this machine
Each timing: median of --reps runs after --warmup runs, with p10 / p90 and the median CPU time of the process;
ratio = baseline median / esamp median.  The load average is printed before and after: on a shared machine,
compare the CPU-time ratios as well.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import esamp  # noqa: E402
from esamp.reference.sampling import reweight_eager  # noqa: E402


def make_problem(B, V, H, wdtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2.0
    for r in range(B):
        s = 12.0 + 6.0 * torch.rand((), generator=g).item()
        a = 1.0 + 1.5 * torch.rand((), generator=g).item()
        head = torch.randperm(V, generator=g)[:256]
        logits[r, head] = s - a * torch.log(torch.arange(1, 257, dtype=torch.float32))
    pred = torch.randn(B, H, generator=g)
    W = (torch.randn(V, H, generator=g) * 0.05).to(wdtype)
    return logits, pred, W


def timeit(fn, reps, warmup):
    """(wall median, wall p10, wall p90, CPU-time median).  CPU time = time.process_time() of this process
    (all its threads): on a shared machine it shows the work done, independent of waiting for a core."""
    for _ in range(warmup):
        fn()
    ts, cs = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(round(f * (len(ts) - 1))))]  # noqa: E731
    return statistics.median(ts), q(0.1), q(0.9), statistics.median(cs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--wdtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--cases", default="abc")
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--H", type=int, default=576)
    args = ap.parse_args()
    if args.reps < 20:
        ap.error("--reps must be >= 20")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    B, V, H = args.B, args.V, args.H
    wdtype = torch.float32 if args.wdtype == "f32" else torch.bfloat16
    logits, pred, W = make_problem(B, V, H, wdtype)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"bench_reweight: B={B} V={V} H={H} W={args.wdtype} beta=0.25 T=1 | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs | median of {args.reps} after {args.warmup} "
          f"warm-up (p10 / p90)")

    full = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt)  # noqa: E731
    beta, temp = full(0.25), full(1.0)
    seed = esamp.ops.derive_row_seeds(0, B)
    compiled = None
    if not args.no_compile:
        compiled = torch.compile(reweight_eager, dynamic=False)

    cases = {"a": ("(a) min_p=0.05", dict(min_p=0.05)), "b": ("(b) top_p=0.9", dict(top_p=0.9)),
             "c": ("(c) no filter", dict())}
    for key in args.cases:
        name, filt = cases[key]
        top_k = torch.zeros(B, dtype=torch.int64)
        top_p = full(filt.get("top_p", 1.0))
        min_p = full(filt.get("min_p", 0.0))
        flags = dict(use_top_k=False, use_top_p="top_p" in filt, use_min_p="min_p" in filt)
        step = torch.zeros(B, dtype=torch.int64)

        def run_esamp():
            step.add_(1)  # a new decode step each call, as in a real loop
            return esamp.ops.reweight(logits, pred, W, beta=beta, temperature=temp, top_k=top_k, top_p=top_p,
                                      min_p=min_p, seed=seed, step=step)

        def run_eager():
            return reweight_eager(logits, pred, W, None, beta, temp, top_k, top_p, min_p, **flags)

        mixed = esamp.ops.reweight_logits(logits, pred, W, beta=beta, temperature=temp, top_k=top_k, top_p=top_p,
                                          min_p=min_p)
        sizes = torch.isfinite(mixed).sum(dim=1).float()
        print(f"{name}: |C| median {sizes.median().item():.0f}, mean {sizes.mean().item():.0f}, "
              f"min {sizes.min().item():.0f}, max {sizes.max().item():.0f}")
        t_es = timeit(run_esamp, args.reps, args.warmup)
        rows = [("esamp", t_es)]
        rows.append(("eager", timeit(run_eager, args.reps, args.warmup)))
        if compiled is not None:
            try:
                t0 = time.perf_counter()
                compiled(logits, pred, W, None, beta, temp, top_k, top_p, min_p, **flags)
                ct = time.perf_counter() - t0
                rows.append(("compiled", timeit(
                    lambda: compiled(logits, pred, W, None, beta, temp, top_k, top_p, min_p, **flags),
                    args.reps, args.warmup)))
                print(f"  (torch.compile: first call incl. compilation {ct:.1f} s)")
            except Exception as e:  # report, do not hide
                print(f"  torch.compile baseline failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for label, (med, p10, p90, cpu) in rows:
            ratio = "" if label == "esamp" else f"   ratio {med / t_es[0]:7.2f}x (CPU time {cpu / t_es[3]:6.2f}x)"
            print(f"  {label:9s} median {med * 1e3:9.3f} ms   p10 {p10 * 1e3:9.3f}   p90 {p90 * 1e3:9.3f}   "
                  f"CPU {cpu * 1e3:9.3f} ms{ratio}")
        base = min(r[1][0] for r in rows[1:])
        print(f"  esamp vs strongest baseline (wall medians): {base / t_es[0]:.2f}x faster")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
