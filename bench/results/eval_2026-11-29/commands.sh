#!/bin/bash
# The commands that produced this folder (SmolLM2-135M on the 2-core CPU VM, 2026-11-29); outputs go to eval_out/.
# --dtype float32 is spelled out: it was the default when these ran (since 2026-12-02 `auto` picks bfloat16 on
# CPUs with AVX-512 BF16 / AMX).
cd "$(dirname "$0")/../../.."
export PYTHONPATH=python
python -m esamp eval diversity --dtype float32 --max-prompts 8 --temperatures 0.8,0.9,1,1.1,1.2 --min-p-temperatures 1,1.2,1.4 \
  --beta 0.1,0.25,0.5 --lr 4e-4 --warmup-steps 30 \
  --point beta=0.25,lr=1e-3,warmup=30 --point beta=0.5,lr=1e-3,warmup=30 --point beta=0.25,warmup=0 \
  --point beta=0.25,lr=1e-3,warmup=100 --point beta=0.25,exempt=mass --point beta=0.5,exempt=mass \
  --point beta=0.25,min_p=0.05 --seeds 0,1,2 --out eval_out/diversity
echo "DIVERSITY rc=$?"
python -m esamp eval passk --dtype float32 --temperature 0.7,1 --beta 0.1,0.25,0.5 --seeds 0,1 --out eval_out/passk
echo "PASSK rc=$?"
python -m esamp eval passk --dtype float32 --temperature 0.7,1 --beta 0.25 --lr 1e-3 --warmup-steps 100 --exempt none,mass --seeds 0,1 --out eval_out/passk_lr1e-3
echo "PASSK2 rc=$?"
