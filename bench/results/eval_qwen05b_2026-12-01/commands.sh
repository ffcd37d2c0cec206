#!/usr/bin/env bash
# The commands that wrote the files in this folder (Qwen2.5-Coder-0.5B-Instruct, float32, GSM8K and HumanEval, CPU).
# Machine: the project's 2-core AMD EPYC VM (AVX2, no bf16 / AMX), 24 GiB, no GPU, torch 2.14.1, shared with
# other jobs (each process single-threaded, --workers 2).  Every chunk is cached under OUT/runs/, so re-running
# a command after an interruption continues where it stopped; with everything cached it only re-aggregates.
# --dtype float32 is spelled out: it was the default when these ran (since 2026-12-02 `auto` picks bfloat16 on
# CPUs with AVX-512 BF16 / AMX).
set -euo pipefail
cd "$(dirname "$0")/../../.."
bash tools/install_eval_assets.sh                          # model + data (offline wheels from the registry)
OUT=${OUT:-/tmp/esamp_gsm8k_dev}
D=bench/results/eval_qwen05b_2026-12-01

# 1. The paper's protocol on the dev split (files 0000-0049): vanilla vs ESamp, T = 1, min-p 0.1, beta 0.25,
#    lr 4e-4, 30 warm-up steps, n = 16, 512 new tokens  ->  paper_dev.{json,md,png}
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split dev --model qwen2.5-coder-0.5b -n 16 --workers 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --beta 0.25 --out "$OUT"
cp "$OUT/results.json" $D/paper_dev.json; cp "$OUT/results.md" $D/paper_dev.md; cp "$OUT/passk.png" $D/paper_dev_passk.png

# 2. Screen on dev problems 0-15: vanilla at T 0.8 (min-p 0.1) and ESamp with the better-trained distiller the
#    replay below motivates (lr 1e-3, 100 warm-up steps), beside the two methods of step 1 (cached)  ->  screen_0-15.*
#    (T 1.2 and beta 0.1 were planned in the same screen and not run: no compute left in the session.)
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split 0-15 --model qwen2.5-coder-0.5b -n 16 --workers 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
    --vanilla-point temperature=1,min_p=0.1 --vanilla-point temperature=0.8,min_p=0.1 \
    --point beta=0.25 --point beta=0.25,lr=1e-3,warmup=100 --baseline "vanilla T=1 min_p=0.1" --out "$OUT"
cp "$OUT/results.json" $D/screen_0-15.json; cp "$OUT/results.md" $D/screen_0-15.md; cp "$OUT/passk.png" $D/screen_0-15_passk.png

# 3. How good is the online distiller on these trajectories?  (replay of its training on the vanilla samples of
#    problems 0 and 1)  ->  distiller_quality.json
S=$(ls "$OUT"/runs/vanilla_T=1_min_p=0.1_s0_0-15_*.json)
PYTHONPATH=python .venv/bin/python bench/distiller_quality.py --samples "$S" --problems 0,1 \
  --config lr=4e-4,warmup=30 --config lr=4e-4,warmup=0 --config lr=1e-3,warmup=100 --config lr=3e-3,warmup=100 \
  --config lr=1e-3,warmup=100,rank=256 --config lr=1e-3,warmup=100,source=2 --config lr=1e-3,warmup=100,source=5 \
  --out $D/distiller_quality.json

# 4. Paired per-sample analysis of run 1 (where ESamp's samples leave vanilla's, who wins which problem)
PYTHONPATH=python .venv/bin/python bench/esamp_pairs.py "$OUT" "vanilla T=1 min_p=0.1" \
    "esamp b=0.25 lr=0.0004 wu=30 min_p=0.1" > $D/pairs_dev.txt

# 5. The better-trained distiller (lr 1e-3, 100 warm-up: the best ESamp point of the 0-15 screen) on the rest of
#    dev (16-49), then all of dev beside the two methods of step 1 (cached)  ->  dev_tuned.{json,md,png}
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split dev --model qwen2.5-coder-0.5b -n 16 --workers 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
    --point beta=0.25,lr=1e-3,warmup=100 --out "$OUT"
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split dev --model qwen2.5-coder-0.5b -n 16 --workers 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --beta 0.25 --point beta=0.25,lr=1e-3,warmup=100 \
    --baseline "vanilla T=1 min_p=0.1" --out "$OUT"
cp "$OUT/results.json" $D/dev_tuned.json; cp "$OUT/results.md" $D/dev_tuned.md; cp "$OUT/passk.png" $D/dev_tuned_passk.png

