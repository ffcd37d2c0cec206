// distiller_cuda.cuh -- extra, torch-free declarations of the CUDA distiller beyond esamp/distiller.h.
// Plain C++ (no device code): included by the torch registration (ops_cuda.cpp) and the C++ benches.
#pragma once
#include <cstddef>
#include <cstdint>

#include "esamp/distiller.h"

namespace esamp {

// Workspace bytes distiller_forward_cuda needs (<= distiller_cuda_workspace_bytes, which is the
// train-step size: forward does not need the gradient buffers).
size_t distiller_cuda_forward_workspace_bytes(const DistillerShape& sh, int64_t S, int64_t N, int engine = -1,
                                              bool have_cublas = true);

}  // namespace esamp
