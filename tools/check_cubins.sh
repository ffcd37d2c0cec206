#!/usr/bin/env bash
# Checks the device code and the cuBLAS linkage of the built library and FAILS unless:
#   * for every required architecture there is a cubin of every esamp CUDA source and the kernels of every
#     family: reweight / reweight_logits row kernels (fp32/bf16/fp16 logits each), the dense path (list,
#     tensor-core GEMM in its three modes, finish; cuBLAS variant: prediction copy, streaming pass), mix_hidden, capture, distiller forward, train step, reset,
#     and the trainer's counters mirror; plus PTX of the newest required architecture;
#   * the library links cuBLAS (NEEDED libcublas, and the GEMM entry points the distiller calls);
#   * the hot (per-step) kernels use no local memory: cuobjdump -res-usage reports STACK:0 for each of them
#     (register spills and dynamically indexed local arrays both live in the stack frame, so STACK:0 means
#     neither; ptxas -v reports the same per kernel at build time).
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
  # (no grep -q in the pipe: its early exit would SIGPIPE the first grep and fail the pipe under pipefail)
  if ! grep -E "^sm_$1 " <<<"$SYMS" | grep -E "$3" >/dev/null; then
    echo "MISSING: sm_$1 kernel of family '$2' (pattern $3)"
    fail=1
  fi
}
sources=(reweight distiller mix_hidden capture)
newest=""
for a in $ARCHS; do
  newest=$a
  for s in "${sources[@]}"; do
    grep -Eq "ELF file +[0-9]+: ${s}\.sm_${a}\.cubin" <<<"$ELF" || { echo "MISSING: ${s}.sm_${a}.cubin"; fail=1; }
  done
  for d in 0 1 2; do  # DType kF32, kBF16, kF16 of the logits
    need "$a" "reweight row kernel (logits dtype $d)" "row_kernelILNS_5DTypeE${d}ELb0E"
    need "$a" "reweight_logits row kernel (logits dtype $d)" "row_kernelILNS_5DTypeE${d}ELb1E"
    need "$a" "dense GEMM + epilogue (mode $d of bf16, fp16, TF32)" "dense_kernelILi${d}E"
  done
  need "$a" "dense row list" "dense_list_kernel"
  need "$a" "dense finish" "dense_finish_kernel"
  need "$a" "dense streaming pass (cuBLAS variant)" "dense_stream_kernel"
  need "$a" "dense prediction copy (cuBLAS variant)" "dense_pcopy_kernel"
  need "$a" mix_hidden "mix_hidden_kernel"
  need "$a" capture "capture_kernel"
  for k in sort_kernel gather_kernel "rows_gemm_kernelILi1E" "rows_gemm_kernelILi2E" gate_fwd_kernel norm_fwd_kernel \
           fill_unsorted_kernel ptr_fill_kernel; do
    need "$a" "distiller forward" "$k"
  done
  for k in row_valid_kernel gate_bwd_kernel norm_stats_kernel norm_bwd_kernel gamma_grad_kernel dc_kernel \
           "wgrad_kernelILi0E" "wgrad_kernelILi1E" "wgrad_kernelILi2E" "wgrad_kernelILi3E" slot_prep_kernel \
           small_adam_kernel finalize_kernel; do
    need "$a" "distiller train step" "$k"
  done
  need "$a" "distiller reset" "reset_kernel"
  need "$a" "trainer counters mirror" "stats_mirror_kernel"
done
if [ -n "$newest" ]; then
  for s in "${sources[@]}"; do
    grep -Eq "PTX file +[0-9]+: ${s}\.sm_${newest}\.ptx" <<<"$PTX" || { echo "MISSING: ${s}.sm_${newest}.ptx"; fail=1; }
  done
fi
n=$(grep -c . <<<"$SYMS" || true)

# ---- cuBLAS linkage
echo "== cuBLAS linkage"
NEEDED=$(readelf -d "$LIB" 2>/dev/null | awk '/NEEDED/{print $NF}' | tr -d '[]')
if grep -q '^libcublas\.so' <<<"$NEEDED"; then
  echo "NEEDED: $(grep '^libcublas' <<<"$NEEDED" | tr '\n' ' ')"
else
  echo "MISSING: $LIB does not link libcublas (NEEDED: $(tr '\n' ' ' <<<"$NEEDED"))"
  fail=1
fi
UNDEF=$(nm -D --undefined-only "$LIB" 2>/dev/null | awk '{print $NF}')
for sym in cublasGemmEx cublasGemmBatchedEx; do
  if grep -q "^${sym}" <<<"$UNDEF"; then echo "uses $sym"; else echo "MISSING: no reference to $sym"; fail=1; fi
done

# ---- hot kernels: no local memory (no register spills)
echo "== local memory of the hot kernels (cuobjdump -res-usage)"
HOT='row_kernel|dense_kernel|dense_finish_kernel|dense_list_kernel|dense_stream_kernel|dense_pcopy_kernel|rows_gemm_kernel|wgrad_kernel|gate_fwd_kernel|gate_bwd_kernel|norm_fwd_kernel|norm_stats_kernel|norm_bwd_kernel|gamma_grad_kernel|dc_kernel|small_adam_kernel|finalize_kernel|slot_prep_kernel|sort_kernel|gather_kernel|row_valid_kernel|mix_hidden_kernel|capture_kernel|stats_mirror_kernel'
RES=$("$CO" -res-usage "$LIB" 2>&1 | awk '
  /^arch = /{arch=$3}
  /Function [^ ]+:$/{fn=$2; sub(/:$/, "", fn); next}
  /REG:[0-9]+ STACK:[0-9]+/ && fn != "" {
    reg=""; st="";
    for (i = 1; i <= NF; i++) { if ($i ~ /^REG:/) reg=substr($i, 5); if ($i ~ /^STACK:/) st=substr($i, 7) }
    print arch, fn, reg, st; fn=""
  }')
nhot=0
while read -r arch fn reg st; do
  [ -n "$fn" ] || continue
  grep -Eq "$HOT" <<<"$fn" || continue
  nhot=$((nhot + 1))
  if [ "$st" != "0" ]; then
    echo "LOCAL MEMORY: $arch $(c++filt "$fn" 2>/dev/null | cut -c1-120) uses a ${st}-byte stack frame (REG:$reg)"
    fail=1
  fi
done <<<"$RES"
if [ "$nhot" -eq 0 ]; then
  echo "MISSING: no hot kernel found in the resource usage"
  fail=1
fi
echo "hot kernels checked: $nhot (all architectures)"

if [ $fail -ne 0 ]; then
  echo "check_cubins: FAILED ($n kernel entries found)"
  exit 1
fi
echo "check_cubins: ok (archs: $ARCHS; $n kernel entries; PTX for sm_$newest; cuBLAS linked; $nhot hot kernels without local memory)"