# 6. The same three methods on the problems the lr 1e-3 point was NOT chosen on (16-49) and on those it was
#    (0-15), all cached  ->  dev_tuned_16-49.{json,md}, dev_tuned_0-15.{json,md}
for S in 16-49 0-15; do
  .venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split $S --model qwen2.5-coder-0.5b -n 16 --workers 2 \
      --batch-rows 256 --temperature 1 --min-p 0.1 --beta 0.25 --point beta=0.25,lr=1e-3,warmup=100 \
      --baseline "vanilla T=1 min_p=0.1" --no-plots --out "$OUT"
  cp "$OUT/results.json" $D/dev_tuned_$S.json; cp "$OUT/results.md" $D/dev_tuned_$S.md
done

# 7. Does a higher temperature buy the same?  Vanilla T 1.2 (min-p 0.1) on dev 16-49, then the four methods on
#    16-49 against vanilla T 1 and against vanilla T 1.2  ->  t12_16-49.{json,md,png}, t12_16-49_vs_T1.2.{json,md}
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split 16-49 --model qwen2.5-coder-0.5b -n 16 --workers 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
    --vanilla-point temperature=1.2,min_p=0.1 --no-plots --out "$OUT"
for B in 1 1.2; do
  .venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split 16-49 --model qwen2.5-coder-0.5b -n 16 --workers 2 \
      --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
      --vanilla-point temperature=1,min_p=0.1 --vanilla-point temperature=1.2,min_p=0.1 \
      --point beta=0.25 --point beta=0.25,lr=1e-3,warmup=100 --baseline "vanilla T=$B min_p=0.1" --out "$OUT"
  if [ $B = 1 ]; then S=t12_16-49; cp "$OUT/passk.png" $D/${S}_passk.png; else S=t12_16-49_vs_T1.2; fi
  cp "$OUT/results.json" $D/$S.json; cp "$OUT/results.md" $D/$S.md
done

# 8. Vanilla T 1.2 on the rest of dev (0-15), then all four methods on all of dev against vanilla T 1 and T 1.2
#    ->  dev_t12.{json,md,png}, dev_t12_vs_T1.2.{json,md}
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split 0-15 --model qwen2.5-coder-0.5b -n 16 --threads 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
    --vanilla-point temperature=1.2,min_p=0.1 --no-plots --out "$OUT"
for B in 1 1.2; do
  .venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split dev --model qwen2.5-coder-0.5b -n 16 --workers 2 \
      --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
      --vanilla-point temperature=1,min_p=0.1 --vanilla-point temperature=1.2,min_p=0.1 \
      --point beta=0.25 --point beta=0.25,lr=1e-3,warmup=100 --baseline "vanilla T=$B min_p=0.1" --out "$OUT"
  if [ $B = 1 ]; then S=dev_t12; cp "$OUT/passk.png" $D/${S}_passk.png; else S=dev_t12_vs_T1.2; fi
  cp "$OUT/results.json" $D/$S.json; cp "$OUT/results.md" $D/$S.md
done

# 9. A first step of vanilla's min-p grid: T 1, min-p 0.05 on dev 0-15, beside vanilla min-p 0.1 and ESamp lr 1e-3
#    ->  screen_mp05_0-15.{json,md}
.venv/bin/esamp eval passk --dtype float32 --suite gsm8k --split 0-15 --model qwen2.5-coder-0.5b -n 16 --threads 2 \
    --batch-rows 256 --temperature 1 --min-p 0.1 --no-vanilla-grid --no-esamp-grid \
    --vanilla-point temperature=1,min_p=0.1 --vanilla-point temperature=1,min_p=0.05 \
    --point beta=0.25,lr=1e-3,warmup=100 --baseline "vanilla T=1 min_p=0.1" --no-plots --out "$OUT"
cp "$OUT/results.json" $D/screen_mp05_0-15.json; cp "$OUT/results.md" $D/screen_mp05_0-15.md

# 10. Large k: n = 64 on dev problems 0-7 (files 0000-0007), vanilla T 1 min-p 0.1 vs ESamp lr 1e-3 / 100 warm-up
#     (one process per method, each single-threaded, chunks of 4 problems x 64 samples), then the aggregation
#     ->  n64_0-7.{json,md,png}
OUT64=${OUT64:-/tmp/esamp_gsm8k_n64}
N64=(--suite gsm8k --split 0-7 --model qwen2.5-coder-0.5b -n 64 --batch-rows 256 --temperature 1 --min-p 0.1)
.venv/bin/esamp eval passk --dtype float32 "${N64[@]}" --threads 1 --no-esamp-grid --no-plots --out "$OUT64" &
.venv/bin/esamp eval passk --dtype float32 "${N64[@]}" --threads 1 --no-vanilla-grid --no-esamp-grid \
    --point beta=0.25,lr=1e-3,warmup=100 --no-plots --out "$OUT64" &
