"""CPU benchmark of esamp.ops.reweight against the PyTorch composition an engine would write.

    PYTHONPATH=python python bench/bench_reweight.py [--reps 30] [--warmup 3] [--wdtype f32|bf16]
                                                     [--threads N] [--no-compile] [--cases abc] [--json FILE]

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
            row uses them), dense d = pred @ W.T over all V tokens, mix, Gumbel-max, log_softmax
  compiled  torch.compile(eager) (inductor, CPU), when it compiles on this machine
  filter-first           what a careful PyTorch user writes (reweight_filter_first below): the same filters
            first, then gather the LM-head rows of the candidates (the union over the batch's rows) and compute only
            those dot products (one [B, H] x [H, |U|] GEMM), mix, Gumbel-max and logprob on the candidates
  filter-first compiled  torch.compile of it (the candidate count is data-dependent: compiled around a graph break)
The speed-up quoted is against the STRONGEST (fastest) baseline of each case.
Each timing: median of --reps rounds after --warmup rounds (every implementation once per round, round-robin),
with p10 / p90 and the median CPU time of the process;
ratio = baseline median / esamp median.  The load average is printed before and after: on a shared machine,
compare the CPU-time ratios as well.
"""
import argparse
import json
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


def candidates(logits, temperature, top_p, min_p, use_min_p, use_top_p):
    """(l, keep): fp32 logits and the candidate mask [B, V] of SPEC 3 (min-p, then top-p on the kept set, from
    z = l / T alone), written as reweight_eager writes them (T > 0 rows only)."""
    l = logits.float()
    z = l / temperature[:, None]
    keep = torch.ones_like(z, dtype=torch.bool)
    if use_min_p:
        keep &= z >= z.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    if use_top_p:
        zs, _ = torch.sort(z.masked_fill(~keep, float("-inf")), dim=-1, descending=True)
        cs = torch.softmax(zs, dim=-1).cumsum(dim=-1)
        n = torch.searchsorted(cs, top_p[:, None].to(cs.dtype)).clamp(max=z.shape[-1] - 1)
        keep &= (z >= zs.gather(1, n)) | (top_p[:, None] >= 1)
    return l, keep


def _filter_first_mixed(logits, pred, W, beta, temperature, top_p, min_p, use_min_p, use_top_p):
    l, keep = candidates(logits, temperature, top_p, min_p, use_min_p, use_top_p)
    cols = keep.any(dim=0).nonzero().squeeze(1)               # union of the rows' candidates
    d = pred.float() @ W.index_select(0, cols).float().t()    # only those dot products: [B, |U|]
    b, T = beta[:, None], temperature[:, None]
    m = ((1 + b) * l.index_select(1, cols) - b * d) / T
    return cols, m.masked_fill(~keep.index_select(1, cols), float("-inf"))


def reweight_filter_first(logits, pred, W, beta, temperature, top_p, min_p, use_min_p=False, use_top_p=False):
    """The baseline a careful PyTorch user writes: filter first, gather the candidates' LM-head rows, dot only
    those, mix, Gumbel-max over the candidates (torch.rand noise), logprob under the mixed distribution.
    Returns (tokens int64 [B], logprobs float32 [B]).  T > 0 rows only (the benchmark's T is 1)."""
    cols, m = _filter_first_mixed(logits, pred, W, beta, temperature, top_p, min_p, use_min_p, use_top_p)
    g = -torch.log(-torch.log(torch.rand(m.shape).clamp_(min=1e-10)))
    j = torch.argmax(m + g, dim=-1)
    lp = torch.log_softmax(m, dim=-1).gather(1, j[:, None])[:, 0]
    return cols[j], lp


def reweight_logits_filter_first(logits, pred, W, beta, temperature, top_p, min_p, use_min_p=False,
                                 use_top_p=False):
    """Masked mixed logits [B, V] (-inf off the candidates), computed filter-first as above."""
    cols, m = _filter_first_mixed(logits, pred, W, beta, temperature, top_p, min_p, use_min_p, use_top_p)
    out = torch.full(logits.shape, float("-inf"), dtype=torch.float32)
    out[:, cols] = m
    return out


