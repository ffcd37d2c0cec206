"""Every esamp operator against the strongest baseline available on this machine.

    PYTHONPATH=python python bench/bench_ops.py [--device cpu|cuda] [--reps 30] [--warmup 3] [--threads N]
                                                [--no-compile] [--ops reweight,reweight_logits,...] [--out FILE]

Operators and baselines (problem sizes of SmolLM2-135M: V = 49152, H = 576; B = 64 rows):
  reweight (min_p 0.05 / top_p 0.9 / no filter)   esamp.reference.sampling.reweight_eager (masks, sort, dense
                                                  pred @ W.T, mix, Gumbel-max, log_softmax) and torch.compile of it;
                                                  on CUDA also FlashInfer's softmax + min-p / top-p sampling when
                                                  flashinfer is installed (vanilla sampling: the cost floor)
                                                  and the filter-first baseline a careful PyTorch user writes
                                                  (bench_reweight.reweight_filter_first: filters, gather the
                                                  candidates' LM-head rows, dot only those) and torch.compile of it
  reweight_logits (same three cases)              the same eager composition stopping at the masked mixed logits,
                                                  torch.compile of it, and the filter-first form (+ compiled)
  mix_hidden                                      (1 + b) h - b p in eager PyTorch, and torch.compile of it
  capture (hidden + residual -> out[:N])          out[:N].copy_(hidden + residual), and torch.compile of it
  distiller_forward (per-prompt bank: S = 8, R = 64; shared: S = 1, R = 384; L = 2; 64 rows)
                                                  esamp.reference.distiller.BatchedEagerDistiller.forward (bmm) under
                                                  no_grad, and torch.compile of it
  distiller_train_step (same two banks)           BatchedEagerDistiller.train_step (bmm + autograd + per-slot clip +
                                                  torch.optim.Adam, default / foreach / fused; the fastest is kept)
  distiller_reset (4 of 8 slots, R = 64)          indexed writes: normal_ init of A, G, c = 1, B = 0, gamma, zero
                                                  Adam state and step counters
Each timing: median of --reps runs after --warmup untimed runs, with p10 / p90 (CPU: time.perf_counter around the
call; CUDA: CUDA events, synchronised once per run).  GB/s counts the unique bytes an operator must touch (inputs
read once, outputs written once; for reweight with a filter only the LM-head rows of the candidates); for ops whose
work is dominated by dot products GFLOP/s is printed too.  ratio = strongest baseline median / esamp median
(> 1: esamp is faster).  Results go to bench/results/ops_<device>.json (machine, command, every timing).
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)
import esamp  # noqa: E402
from bench_reweight import make_problem  # noqa: E402  (the LM-like logits recipe, shared with bench_reweight)
from bench_reweight import reweight_filter_first, reweight_logits_filter_first  # noqa: E402
from esamp.reference.distiller import INIT_GATE_BIAS, INIT_STD, BatchedEagerDistiller  # noqa: E402
from esamp.reference.sampling import reweight_eager  # noqa: E402

OPS = ("reweight", "reweight_logits", "mix_hidden", "capture", "distiller_forward", "distiller_train_step",
       "distiller_reset")


# ------------------------------------------------------------------------------------------------ timing
def time_all(fns, reps: int, warmup: int, device: torch.device):
    """{name: (median, p10, p90) seconds} of every callable over reps runs after warmup runs.  The callables run
    round-robin (one call of each per round), so that on a shared machine they all see the same background load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts = {k: [] for k in fns}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        for k, fn in fns.items():
            if cuda:
                start.record()
                fn()
                end.record()
                end.synchronize()
                ts[k].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
    out = {}
    for k, v in ts.items():
        v.sort()
        q = lambda f: v[min(len(v) - 1, int(round(f * (len(v) - 1))))]  # noqa: E731
        out[k] = (statistics.median(v), q(0.1), q(0.9))
    return out


