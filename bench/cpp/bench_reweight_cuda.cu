// C++ benchmark of esamp::reweight_cuda / reweight_logits_cuda (no libtorch: links esamp_core and
// esamp_cuda_kernels only).
//
//   bench_reweight_cuda [--reps 100] [--warmup 10] [--B 128] [--V 152064] [--H 3584]
//                       [--ldtype bf16|f32|f16] [--wdtype bf16|f32|f16] [--pdtype bf16|f32|f16]
//                       [--cases abcdefg] [--json FILE]
//   bench_reweight_cuda --smoke     # tiny sizes, a few reps, checks the outputs; exit code 0 = ok
//
// Problem (the recipe of bench_reweight_cpu, generated on the device): LM-like logits per row =
// 2 * N(0, 1) background plus a Zipf-shaped head on 256 tokens, head_j = s_r - a_r * ln(j + 1),
// s_r ~ U(12, 18), a_r ~ U(1, 2.5); W ~ N(0, 0.05^2) [V, H]; pred ~ N(0, 1) [B, H]; T = 1.
// Cases and the targets of issue 12 (B = 128, V = 152064, H = 3584, bf16 logits on an H200):
//   (a) reweight, min_p = 0.1, beta 0.25            target <= 3 x one logits read
//   (b) reweight, no filter, beta 0.25 (dense path)  target <= d = pred W^T GEMM + 2 logits reads
//   (c) reweight, no filter, beta = 0               target <= 2 x one logits read
//   (d) reweight, top_p = 0.9, beta 0.25; (e) reweight, top_k = 50, beta 0.25
//   (f) reweight_logits, min_p = 0.1; (g) reweight_logits, no filter (dense path)
// Baselines measured on the same device: "one logits read" = a kernel summing the logits (median), and
// "GEMM" = cuBLAS d = pred . W^T into float32 [B, V] (cublasGemmEx, fp32 accumulation, the pred/W dtypes
// of the run; TF32 when they differ).  Median / p10 / p90 of CUDA-event times over --reps after --warmup.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "esamp/common.h"
#include "esamp/cuda_plan.h"
#include "esamp/philox.h"
#include "esamp/sampling.h"
#include "bench_util.h"

using namespace esamp;
using namespace esamp_bench;

namespace {

// Zipf head: 256 distinct tokens per row (stride 997 from a per-row start), head_j = s - a ln(j + 1).
__global__ void fill_head(void* logits, DType dt, int64_t V, uint64_t seed) {
  const int64_t r = blockIdx.x;
  const int j = threadIdx.x;
  const uint64_t h = splitmix64(seed ^ (static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull));
  const float s = 12.f + 6.f * static_cast<float>(h & 0xffffff) / 16777216.f;
  const float a = 1.f + 1.5f * static_cast<float>((h >> 24) & 0xffffff) / 16777216.f;
  const int64_t start = static_cast<int64_t>((h >> 48) % static_cast<uint64_t>(V));
  const int64_t v = (start + static_cast<int64_t>(j) * 997) % V;
  store_from_float(logits, dt, r * V + v, s - a * logf(static_cast<float>(j + 1)));
}

// One read of the logits: a grid-stride sum in 16-byte loads (the "one logits read" baseline).
__global__ void read_kernel(const uint4* p, int64_t n16, float* out) {
  float acc = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n16;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 q = p[i];
    acc += __uint_as_float(q.x) + __uint_as_float(q.y) + __uint_as_float(q.z) + __uint_as_float(q.w);
  }
  if (acc == 12345.678f) out[0] = acc;  // keeps the loads; never true for these inputs in practice
}

cudaDataType_t cuda_type(DType d) {
  return d == DType::kF32 ? CUDA_R_32F : (d == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F);
}

