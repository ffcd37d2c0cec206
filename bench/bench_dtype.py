"""float32 vs bfloat16 on this CPU: one decode step of the evaluation model, and the GEMM underneath.

Whether bf16 pays off depends on the CPU: with AVX-512 BF16 / AMX it is native, without (e.g. AVX2-only AMD EPYC)
PyTorch emulates it.  Prints medians and the bf16 / fp32 ratio, and writes JSON.

  PYTHONPATH=python python bench/bench_dtype.py --model qwen2.5-coder-0.5b --rows 64 --out bench/results/dtype_cpu.json
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


def gemm(dtype, M, K=896, N=4864, reps=10):
    a, w = torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype)
    for _ in range(2):
        a @ w.t()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ w.t()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--rows", type=int, default=64, help="decode rows (prompts x n)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from esamp import hf, models

    cap = torch.backends.cpu.get_cpu_capability()
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "torch_cpu_capability": cap,
                       "threads": args.threads, "torch": torch.__version__, "load": os.getloadavg()},
           "gemm_ms": {}, "decode_step_ms": {}}
    for M in (16, args.rows):
        f, b = gemm(torch.float32, M), gemm(torch.bfloat16, M)
        res["gemm_ms"][str(M)] = {"float32": f * 1e3, "bfloat16": b * 1e3, "bf16_over_fp32": b / f}
        print(f"GEMM {M}x896 @ 896x4864: fp32 {f * 1e3:.2f} ms, bf16 {b * 1e3:.2f} ms, ratio {b / f:.2f}", flush=True)
    prompts = ["Write one sentence about the sea."] * max(1, args.rows // 16)
    n = args.rows // len(prompts)
    for dt in ("float32", "bfloat16"):
        model, tok = models.load(args.model, dtype=dt, cache=True)
        out = hf.generate(model, tok, prompts, n=n, max_new_tokens=args.steps, esamp=None, seed=0, progress=False,
                          ignore_eos=True, min_p=0.1)
        step = statistics.median(out.stats["step_times"][2:])
        res["decode_step_ms"][dt] = step * 1e3
        print(f"decode step, {args.rows} rows, {dt}: median {step * 1e3:.0f} ms", flush=True)
        del model
    res["decode_bf16_over_fp32"] = res["decode_step_ms"]["bfloat16"] / res["decode_step_ms"]["float32"]
    print(f"bf16 / fp32 decode step: {res['decode_bf16_over_fp32']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
