#!/usr/bin/env bash
# Lists the device code embedded in the built library and FAILS unless it holds, for every required
# architecture, a cubin of every esamp CUDA source and the kernels of every family:
#   reweight, reweight_logits (fp32/bf16/fp16 logits each), mix_hidden,
#   distiller forward, distiller train step, distiller reset;
# plus PTX of the newest required architecture (for forward compatibility).
#
#   tools/check_cubins.sh [LIB.so]          # default build/dev/_C.so
#   ESAMP_REQUIRE_ARCHS="90" tools/check_cubins.sh LIB.so   # default "80 90"
#
# cuobjdump: $CUOBJDUMP, else <site-packages>/nvidia/cu13/bin/cuobjdump of the active python
# (pip install --no-deps nvidia-cuda-cuobjdump==13.4.92), else cuobjdump on PATH or next to nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
LIB=${1:-build/dev/_C.so}
ARCHS=${ESAMP_REQUIRE_ARCHS:-80 90}
[ -f "$LIB" ] || { echo "check_cubins: library not found: $LIB" >&2; exit 2; }

CO=${CUOBJDUMP:-}
if [ -z "$CO" ]; then
  PY=${PYTHON:-python}
  SP=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null || true)
  for c in "$SP/nvidia/cu13/bin/cuobjdump" "$(command -v cuobjdump 2>/dev/null || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then CO=$c; break; fi
  done
fi
if [ -z "$CO" ] && command -v nvcc >/dev/null 2>&1; then
  real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1 || true)
  [ -n "$real" ] || real=$(readlink -f "$(command -v nvcc)")
  [ -x "$(dirname "$real")/cuobjdump" ] && CO="$(dirname "$real")/cuobjdump"
fi
if [ -z "$CO" ]; then
  echo "check_cubins: no cuobjdump found (pip install --no-deps nvidia-cuda-cuobjdump==13.4.92)" >&2
  exit 2
fi

echo "== $LIB ($CO)"
ELF=$("$CO" --list-elf "$LIB" 2>&1) || { echo "$ELF"; echo "check_cubins: cuobjdump --list-elf failed" >&2; exit 1; }
PTX=$("$CO" --list-ptx "$LIB" 2>&1) || PTX=""
echo "$ELF"
echo "$PTX"
SYMS=$("$CO" --dump-elf-symbols "$LIB" | awk '/^arch = /{a=$3} /STO_ENTRY/{print a, $NF}')

fail=0
need() {  # need ARCH LABEL REGEX
  if ! grep -E "^sm_$1 " <<<"$SYMS" | grep -Eq "$3"; then
    echo "MISSING: sm_$1 kernel of family '$2' (pattern $3)"
    fail=1
  fi
}
sources=(reweight distiller mix_hidden)
newest=""
for a in $ARCHS; do
  newest=$a
  for s in "${sources[@]}"; do
    grep -Eq "ELF file +[0-9]+: ${s}\.sm_${a}\.cubin" <<<"$ELF" || { echo "MISSING: ${s}.sm_${a}.cubin"; fail=1; }
  done
  for d in 0 1 2; do  # DType kF32, kBF16, kF16 of the logits
    need "$a" "reweight (logits dtype $d)" "reweight_kernelILNS_5DTypeE${d}ELb0E"
    need "$a" "reweight_logits (logits dtype $d)" "reweight_kernelILNS_5DTypeE${d}ELb1E"
  done
  need "$a" mix_hidden "mix_hidden_kernel"
  for k in sort_kernel gather_kernel rows_gemm_kernel gate_fwd_kernel norm_kernel fill_unsorted_kernel; do
    need "$a" "distiller forward" "$k"
  done
  for k in row_valid_kernel wgrad_kernel gate_bwd_kernel dc_kernel gamma_grad_kernel slot_prep_kernel adam_kernel \
           finalize_kernel; do
    need "$a" "distiller train step" "$k"
  done
  need "$a" "distiller reset" "reset_kernel"
done
if [ -n "$newest" ]; then
  for s in "${sources[@]}"; do
    grep -Eq "PTX file +[0-9]+: ${s}\.sm_${newest}\.ptx" <<<"$PTX" || { echo "MISSING: ${s}.sm_${newest}.ptx"; fail=1; }
  done
fi
n=$(grep -c . <<<"$SYMS" || true)
if [ $fail -ne 0 ]; then
  echo "check_cubins: FAILED ($n kernel entries found)"
  exit 1
fi
echo "check_cubins: ok (archs: $ARCHS; $n kernel entries; PTX for sm_$newest)"