def flashinfer_sampler(dev, filt, logits, top_p, min_p, log):
    """(label, callable) of FlashInfer's vanilla sampling for this filter -- softmax, then FlashInfer's min-p /
    top-p sampling from the probabilities (no ESamp mixing: this is the cost ESamp is measured against, issue
    target <= 1.1x) -- or None when not on CUDA or FlashInfer is not installed."""
    if dev.type != "cuda":
        return None
    try:
        import flashinfer.sampling as fs
    except Exception as e:  # noqa: BLE001 -- absent or broken install: say so, run without it
        if not getattr(flashinfer_sampler, "_said", False):
            log(f"  (FlashInfer baseline skipped: cannot import flashinfer.sampling: {type(e).__name__}: {e})")
            flashinfer_sampler._said = True
        return None
    softmax = getattr(fs, "softmax", None) or (lambda x: torch.softmax(x, dim=-1))
    if "min_p" in filt:
        return "flashinfer softmax+min_p (no ESamp)", lambda: fs.min_p_sampling_from_probs(softmax(logits), min_p)
    if "top_p" in filt:
        return "flashinfer softmax+top_p (no ESamp)", lambda: fs.top_p_sampling_from_probs(softmax(logits), top_p)
    return "flashinfer softmax+sampling (no ESamp)", lambda: fs.sampling_from_probs(softmax(logits))