def time_round_robin(fns, reps, warmup):
    """{name: (wall median, wall p10, wall p90, CPU-time median)} of every callable.  The callables run round-robin
    (one call of each per round), so that on a shared machine they all see the same background load.  CPU time =
    time.process_time() of this process (all its threads): the work done, independent of waiting for a core."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    cs = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
            cs[k].append(time.process_time() - c0)
    out = {}
    for k in fns:
        v = sorted(ts[k])
        q = lambda f: v[min(len(v) - 1, int(round(f * (len(v) - 1))))]  # noqa: E731
        out[k] = (statistics.median(v), q(0.1), q(0.9), statistics.median(cs[k]))
    return out


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
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.reps < 20:
        ap.error("--reps must be >= 20")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    B, V, H = args.B, args.V, args.H
    wdtype = torch.float32 if args.wdtype == "f32" else torch.bfloat16
    logits, pred, W = make_problem(B, V, H, wdtype)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results = {"command": " ".join(["bench/bench_reweight.py"] + sys.argv[1:]), "B": B, "V": V, "H": H,
               "wdtype": args.wdtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "loadavg_before": os.getloadavg(), "cases": []}
    print(f"bench_reweight: B={B} V={V} H={H} W={args.wdtype} beta=0.25 T=1 | torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs | median of {args.reps} after {args.warmup} "
          f"warm-up (p10 / p90)")

    full = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt)  # noqa: E731
    beta, temp = full(0.25), full(1.0)
    seed = esamp.ops.derive_row_seeds(0, B)
    compiled = compiled_ff = None
    if not args.no_compile:
        compiled = torch.compile(reweight_eager, dynamic=False)
        compiled_ff = torch.compile(reweight_filter_first)

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
        ff_args = (logits, pred, W, beta, temp, top_p, min_p, "min_p" in filt, "top_p" in filt)
        # the baseline computes the same distribution: same candidate sets, same mixed logits on them
        _, m_ff = _filter_first_mixed(*ff_args)
        assert torch.equal(torch.isfinite(m_ff).sum(1), torch.isfinite(mixed).sum(1)), "filter-first: candidate sets"
        fns = {"esamp": run_esamp, "eager": run_eager, "filter-first": lambda: reweight_filter_first(*ff_args)}
        for label, fn, fargs in (("compiled", compiled, (logits, pred, W, None, beta, temp, top_k, top_p, min_p)),
                                 ("ff-compiled", compiled_ff, ff_args)):
            if fn is None:
                continue
            kw = flags if label == "compiled" else {}
            try:
                t0 = time.perf_counter()
                fn(*fargs, **kw)
                print(f"  ({label}: first call incl. compilation {time.perf_counter() - t0:.1f} s)")
                fns[label] = lambda fn=fn, fargs=fargs, kw=kw: fn(*fargs, **kw)
            except Exception as e:  # report, do not hide
                print(f"  {label} baseline failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        timed = time_round_robin(fns, args.reps, args.warmup)
        t_es = timed["esamp"]
        rows = list(timed.items())
        results["cases"].append({"case": name, "candidates_mean": sizes.mean().item(),
                                 "candidates_median": sizes.median().item(),
                                 "timings": {k: {"median_s": v[0], "p10_s": v[1], "p90_s": v[2], "cpu_median_s": v[3]}
                                             for k, v in timed.items()}})
        for label, (med, p10, p90, cpu) in rows:
            ratio = "" if label == "esamp" else f"   ratio {med / t_es[0]:7.2f}x (CPU time {cpu / t_es[3]:6.2f}x)"
            print(f"  {label:12s} median {med * 1e3:9.3f} ms   p10 {p10 * 1e3:9.3f}   p90 {p90 * 1e3:9.3f}   "
                  f"CPU {cpu * 1e3:9.3f} ms{ratio}")
        best = min(rows[1:], key=lambda r: r[1][0])
        results["cases"][-1].update({"strongest_baseline": best[0], "ratio": best[1][0] / t_es[0],
                                     "ratio_cpu": best[1][3] / t_es[3]})
        print(f"  esamp vs strongest baseline ({best[0]}, wall medians): {best[1][0] / t_es[0]:.2f}x faster "
              f"(CPU time {best[1][3] / t_es[3]:.2f}x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    results["loadavg_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