template <typename F>
std::vector<double> time_us(F fn, cudaStream_t stream, int warmup, int reps) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  std::vector<double> us;
  for (int i = 0; i < warmup + reps; ++i) {
    CK(cudaEventRecord(e0, stream));
    fn();
    CK(cudaEventRecord(e1, stream));
    CK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= warmup) us.push_back(1e3 * ms);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return us;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 100, warmup = 10;
  int64_t B = 128, V = 152064, H = 3584;
  std::string ld = "bf16", wd = "bf16", pd = "bf16", which = "abcdefg", json;
  bool smoke = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return esamp_bench::arg_value(argc, argv, i); };
    if (a == "--smoke") smoke = true;
    else if (a == "--reps") reps = std::atoi(next());
    else if (a == "--warmup") warmup = std::atoi(next());
    else if (a == "--B") B = std::atoll(next());
    else if (a == "--V") V = std::atoll(next());
    else if (a == "--H") H = std::atoll(next());
    else if (a == "--ldtype") ld = next();
    else if (a == "--wdtype") wd = next();
    else if (a == "--pdtype") pd = next();
    else if (a == "--cases") which = next();
    else if (a == "--json") json = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (smoke) {
    B = 6;
    V = 5003;
    H = 72;
    reps = 3;
    warmup = 1;
  }
  if (reps < 1 || warmup < 0 || B < 1 || V < 1024 || H < 1) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  const DType ldt = parse_dtype(ld), wdt = parse_dtype(wd), pdt = parse_dtype(pd);
  int dev = 0;
  CK(cudaGetDevice(&dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  cudaStream_t stream;
  CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  const size_t lbytes = static_cast<size_t>(B * V) * dtype_size(ldt);
  void* logits = dalloc<char>((lbytes + 15) / 16 * 16);
  CK(cudaMemset(logits, 0, (lbytes + 15) / 16 * 16));
  void* pred = dalloc<char>(static_cast<size_t>(B * H) * dtype_size(pdt));
  void* W = dalloc<char>(static_cast<size_t>(V * H) * dtype_size(wdt));
  fill_normal<<<4096, 256, 0, stream>>>(logits, ldt, B * V, 1, 2.f);
  fill_head<<<static_cast<unsigned>(B), 256, 0, stream>>>(logits, ldt, V, 2);
  fill_normal<<<1024, 256, 0, stream>>>(pred, pdt, B * H, 3, 1.f);
  fill_normal<<<8192, 256, 0, stream>>>(W, wdt, V * H, 4, 0.05f);
  CK(cudaGetLastError());

  float *beta = dalloc<float>(B), *T = dalloc<float>(B), *top_p = dalloc<float>(B), *min_p = dalloc<float>(B);
  int64_t *top_k = dalloc<int64_t>(B), *seed = dalloc<int64_t>(B), *step = dalloc<int64_t>(B);
  int64_t* tokens = dalloc<int64_t>(B);
  float* logprobs = dalloc<float>(B);
  float* mixed = dalloc<float>(static_cast<size_t>(B * V));
  float* dgemm = dalloc<float>(static_cast<size_t>(B * V));
  float* sink = dalloc<float>(1);
  std::vector<int64_t> hseed(B), hstep(B, 7);
  for (int64_t r = 0; r < B; ++r) hseed[r] = static_cast<int64_t>(splitmix64(1000 + r));
  CK(cudaMemcpy(seed, hseed.data(), B * 8, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(step, hstep.data(), B * 8, cudaMemcpyHostToDevice));

  ReweightProblem pr;
  pr.B = B;
  pr.V = V;
  pr.H = H;
  pr.logits = logits;
  pr.logits_dtype = ldt;
  pr.logits_stride = V;
  pr.pred = pred;
  pr.pred_dtype = pdt;
  pr.pred_stride = H;
  pr.weight = W;
  pr.weight_dtype = wdt;
  pr.weight_stride = H;
  pr.p = {beta, T, top_k, top_p, min_p, seed, step};
  // dense path variant: ESAMP_CUDA_REWEIGHT_DENSE_GEMM = auto | fused | cublas (the handle below is passed)
  const int dense_gemm = reweight_dense_gemm_from_env();
  if (dense_gemm == -2) {
    std::printf("ESAMP_CUDA_REWEIGHT_DENSE_GEMM: expected auto, fused or cublas\n");
    return 2;
  }
  const size_t wsb = std::max(reweight_cuda_workspace_bytes(pr, -1, false, dense_gemm, true),
                              reweight_cuda_workspace_bytes(pr, -1, true, dense_gemm, true));
  void* ws = dalloc<char>(wsb);

  // ---- baselines: one read of the logits, the d = pred W^T GEMM (cuBLAS)
  const int64_t n16 = static_cast<int64_t>((lbytes + 15) / 16);
  const std::vector<double> rd = time_us([&] { read_kernel<<<4 * prop.multiProcessorCount, 512, 0, stream>>>(
                                                   static_cast<const uint4*>(logits), n16, sink); },
                                         stream, warmup, reps);
  const double read_us = pct(rd, 0.5);
  cublasHandle_t h;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) {
    std::printf("cublasCreate failed\n");
    return 1;
  }
  cublasSetStream(h, stream);
  const bool same = pdt == wdt && pdt != DType::kF32;
  double gemm_us = -1;
  {
    const float one = 1.f, zero = 0.f;
    cublasStatus_t gs = CUBLAS_STATUS_SUCCESS;
    // column-major: D^T [V, B] = W [V, H] . pred^T [H, B]
    const std::vector<double> g = time_us(
        [&] {
          gs = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(V), static_cast<int>(B), static_cast<int>(H),
                            &one, W, cuda_type(wdt), static_cast<int>(H), pred, cuda_type(same ? pdt : wdt),
                            static_cast<int>(H), &zero, dgemm, CUDA_R_32F, static_cast<int>(V),
                            same ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT);
        },
        stream, warmup, reps);
    if (gs == CUBLAS_STATUS_SUCCESS && (same || pdt == wdt)) gemm_us = pct(g, 0.5);
  }
  std::printf("bench_reweight_cuda on %s (%d SMs): B=%lld V=%lld H=%lld logits=%s W=%s pred=%s, %d reps after %d "
              "warm-up (CUDA events), workspace %.1f MB\n",
              prop.name, prop.multiProcessorCount, (long long)B, (long long)V, (long long)H, ld.c_str(), wd.c_str(),
              pd.c_str(), reps, warmup, wsb / 1e6);
  std::printf("dense path variant (ESAMP_CUDA_REWEIGHT_DENSE_GEMM): %s\n",
              dense_gemm == 0 ? "fused" : (dense_gemm == 1 ? "cublas" : "auto"));
  std::printf("baselines: one logits read %.1f us (%.0f GB/s); cuBLAS d = pred W^T %s\n", read_us,
              lbytes / (read_us * 1e-6) / 1e9,
              gemm_us > 0 ? (std::to_string(gemm_us) + " us").c_str() : "n/a (mixed dtypes)");

  struct Case {
    char id;
    const char* name;
    bool logits_out;
    float beta, min_p, top_p;
    int64_t top_k;
    const char* target;  // "3r", "g2r", "2r" or ""
  };
  const Case cases[] = {{'a', "(a) reweight min_p=0.1", false, 0.25f, 0.1f, 1.f, 0, "3r"},
                        {'b', "(b) reweight no filter", false, 0.25f, 0.f, 1.f, 0, "g2r"},
                        {'c', "(c) reweight no filter, beta=0", false, 0.f, 0.f, 1.f, 0, "2r"},
                        {'d', "(d) reweight top_p=0.9", false, 0.25f, 0.f, 0.9f, 0, ""},
                        {'e', "(e) reweight top_k=50", false, 0.25f, 0.f, 1.f, 50, ""},
                        {'f', "(f) reweight_logits min_p=0.1", true, 0.25f, 0.1f, 1.f, 0, ""},
                        {'g', "(g) reweight_logits no filter", true, 0.25f, 0.f, 1.f, 0, ""}};
  int fails = 0;
  std::string js = "{\"bench\": \"reweight_cuda\", \"device\": \"" + std::string(prop.name) +
                   "\", \"B\": " + std::to_string(B) + ", \"V\": " + std::to_string(V) + ", \"H\": " +
                   std::to_string(H) + ", \"logits\": \"" + ld + "\", \"weight\": \"" + wd + "\", \"pred\": \"" + pd +
                   "\", \"dense_gemm\": \"" + std::string(dense_gemm == 0 ? "fused" : (dense_gemm == 1 ? "cublas" : "auto")) +
                   "\", \"one_read_us\": " + std::to_string(read_us) + ", \"gemm_us\": " + std::to_string(gemm_us) +
                   ", \"cases\": [";
  bool first = true;
  for (const Case& c : cases) {
    if (which.find(c.id) == std::string::npos) continue;
    std::vector<float> hb(B, c.beta), hT(B, 1.f), hp(B, c.top_p), hm(B, c.min_p);
    std::vector<int64_t> hk(B, c.top_k);
    CK(cudaMemcpy(beta, hb.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(T, hT.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(top_p, hp.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(min_p, hm.data(), B * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(top_k, hk.data(), B * 8, cudaMemcpyHostToDevice));
    // candidate-set sizes (reweight_logits) and a validity check of the outputs
    Status st = reweight_logits_cuda(pr, mixed, V, ws, wsb, -1, stream, h, dense_gemm);
    if (st != Status::kOk) {
      std::printf("reweight_logits_cuda failed: %s\n", status_string(st));
      return 1;
    }
    std::vector<float> hmixed(static_cast<size_t>(B * V));
    CK(cudaMemcpyAsync(hmixed.data(), mixed, hmixed.size() * 4, cudaMemcpyDeviceToHost, stream));
    CK(cudaStreamSynchronize(stream));
    std::vector<double> sizes(B);
    for (int64_t r = 0; r < B; ++r) {
      int64_t n = 0;
      for (int64_t v = 0; v < V; ++v) n += std::isfinite(hmixed[r * V + v]) ? 1 : 0;
      sizes[r] = static_cast<double>(n);
      if (n < 1) ++fails;
    }
    Status run_st = Status::kOk;
    const std::vector<double> us = time_us(
        [&] {
          const Status s2 = c.logits_out ? reweight_logits_cuda(pr, mixed, V, ws, wsb, -1, stream, h, dense_gemm)
                                         : reweight_cuda(pr, tokens, logprobs, ws, wsb, -1, stream, h, dense_gemm);
          if (s2 != Status::kOk) run_st = s2;
        },
        stream, warmup, reps);
    if (run_st != Status::kOk) {
      std::printf("%s failed: %s\n", c.name, status_string(run_st));
      return 1;
    }
    if (!c.logits_out) {
      std::vector<int64_t> htok(B);
      std::vector<float> hlp(B);
      CK(cudaMemcpy(htok.data(), tokens, B * 8, cudaMemcpyDeviceToHost));
      CK(cudaMemcpy(hlp.data(), logprobs, B * 4, cudaMemcpyDeviceToHost));
      for (int64_t r = 0; r < B; ++r) {
        const bool in_c = htok[r] >= 0 && htok[r] < V && std::isfinite(hmixed[r * V + htok[r]]);
        if (!in_c || !(hlp[r] <= 0.f)) {
          std::printf("  row %lld: token %lld (in C: %d) logprob %g\n", (long long)r, (long long)htok[r], (int)in_c,
                      hlp[r]);
          ++fails;
        }
      }
    }
    const double med = pct(us, 0.5);
    double target = -1;
    if (std::string(c.target) == "3r") target = 3 * read_us;
    if (std::string(c.target) == "2r") target = 2 * read_us;
    if (std::string(c.target) == "g2r" && gemm_us > 0) target = gemm_us + 2 * read_us;
    std::printf("%-34s |C| median %7.0f (min %.0f, max %.0f)  median %9.1f us  p10 %9.1f  p90 %9.1f  = %.2f reads",
                c.name, pct(sizes, 0.5), pct(sizes, 0.0), pct(sizes, 1.0), med, pct(us, 0.1), pct(us, 0.9),
                med / read_us);
    if (target > 0) std::printf("  target %.1f us: %s", target, med <= target ? "met" : "MISSED");
    std::printf("\n");
    char buf[640];
    std::snprintf(buf, sizeof(buf),
                  "%s{\"case\": \"%s\", \"cand_median\": %.0f, \"median_us\": %.2f, \"p10_us\": %.2f, \"p90_us\": "
                  "%.2f, \"reads\": %.3f, \"target_us\": %.2f, \"target_met\": %s}",
                  first ? "" : ", ", c.name, pct(sizes, 0.5), med, pct(us, 0.1), pct(us, 0.9), med / read_us, target,
                  target > 0 ? (med <= target ? "true" : "false") : "null");
    js += buf;
    first = false;
  }
  js += "], \"output_check_failures\": " + std::to_string(fails) + "}\n";
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (f) {
      std::fputs(js.c_str(), f);
      std::fclose(f);
    }
  }
  cublasDestroy(h);
  std::printf("output checks: %s\n", fails ? "FAILED" : "ok");
  return fails ? 1 : 0;
}
