#!/usr/bin/env bash
# The command that wrote the files in this folder: the diversity frontier of the embedded SmolLM2-135M-Instruct
# (the demo's model) on the 8 shipped prompts, now with the degeneration metrics (loop rate, tail-token rate,
# within-sample distinct-2), seeds 0 and 1.  Code: git bcc3e7e (python/esamp as of that commit).
# Machine: the project's 2-core AMD EPYC VM, no GPU, shared with a GSM8K evaluation; each seed ran in its own
# single-threaded process (--seeds 0 and --seeds 1 sharing OUT/runs), then the command below aggregated the cache.
# --dtype float32 is spelled out: it was the default when these ran (since 2026-12-02 `auto` picks bfloat16 on
# CPUs with AVX-512 BF16 / AMX).
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=${OUT:-/tmp/esamp_smollm2_div}
D=bench/results/eval_smollm2_2026-12-01
.venv/bin/esamp eval diversity --dtype float32 --max-prompts 8 -n 16 --max-new-tokens 64 --temperatures 0.8,0.9,1,1.1,1.2 \
    --baselines vanilla,min_p --min-p 0.05 --min-p-temperatures 1,1.2,1.4 \
    --beta 0.1,0.25,0.5 --lr 4e-4 --warmup-steps 30 \
    --point beta=0.25,lr=1e-3,warmup=100 --point beta=0.5,lr=1e-3,warmup=100 --point beta=0.25,warmup=0 \
    --point beta=0.25,lr=1e-3,warmup=100,min_p=0.05 --point beta=0.25,min_p=0.05 \
    --threads 2 --seeds 0,1 --out "$OUT" --no-progress
cp "$OUT/results.json" "$OUT/results.md" "$OUT/frontier.png" "$OUT/metric_vs_beta.png" $D/