def try_compile(fn, args_fn, label, log):
    """torch.compile(fn) checked by one call; None (with the reason printed) when it does not work here."""
    try:
        c = torch.compile(fn, dynamic=False)
        t0 = time.perf_counter()
        args_fn(c)
        log(f"    ({label}: torch.compile first call incl. compilation {time.perf_counter() - t0:.1f} s)")
        return c
    except Exception as e:  # noqa: BLE001 -- report, do not hide
        log(f"    {label}: torch.compile baseline failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return None


# ------------------------------------------------------------------------------------------------ eager baselines
def reweight_logits_eager(logits, pred, W, beta, temperature, min_p, top_p, use_min_p, use_top_p):
    """Masked mixed logits as an engine would compose them in PyTorch (min-p mask, one sort for top-p, dense
    distiller logits pred @ W.T, mix, divide by T, -inf off the candidate set)."""
    l = logits.float()
    T = temperature[:, None]
    z = l / T
    keep = torch.ones_like(z, dtype=torch.bool)
    if use_min_p:
        keep &= z >= z.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    if use_top_p:
        zs, _ = torch.sort(z.masked_fill(~keep, float("-inf")), dim=-1, descending=True)
        cs = torch.softmax(zs, dim=-1).cumsum(dim=-1)
        n = torch.searchsorted(cs, top_p[:, None].to(cs.dtype)).clamp(max=z.shape[-1] - 1)
        keep &= z >= zs.gather(1, n)
    d = pred.float() @ W.float().t()
    b = beta[:, None]
    return (((1 + b) * l - b * d) / T).masked_fill(~keep, float("-inf"))


def mix_hidden_eager(h, p, beta):
    b = beta[:, None]
    return ((1 + b) * h.float() - b * p.float()).to(h.dtype)


def capture_eager(hidden, residual, out):
    out[: hidden.shape[0]].copy_(hidden + residual)


def reset_eager(params, exp_avg, exp_avg_sq, step, slots, H, R, L, gamma, gen):
    """What an engine would write to re-initialise slots (normal_ from torch's generator instead of Philox)."""
    S = slots.shape[0]
    blk = 3 * H * R + R
    new = torch.zeros(S, params.shape[1], dtype=params.dtype, device=params.device)
    body = new[:, : L * blk].view(S, L, blk)
    body[:, :, : 2 * H * R].normal_(0.0, INIT_STD, generator=gen)
    body[:, :, 2 * H * R: 2 * H * R + R] = INIT_GATE_BIAS
    new[:, L * blk:] = gamma
    params[slots] = new
    exp_avg[slots] = 0
    exp_avg_sq[slots] = 0
    step[slots] = 0


# ------------------------------------------------------------------------------------------------ the benchmark
def machine_info(device):
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def markdown_table(results) -> str:
    """The results as a markdown table (esamp median, p10-p90, GB/s; strongest baseline median; ratio)."""
    lines = ["| op | case | esamp median (p10–p90) | esamp GB/s | strongest baseline | baseline median | ratio |",
             "|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        e = c["timings"]["esamp"]
        b = c["timings"].get(c["strongest_baseline"]) if c["strongest_baseline"] else None
        lines.append(f"| {c['op']} | {c['case']} | {e['median_s'] * 1e3:.3f} ms ({e['p10_s'] * 1e3:.3f}–"
                     f"{e['p90_s'] * 1e3:.3f}) | {c['esamp_GBps']:.2f} | {c['strongest_baseline'] or 'n/a'} | "
                     + (f"{b['median_s'] * 1e3:.3f} ms | {c['ratio']:.2f}x |" if b else "n/a | n/a |"))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--V", type=int, default=49152)
    ap.add_argument("--H", type=int, default=576)
    ap.add_argument("--out", default=None, help="JSON output (default bench/results/ops_<device>.json)")
    args = ap.parse_args(argv)
    if args.reps < 20:
        ap.error(f"--reps: expected >= 20 (medians of fewer runs are not reported), got {args.reps}")
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OPS]
    if bad:
        ap.error(f"--ops: unknown {bad}; expected a subset of {list(OPS)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not esamp.ops.has_cuda_kernels():
        ap.error("--device cuda: this build has no CUDA kernels")
    log = lambda s: print(s, flush=True)  # noqa: E731
    B, V, H = args.B, args.V, args.H
    info = machine_info(dev)
    log(f"bench_ops on {dev} ({info.get('gpu') or info.get('cpu')}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | B={B} V={V} H={H} | median of {args.reps} after {args.warmup} warm-up "
        f"(p10 / p90)")
    results = {"machine": info, "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
               "device": str(dev), "reps": args.reps, "warmup": args.warmup, "cases": []}
    def report(op, case, fns, nbytes, flops=None):
        impls = time_all(fns, args.reps, args.warmup, dev)
        es = impls["esamp"]
        base = {k: v for k, v in impls.items() if k != "esamp" and v is not None}
        best = min(base.items(), key=lambda kv: kv[1][0]) if base else None
        rec = {"op": op, "case": case, "bytes": nbytes, "flops": flops,
               "timings": {k: {"median_s": v[0], "p10_s": v[1], "p90_s": v[2]} for k, v in impls.items()
                           if v is not None},
               "esamp_GBps": nbytes / es[0] / 1e9, "strongest_baseline": best[0] if best else None,
               "ratio": best[1][0] / es[0] if best else None}
        if flops:
            rec["esamp_GFLOPs"] = flops / es[0] / 1e9
        results["cases"].append(rec)
        log(f"  {op} [{case}]")
        for k, v in impls.items():
            if v is None:
                continue
            extra = f"  {nbytes / v[0] / 1e9:7.2f} GB/s" + (f"  {flops / v[0] / 1e9:7.1f} GFLOP/s" if flops else "")
            log(f"    {k:32s} median {v[0] * 1e3:9.3f} ms  p10 {v[1] * 1e3:9.3f}  p90 {v[2] * 1e3:9.3f}{extra}")
        if best:
            log(f"    vs strongest baseline ({best[0]}): {rec['ratio']:.2f}x")

    full = lambda x, dt=torch.float32: torch.full((B,), x, dtype=dt, device=dev)  # noqa: E731
    if "reweight" in ops or "reweight_logits" in ops:
        logits, pred, W = (t.to(dev) for t in make_problem(B, V, H, torch.float32))
        beta, temp = full(0.25), full(1.0)
        seed = esamp.ops.derive_row_seeds(0, B).to(dev)
        topk0 = torch.zeros(B, dtype=torch.int64, device=dev)
        cases = [("min_p=0.05", dict(min_p=0.05)), ("top_p=0.9", dict(top_p=0.9)), ("no filter", {})]
        comp_rw = None
        for name, filt in cases:
            top_p, min_p = full(filt.get("top_p", 1.0)), full(filt.get("min_p", 0.0))
            flags = dict(use_top_k=False, use_top_p="top_p" in filt, use_min_p="min_p" in filt)
            mixed = esamp.ops.reweight_logits(logits, pred, W, beta=beta, temperature=temp, top_p=top_p, min_p=min_p)
            cand = torch.isfinite(mixed)
            ncand = int(cand.sum())
            rows_touched = int(cand.any(0).sum()) if filt else V
            nbytes = logits.numel() * 4 + rows_touched * H * 4 + pred.numel() * 4
            flops = 2 * ncand * H
            step = torch.zeros(B, dtype=torch.int64, device=dev)
            if "reweight" in ops:
                def run_es():
                    step.add_(1)
                    return esamp.ops.reweight(logits, pred, W, beta=beta, temperature=temp, top_k=topk0, top_p=top_p,
                                              min_p=min_p, seed=seed, step=step)

                def eager():
                    return reweight_eager(logits, pred, W, None, beta, temp, topk0, top_p, min_p, **flags)

                impls = {"esamp": run_es, "eager (reference.reweight_eager)": eager}
                if not args.no_compile:
                    comp_rw = comp_rw or try_compile(reweight_eager, lambda c: c(logits, pred, W, None, beta, temp,
                                                                                 topk0, top_p, min_p, **flags),
                                                     "reweight_eager", log)
                    if comp_rw is not None:
                        impls["torch.compile(eager)"] = lambda: comp_rw(logits, pred, W, None, beta, temp, topk0,
                                                                        top_p, min_p, **flags)
                ff = (logits, pred, W, beta, temp, top_p, min_p, "min_p" in filt, "top_p" in filt)
                if dev.type == "cpu":
                    impls["filter-first (gather candidate rows)"] = lambda ff=ff: reweight_filter_first(*ff)
                    if not args.no_compile:
                        c = try_compile(reweight_filter_first, lambda f, ff=ff: f(*ff), f"filter-first[{name}]", log)
                        if c is not None:
                            impls["torch.compile(filter-first)"] = lambda c=c, ff=ff: c(*ff)
                fi = flashinfer_sampler(dev, filt, logits, top_p, min_p, log)
                if fi is not None:
                    impls[fi[0]] = fi[1]
                report("reweight", f"{name}, |C| mean {ncand / B:.0f}", impls, nbytes + B * 12, flops)
            if "reweight_logits" in ops:
                rl = dict(use_min_p="min_p" in filt, use_top_p="top_p" in filt)
                impls = {"esamp": lambda: esamp.ops.reweight_logits(logits, pred, W, beta=beta, temperature=temp,
                                                                    top_p=top_p, min_p=min_p),
                         "eager": lambda: reweight_logits_eager(logits, pred, W, beta, temp, min_p, top_p, **rl)}
                if not args.no_compile:
                    c = try_compile(reweight_logits_eager,
                                    lambda f: f(logits, pred, W, beta, temp, min_p, top_p, **rl),
                                    f"reweight_logits_eager[{name}]", log)
                    if c is not None:
                        impls["torch.compile(eager)"] = lambda: c(logits, pred, W, beta, temp, min_p, top_p, **rl)
                ff = (logits, pred, W, beta, temp, top_p, min_p, "min_p" in filt, "top_p" in filt)
                if dev.type == "cpu":
                    impls["filter-first (gather candidate rows)"] = lambda ff=ff: reweight_logits_filter_first(*ff)
                    if not args.no_compile:
                        c2 = try_compile(reweight_logits_filter_first, lambda f, ff=ff: f(*ff),
                                         f"filter-first logits[{name}]", log)
                        if c2 is not None:
                            impls["torch.compile(filter-first)"] = lambda c2=c2, ff=ff: c2(*ff)
                report("reweight_logits", f"{name}, |C| mean {ncand / B:.0f}", impls, nbytes + B * V * 4, flops)

    g = torch.Generator(device=dev).manual_seed(0)
    if "mix_hidden" in ops:
        h = torch.randn(B, H, generator=g, device=dev)
        p = torch.randn(B, H, generator=g, device=dev)
        beta = full(0.25)
        impls = {"esamp": lambda: esamp.ops.mix_hidden(h, p, beta), "eager": lambda: mix_hidden_eager(h, p, beta)}
        if not args.no_compile:
            c = try_compile(mix_hidden_eager, lambda f: f(h, p, beta), "mix_hidden", log)
            if c is not None:
                impls["torch.compile(eager)"] = lambda: c(h, p, beta)
        report("mix_hidden", f"B={B} H={H} fp32", impls, 3 * B * H * 4 + B * 4)
    if "capture" in ops:
        hid = torch.randn(B, H, generator=g, device=dev)
        res = torch.randn(B, H, generator=g, device=dev)
        out = torch.empty(2 * B, H, device=dev)
        impls = {"esamp": lambda: esamp.ops.capture(hid, res, out), "eager": lambda: capture_eager(hid, res, out)}
        if not args.no_compile:
            c = try_compile(capture_eager, lambda f: f(hid, res, out), "capture", log)
            if c is not None:
                impls["torch.compile(eager)"] = lambda: c(hid, res, out)
        report("capture", f"N={B} H={H} fp32, with residual", impls, 3 * B * H * 4)

    banks = [("per-prompt bank S=8 R=64", 8, 64), ("shared S=1 R=384", 1, 384)]
    L = 2
    for label, S, R in banks:
        if not ({"distiller_forward", "distiller_train_step"} & set(ops)):
            break
        n = B // S
        d = esamp.Distiller(H, R, L, S, device=dev)
        P = d.params_per_slot
        x3 = torch.randn(S, n, H, generator=g, device=dev)
        t3 = torch.randn(S, n, H, generator=g, device=dev)
        x, t = x3.reshape(B, H), t3.reshape(B, H)
        sid = torch.arange(S, device=dev).repeat_interleave(n)
        fwd_flops = S * L * (2 * n * H * 2 * R + 2 * n * R * H)
        if "distiller_forward" in ops:
            base = BatchedEagerDistiller(d.params, H, R, L)

            def eager_fwd(xx=x3, bb=base):
                with torch.no_grad():
                    return bb.forward(xx)

            impls = {"esamp": lambda: d.forward(x, sid), "eager bmm (no_grad)": eager_fwd}
            if not args.no_compile:
                cf = try_compile(base.forward, lambda f: f(x3), f"distiller forward [{label}]", log)
                if cf is not None:
                    def comp_fwd(f=cf):
                        with torch.no_grad():
                            return f(x3)
                    impls["torch.compile(eager forward)"] = comp_fwd
            report("distiller_forward", label, impls, S * P * 4 + 2 * B * H * 4 + B * 8, fwd_flops)
        if "distiller_train_step" in ops:
            losses = torch.empty(S, device=dev)
            impls = {"esamp": lambda: d.train_step(x, t, sid, losses=losses)}
            for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
                try:
                    bb = BatchedEagerDistiller(d.params, H, R, L, adam_kwargs=kw)
                    bb.train_step(x3, t3)
                except Exception as e:  # noqa: BLE001 -- report and continue
                    log(f"    Adam({name}) not available here: {type(e).__name__}: {e}")
                    continue
                impls[f"eager bmm+autograd+Adam({name})"] = lambda bb=bb: bb.train_step(x3, t3)
            if not args.no_compile:
                cb = BatchedEagerDistiller(d.params, H, R, L, adam_kwargs={"fused": True})
                cfwd = try_compile(cb.forward, lambda f: f(x3), f"distiller train forward [{label}]", log)
                if cfwd is not None:
                    def comp_step(cb=cb, cfwd=cfwd):
                        for q in cb.leaves:
                            q.grad = None
                        (cfwd(x3) - t3).pow(2).mean(dim=(1, 2)).sum().backward()
                        with torch.no_grad():
                            sq = sum(q.grad.reshape(S, -1).pow(2).sum(dim=1) for q in cb.leaves)
                            coef = torch.clamp(cb.clip / (sq.sqrt() + 1e-6), max=1.0)
                            for q in cb.leaves:
                                q.grad.mul_(coef.view(-1, *([1] * (q.dim() - 1))))
                        cb.opt.step()
                    try:
                        comp_step()
                        impls["torch.compile(forward)+autograd+Adam(fused)"] = comp_step
                    except Exception as e:  # noqa: BLE001
                        log(f"    compiled train step failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            report("distiller_train_step", label, impls, 3 * 2 * S * P * 4 + 2 * B * H * 4 + B * 8, 3 * fwd_flops)
            st = d.stats()
            if st["rows_trained"] == 0:
                raise SystemExit("FAILED: esamp trained zero rows")
            results["cases"][-1]["esamp_counters"] = st
    if "distiller_reset" in ops:
        S, R = 8, 64
        d = esamp.Distiller(H, R, L, S, device=dev)
        P = d.params_per_slot
        slots = torch.tensor([1, 3, 4, 6], device=dev)
        gamma = torch.ones(H, device=dev)
        prm, m1, m2, stp = d.params.clone(), d.exp_avg.clone(), d.exp_avg_sq.clone(), d.step.clone()
        impls = {"esamp": lambda: d.reset(slots),
                 "eager (normal_ + indexed writes)": lambda: reset_eager(prm, m1, m2, stp, slots, H, R, L, gamma, g)}
        report("distiller_reset", f"4 of {S} slots, R={R}", impls, 3 * 4 * P * 4)

    try:
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    log("")
    log(markdown_table(results))
    path = args.out or os.path.join(HERE, "results", f"ops_{dev.type}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