wait
.venv/bin/esamp eval passk --dtype float32 "${N64[@]}" --no-esamp-grid --point beta=0.25,lr=1e-3,warmup=100 \
    --baseline "vanilla T=1 min_p=0.1" --out "$OUT64"
cp "$OUT64/results.json" $D/n64_0-7.json; cp "$OUT64/results.md" $D/n64_0-7.md; cp "$OUT64/passk.png" $D/n64_0-7_passk.png

# 11. The held-out split (files 0050-0099), run ONCE after all tuning on dev, with the settings chosen there:
#     vanilla T 1, min-p 0.1 (vanilla's best of those run on dev) vs ESamp beta 0.25, lr 1e-3, 100 warm-up, min-p 0.1
#     (ESamp's best on dev); n = 16, chunks of 4 problems x 16 samples (each cached when done), two workers; then the
#     aggregation with the plot  ->  heldout.{json,md,png}
OUTH=${OUTH:-/tmp/esamp_gsm8k_heldout}
HO=(--suite gsm8k --split heldout --model qwen2.5-coder-0.5b -n 16 --batch-rows 64 --temperature 1 --min-p 0.1
    --no-esamp-grid --point beta=0.25,lr=1e-3,warmup=100)
.venv/bin/esamp eval passk --dtype float32 "${HO[@]}" --workers 2 --no-plots --out "$OUTH"
.venv/bin/esamp eval passk --dtype float32 "${HO[@]}" --baseline "vanilla T=1 min_p=0.1" --out "$OUTH"
cp "$OUTH/results.json" $D/heldout.json; cp "$OUTH/results.md" $D/heldout.md; cp "$OUTH/passk.png" $D/heldout_passk.png

# 12. HumanEval (part of the dev split), n = 16, T 1, min-p 0.1, up to 512 new tokens, each sample graded in its
#     own sandboxed subprocess, chunks of 4 problems, two workers.
#     a) problems 0-19: vanilla vs ESamp at the paper's settings (beta 0.25, lr 4e-4, 30 warm-up) vs ESamp lr 1e-3 /
#        100 warm-up (GSM8K dev's best)  ->  humaneval_0-19.{json,md,png}
OUTE=${OUTE:-/tmp/esamp_humaneval}
HE=(--suite humaneval --model qwen2.5-coder-0.5b -n 16 --batch-rows 64 --temperature 1 --min-p 0.1 --no-esamp-grid)
.venv/bin/esamp eval passk --dtype float32 "${HE[@]}" --split 0-19 --point beta=0.25 --point beta=0.25,lr=1e-3,warmup=100 \
    --workers 2 --no-plots --out "$OUTE"
.venv/bin/esamp eval passk --dtype float32 "${HE[@]}" --split 0-19 --point beta=0.25 --point beta=0.25,lr=1e-3,warmup=100 \
    --baseline "vanilla T=1 min_p=0.1" --out "$OUTE"
cp "$OUTE/results.json" $D/humaneval_0-19.json; cp "$OUTE/results.md" $D/humaneval_0-19.md
cp "$OUTE/passk.png" $D/humaneval_0-19_passk.png
#     b) vanilla already solves all of 0-19 at k = 16, so vanilla and ESamp lr 1e-3 / 100 warm-up also on every
#        20th problem from 20 to 160 (28 problems in all; these run as one-problem chunks, which is why the
#        paper-settings ESamp, below vanilla on 0-19, was not extended)  ->  humaneval_sub.{json,md,png}
SUB=(--split 0-19,20,40,60,80,100,120,140,160 --point beta=0.25,lr=1e-3,warmup=100)
.venv/bin/esamp eval passk --dtype float32 "${HE[@]}" "${SUB[@]}" --workers 2 --no-plots --out "$OUTE"
.venv/bin/esamp eval passk --dtype float32 "${HE[@]}" "${SUB[@]}" --baseline "vanilla T=1 min_p=0.1" --out "$OUTE"
cp "$OUTE/results.json" $D/humaneval_sub.json; cp "$OUTE/results.md" $D/humaneval_sub.md
cp "$OUTE/passk.png" $D/humaneval_sub_passk.png
#     c) paired per-sample analysis (which samples change; samples at the token budget and in a loop)
for P in 0-19 sub; do
  [ $P = 0-19 ] && SP=0-19 || SP=${SUB[1]}
  PYTHONPATH=python .venv/bin/python bench/esamp_pairs.py "$OUTE" "vanilla T=1 min_p=0.1" \
      "esamp b=0.25 lr=0.001 wu=100 min_p=0.1" --split $SP > $D/pairs_humaneval_$P.txt
done
