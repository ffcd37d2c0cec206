"""Benchmark: one distiller-bank train step (and forward) on the CPU, esamp vs the strongest eager baselines.

Problem (defaults, the paper's shared-distiller shape): B = 64 rows over S = 4 slots (16 rows each),
H = 576, R = 384, L = 2, float32.  Every variant does the same work per step: forward, loss, backward,
per-slot gradient-norm clip (0.5), Adam (lr 4e-4, eps 1e-4) on all S slots.

Baselines (esamp.reference.distiller.BatchedEagerDistiller): parameters as batched [S, ...] tensors,
bmm + autograd + per-slot clip + torch.optim.Adam with
  - default   (torch.optim.Adam(), i.e. the single-tensor for-loop implementation on CPU),
  - foreach   (foreach=True),
  - fused     (fused=True, the fused CPU Adam kernel),
  - optionally (--compile) torch.compile of the batched forward+loss, with fused Adam.
The report gives the median of --iters timed runs after --warmup untimed runs, and the ratio of each
baseline's median to esamp's.

    PYTHONPATH=python python bench/bench_distiller.py [--iters 30] [--threads N] [--compile] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

import esamp
from esamp.reference.distiller import BatchedEagerDistiller


def median_times(fns: dict, warmup: int, iters: int) -> dict:
    """Median wall time of each callable.  The callables run round-robin (one call of each per round) so that
    they all see the same background load on a shared machine."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--rank", type=int, default=384)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--rows-per-slot", type=int, default=16)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the batched forward+loss")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time the phases of the fused-Adam baseline (forward+loss, backward, clip, Adam)")
    args = ap.parse_args()
    if args.iters < 20:
        ap.error("--iters: expected >= 20 (medians of fewer runs are not reported)")
    if args.threads:
        torch.set_num_threads(args.threads)
    H, R, L, S, n = args.hidden, args.rank, args.layers, args.slots, args.rows_per_slot
    B = S * n
    gen = torch.Generator().manual_seed(0)
    x3 = torch.randn(S, n, H, generator=gen)
    t3 = torch.randn(S, n, H, generator=gen)
    x, t = x3.reshape(B, H), t3.reshape(B, H)
    sid = torch.arange(S).repeat_interleave(n)

    d = esamp.Distiller(H, R, L, S)
    losses = torch.empty(S)
    P = d.params_per_slot
    # FLOPs of one train step: per block forward 2nH(2R) + 2nRH, backward twice that (dW1, dX, dB, dh).
    flops = S * L * 3 * (2 * n * H * 2 * R + 2 * n * R * H)
    record = {"command": " ".join(["bench/bench_distiller.py"] + sys.argv[1:]), "B": B, "S": S, "H": H, "R": R,
              "L": L, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "loadavg_before": os.getloadavg()}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"distiller train step: B = {B} rows over S = {S} slots, H = {H}, R = {R}, L = {L}, float32, "
          f"P = {P} params/slot, torch threads = {torch.get_num_threads()}, "
          f"median of {args.iters} runs after {args.warmup} warm-up")

    fns = {"esamp": lambda: d.train_step(x, t, sid, losses=losses)}
    variants = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    bases = {}
    for name, kw in variants.items():
        try:
            base = BatchedEagerDistiller(d.params, H, R, L, adam_kwargs=kw)
            base.train_step(x3, t3)
        except Exception as e:  # noqa: BLE001 -- report and continue (e.g. fused Adam unsupported)
            print(f"  baseline {name}: not available ({type(e).__name__}: {e})")
            continue
        bases[name] = base
        fns[f"eager bmm+autograd+Adam({name})"] = lambda b=base: b.train_step(x3, t3)
    if args.compile:
        base = BatchedEagerDistiller(d.params, H, R, L, adam_kwargs={"fused": True})
        fwd = torch.compile(base.forward)
        loss_fn = torch.compile(lambda y, tt: (y - tt).pow(2).mean(dim=(1, 2)))

        def step_compiled():
            for q in base.leaves:
                q.grad = None
            loss = loss_fn(fwd(x3), t3)
            loss.sum().backward()
            with torch.no_grad():
                sq = sum(q.grad.reshape(S, -1).pow(2).sum(dim=1) for q in base.leaves)
                coef = torch.clamp(base.clip / (sq.sqrt() + 1e-6), max=1.0)
                for q in base.leaves:
                    q.grad.mul_(coef.view(-1, *([1] * (q.dim() - 1))))
            base.opt.step()

        for _ in range(3):  # compile outside the timed runs
            step_compiled()
        fns["torch.compile(fwd+loss)+Adam(fused)"] = step_compiled
    results = median_times(fns, args.warmup, args.iters)
    st = d.stats()

    ref_t = results["esamp"]
    for name, sec in results.items():
        extra = f"  {flops / sec / 1e9:6.1f} GFLOP/s" if name == "esamp" else f"  esamp is {sec / ref_t:5.2f}x faster"
        print(f"  {name:42s} {sec * 1e3:8.3f} ms{extra}")
    strongest = min((v, k) for k, v in results.items() if k != "esamp")
    print(f"  strongest baseline: {strongest[1]} -> ratio {strongest[0] / ref_t:.2f}x")
    record.update({"train_step_median_s": results, "strongest_baseline": strongest[1],
                   "ratio": strongest[0] / ref_t, "esamp_counters": st})
    print(f"  esamp counters after the timed runs: {st}")
    if st["rows_trained"] == 0:
        raise SystemExit("FAILED: esamp trained zero rows")

    if args.breakdown and "fused" in bases:
        base = bases["fused"]
        phases = {"forward+loss": [], "backward": [], "clip": [], "Adam(fused)": []}
        for it in range(args.warmup + args.iters):
            for q in base.leaves:
                q.grad = None
            t0 = time.perf_counter()
            losses_b = (base.forward(x3) - t3).pow(2).mean(dim=(1, 2))
            t1 = time.perf_counter()
            losses_b.sum().backward()
            t2 = time.perf_counter()
            with torch.no_grad():
                sq = sum(q.grad.reshape(S, -1).pow(2).sum(dim=1) for q in base.leaves)
                coef = torch.clamp(base.clip / (sq.sqrt() + 1e-6), max=1.0)
                for q in base.leaves:
                    q.grad.mul_(coef.view(-1, *([1] * (q.dim() - 1))))
            t3_ = time.perf_counter()
            base.opt.step()
            t4 = time.perf_counter()
            if it >= args.warmup:
                for k, v in zip(phases, (t1 - t0, t2 - t1, t3_ - t2, t4 - t3_)):
                    phases[k].append(v)
        record["fused_baseline_phases_median_s"] = {k: statistics.median(v) for k, v in phases.items()}
        print("  fused baseline phases (medians): " +
              ", ".join(f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in phases.items()))

    # Forward (predict) only.
    print(f"distiller forward (predict): B = {B} rows over S = {S} slots")
    ffns = {"esamp": lambda: d.forward(x, sid)}
    if bases:
        base = next(iter(bases.values()))

        def base_forward():
            with torch.no_grad():
                return base.forward(x3)

        ffns["eager bmm (no_grad)"] = base_forward
    fres = median_times(ffns, args.warmup, args.iters)
    for name, sec in fres.items():
        extra = "" if name == "esamp" else f"  esamp is {sec / fres['esamp']:5.2f}x faster"
        print(f"  {name:42s} {sec * 1e3:8.3f} ms{extra}")
    record.update({"forward_median_s": fres, "loadavg_after": os.getloadavg()})
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
