// Unit test of the host-side planning of the CUDA kernels (esamp/cuda_plan.h): the bucket bound that sizes
// every per-slot buffer and grid, the engine choices, the workspace layouts and their bounds (issue 12: a
// 1,024-row warm start of one slot in a 256-slot bank within 64 MB; no workspace growing as S x parameters),
// and the reweight plan (blocks per row, dense path, workspace).  Plain C++: runs on any CPU.
// Exit status 0 = every check passed (tests/test_cuda_plan.py runs it).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "esamp/cuda_plan.h"

using namespace esamp;

static int failures = 0, checks = 0;
#define EXPECT(cond, ...)                         \
  do {                                            \
    ++checks;                                     \
    if (!(cond)) {                                \
      ++failures;                                 \
      std::fprintf(stderr, "FAILED %s: ", #cond); \
      std::fprintf(stderr, __VA_ARGS__);          \
      std::fprintf(stderr, "\n");                 \
    }                                             \
  } while (0)

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// max over all partitions of N into at most A positive parts of sum ceil(part / cap)
static int64_t brute_max_buckets(int64_t N, int64_t A, int64_t cap) {
  int64_t best = 0;
  std::function<void(int64_t, int64_t, int64_t, int64_t)> rec = [&](int64_t left, int64_t parts, int64_t maxpart,
                                                                     int64_t acc) {
    if (left == 0) {
      best = std::max(best, acc);
      return;
    }
    if (parts == 0) return;
    for (int64_t p = std::min(left, maxpart); p >= 1; --p) rec(left - p, parts - 1, p, acc + cdiv(p, cap));
  };
  rec(N, A, N, 0);
  return best;
}

static DistillerShape shape(int64_t H, int64_t R, int64_t L) {
  DistillerShape sh;
  sh.H = H;
  sh.R = R;
  sh.L = L;
  return sh;
}

// Buffers of a plan as (offset, bytes, train-only) from the plan's own fields, recomputed here.
struct Buf {
  const char* name;
  size_t off, bytes;
  bool train;
};

static std::vector<Buf> buffers(const DistillerPlan& p) {
  const size_t P_ = static_cast<size_t>(p.R_pad), H = p.H, R = p.R, L = p.L, A = p.A_max, S = p.S;
  const size_t N = static_cast<size_t>(p.N > 0 ? p.N : 1);
  const size_t xb = P_ * H * 4, train_x = L + (p.x0_indirect ? 0 : 1);
  const DistillerLayout& l = p.lay;
  return {{"counts", l.counts, S * 4, false},
          {"cursor", l.cursor, S * 4, false},
          {"act_index", l.act_index, S * 4, false},
          {"seg_slot", l.seg_slot, A * 4, false},
          {"seg_n", l.seg_n, A * 4, false},
          {"seg_pos", l.seg_pos, A * 4, false},
          {"seg_tile0", l.seg_tile0, A * 4, false},
          {"meta", l.meta, 32, false},
          {"valid", l.valid, N * 4, false},
          {"inv", l.inv, N * 4, false},
          {"prow", l.prow, P_ * 4, false},
          {"pos_seg", l.pos_seg, P_ * 4, false},
          {"tile_seg", l.tile_seg, static_cast<size_t>(p.tiles_max) * 4, false},
          {"tile_off", l.tile_off, static_cast<size_t>(p.tiles_max) * 4, false},
          {"bucket_slot", l.bucket_slot, static_cast<size_t>(p.nb_max) * 4, false},
          {"ptrs", l.ptrs, static_cast<size_t>(p.n_ptr_arrays * p.nb_max) * sizeof(void*), false},
          {"Pb", l.Pb, L * P_ * 2 * R * 4, false},
          {"Act", l.Act, L * P_ * R * 4, false},
          {"part", l.part, static_cast<size_t>(p.splits) * P_ * 2 * R * 4, false},
          {"rinv", l.rinv, P_ * 4, false},
          {"X(fwd)", l.X, xb, false},
          {"X(train)", l.X, train_x * xb, true},
          {"G", l.G, (L > 1 ? L - 1 : 0) * xb, true},
          {"dP", l.dP, L * P_ * 2 * R * 4, true},
          {"row_loss", l.row_loss, P_ * 8, true},
          {"norm_part", l.norm_part, A * static_cast<size_t>(p.n_parts) * 8, true},
          {"sgrad", l.sgrad, A * static_cast<size_t>(p.sgrad_per_slot) * 4, true},
          {"slot_loss", l.slot_loss, A * 4, true},
          {"slot_coef", l.slot_coef, A * 4, true},
          {"slot_bc", l.slot_bc, 2 * A * 4, true},
          {"slot_ok", l.slot_ok, A * 4, true},
          {"grad", l.grad, p.wgrad == WgradEngine::kCublas ? static_cast<size_t>(p.P) * 4 : 0, true}};
}

static void check_layout(const DistillerPlan& p, const char* what) {
  EXPECT(p.ok, "%s: plan not ok", what);
  std::vector<Buf> b = buffers(p);
  for (const Buf& x : b) {
    EXPECT(x.off % 256 == 0, "%s: %s at offset %zu is not 256-byte aligned", what, x.name, x.off);
    const size_t limit = x.train ? p.lay.train_bytes : p.lay.fwd_bytes;
    EXPECT(x.off + x.bytes <= limit, "%s: %s [%zu, %zu) exceeds the %s layout (%zu bytes)", what, x.name, x.off,
           x.off + x.bytes, x.train ? "train" : "forward", limit);
  }
  // no two buffers of the train layout overlap (X(fwd) is the head of X(train))
  for (size_t i = 0; i < b.size(); ++i)
    for (size_t j = i + 1; j < b.size(); ++j) {
      if (b[i].bytes == 0 || b[j].bytes == 0) continue;
      if (std::string(b[i].name).rfind("X(", 0) == 0 && std::string(b[j].name).rfind("X(", 0) == 0) continue;
      const bool disjoint = b[i].off + b[i].bytes <= b[j].off || b[j].off + b[j].bytes <= b[i].off;
      EXPECT(disjoint, "%s: %s and %s overlap", what, b[i].name, b[j].name);
    }
  EXPECT(p.lay.train_bytes >= p.lay.fwd_bytes, "%s: train layout smaller than the forward one", what);
}

static void test_bucket_bound() {
  for (int64_t N = 1; N <= 14; ++N)
    for (int64_t A = 1; A <= 6; ++A)
      for (int64_t cap = 1; cap <= 9; ++cap) {
        const int64_t want = brute_max_buckets(N, std::min(A, N), cap);
        const int64_t got = bucket_bound(N, A, cap);
        EXPECT(got == want, "bucket_bound(N=%lld, A=%lld, cap=%lld) = %lld, the worst case is %lld", (long long)N,
               (long long)A, (long long)cap, (long long)got, (long long)want);
      }
  // random large distributions never exceed it
  std::mt19937_64 g(7);
  for (int it = 0; it < 2000; ++it) {
    const int64_t S = 1 + static_cast<int64_t>(g() % 300), N = 1 + static_cast<int64_t>(g() % 5000);
    const int64_t cap = int64_t{1} << (g() % 8);
    std::vector<int64_t> n(static_cast<size_t>(S), 0);
    const bool skew = g() % 2;
    for (int64_t i = 0; i < N; ++i) {
      const int64_t s = skew ? static_cast<int64_t>((g() % S) * (g() % S) / S) : static_cast<int64_t>(g() % S);
      ++n[static_cast<size_t>(s)];
    }
    int64_t used = 0;
    for (int64_t c : n) used += cdiv(c, cap);
    const int64_t A = std::min(S, N);
    EXPECT(used <= bucket_bound(N, A, cap), "random: %lld buckets > bound %lld (S=%lld N=%lld cap=%lld)",
           (long long)used, (long long)bucket_bound(N, A, cap), (long long)S, (long long)N, (long long)cap);
  }
  EXPECT(bucket_bound(0, 3, 4) == 0 && bucket_bound(5, 0, 4) == 0, "degenerate inputs");
}

static void test_distiller_plans() {
  DeviceInfo h200;  // 132 SMs, sm_90
  DistillerPlanOptions au;
  const DistillerShape big = shape(3584, 64, 2);
  const int64_t P = big.params_per_slot();

  // issue 12: warm start of 1,024 rows of one slot in a 256-slot bank -> SIMT, workspace <= 64 MB
  {
    const DistillerPlan p = plan_distiller(big, 256, 1024, h200, au);
    check_layout(p, "warm start");
    EXPECT(p.rows == RowsEngine::kSimt && p.wgrad == WgradEngine::kFusedSimt, "warm start: engines %d/%d",
           (int)p.rows, (int)p.wgrad);
    EXPECT(p.x0_indirect && p.cap == 1 && p.R_pad == 1024, "warm start: compact positions (R_pad %lld)",
           (long long)p.R_pad);
    EXPECT(p.lay.train_bytes <= 64u * 1000u * 1000u, "warm start: train workspace %.2f MB > 64 MB",
           p.lay.train_bytes / 1e6);
    std::printf("warm start (H=3584 R=64 L=2, S=256, N=1024): train workspace %.2f MB, forward %.2f MB, tiles <= %lld, "
                "split-K %d\n",
                p.lay.train_bytes / 1e6, p.lay.fwd_bytes / 1e6, (long long)p.tiles_max, p.splits);
  }
  // issue 12: 8 slots x 16 rows -> SIMT, exact 16-row tiles, split-K for the K = H products
  {
    const DistillerPlan p = plan_distiller(big, 8, 128, h200, au);
    check_layout(p, "8x16");
    EXPECT(p.rows == RowsEngine::kSimt && p.bm == kDistRowTileSmall, "8x16: engine %d, tile %d", (int)p.rows, p.bm);
    EXPECT(p.tiles_max == bucket_bound(128, 8, 16), "8x16: tiles_max %lld", (long long)p.tiles_max);
    EXPECT(p.splits >= 2 && p.splits <= kDistMaxSplits && p.kchunk % kDistGemmBK == 0 && p.kchunk * p.splits >= 3584 &&
               p.kchunk * (p.splits - 1) < 3584,
           "8x16: splits %d kchunk %lld", p.splits, (long long)p.kchunk);
    std::printf("8 slots x 16 rows: train workspace %.2f MB, splits %d\n", p.lay.train_bytes / 1e6, p.splits);
  }
  // shared mode: cuBLAS for everything, one dense bucket, a one-slot gradient buffer
  {
    const DistillerPlan p = plan_distiller(shape(3584, 384, 2), 1, 256, h200, au);
    check_layout(p, "shared");
    EXPECT(p.rows == RowsEngine::kCublas && p.wgrad == WgradEngine::kCublas && p.cap == 256 && p.nb_max == 1 &&
               p.R_pad == 256 && !p.x0_indirect && p.n_ptr_arrays == 0,
           "shared: engines %d/%d cap %lld nb %lld", (int)p.rows, (int)p.wgrad, (long long)p.cap, (long long)p.nb_max);
  }
  // no cuBLAS handle: SIMT only
  {
    DistillerPlanOptions o;
    o.have_cublas = false;
    const DistillerPlan p = plan_distiller(big, 1, 64, h200, o);
    check_layout(p, "no handle");
    EXPECT(p.rows == RowsEngine::kSimt && p.wgrad == WgradEngine::kFusedSimt, "no handle: engine %d", (int)p.rows);
  }
  // many uniform rows in few slots: auto picks cuBLAS buckets with little worst-case padding
  {
    const DistillerPlan p = plan_distiller(big, 2, 1024, h200, au);
    check_layout(p, "2 slots x 512");
    EXPECT(p.rows == RowsEngine::kCublas && p.cap >= kDistCublasMinCap &&
               static_cast<double>(p.R_pad) <= kDistCublasMaxWaste * 1024 && p.n_ptr_arrays == 12 * 2 &&
               p.wgrad == WgradEngine::kFusedSimt,
           "2 slots: engine %d cap %lld R_pad %lld", (int)p.rows, (long long)p.cap, (long long)p.R_pad);
  }
  // forced cuBLAS on the 8x16 problem: a power-of-two capacity, every distribution fits
  {
    DistillerPlanOptions o;
    o.rows_engine = 1;
    const DistillerPlan p = plan_distiller(big, 8, 128, h200, o);
    check_layout(p, "forced cuBLAS");
    EXPECT(p.rows == RowsEngine::kCublas && (p.cap & (p.cap - 1)) == 0 && p.nb_max == bucket_bound(128, 8, p.cap) &&
               p.R_pad == p.nb_max * p.cap && p.R_pad >= 128,
           "forced: cap %lld nb %lld R_pad %lld", (long long)p.cap, (long long)p.nb_max, (long long)p.R_pad);
    DistillerPlanOptions s;
    s.rows_engine = 0;
    const DistillerPlan q = plan_distiller(shape(64, 8, 1), 1, 10, h200, s);
    EXPECT(q.rows == RowsEngine::kSimt, "forced SIMT in shared mode: engine %d", (int)q.rows);
  }
  // the workspace never scales with S x parameters: at fixed N, growing the bank adds a few ints per slot
  {
    const DistillerPlan a = plan_distiller(big, 8, 128, h200, au);
    const DistillerPlan b = plan_distiller(big, 100000, 128, h200, au);
    const double per_slot = (static_cast<double>(b.lay.train_bytes) - static_cast<double>(a.lay.train_bytes)) /
                            (100000.0 - 8.0);
    EXPECT(per_slot < 64.0, "train workspace grows by %.1f bytes per slot (P = %lld)", per_slot, (long long)P);
    check_layout(b, "huge bank");
  }
  // a sweep of shapes: layouts are consistent, positions fit in int, grids in their limits
  std::mt19937_64 g(11);
  for (int it = 0; it < 3000; ++it) {
    const DistillerShape sh = shape(1 + static_cast<int64_t>(g() % 5000), 1 + static_cast<int64_t>(g() % 300),
                                    1 + static_cast<int64_t>(g() % 4));
    const int64_t S = 1 + static_cast<int64_t>(g() % 2000), N = static_cast<int64_t>(g() % 3000);
    DistillerPlanOptions o;
    o.rows_engine = static_cast<int>(g() % 3) - 1;
    o.have_cublas = g() % 4 != 0;
    DeviceInfo d;
    d.sm_count = 1 + static_cast<int>(g() % 200);
    const DistillerPlan p = plan_distiller(sh, S, N, d, o);
    check_layout(p, "sweep");
    EXPECT(p.R_pad >= std::max<int64_t>(N, 1) && p.R_pad <= (int64_t{1} << 30), "sweep: R_pad %lld for N %lld",
           (long long)p.R_pad, (long long)N);
    EXPECT(p.tiles_max >= cdiv(std::max<int64_t>(N, 1), p.bm), "sweep: tiles_max %lld", (long long)p.tiles_max);
    EXPECT(p.splits >= 1 && p.kchunk >= 1 && p.kchunk * p.splits >= sh.H && p.kchunk * (p.splits - 1) < sh.H,
           "sweep: splits %d kchunk %lld H %lld", p.splits, (long long)p.kchunk, (long long)sh.H);
    EXPECT(p.n_parts == p.wt_per_slot + p.parts_gamma + sh.L, "sweep: n_parts");
    if (p.rows == RowsEngine::kCublas) EXPECT(o.have_cublas && o.rows_engine != 0, "sweep: cuBLAS without a handle");
  }
  // bad shapes give no plan
  EXPECT(!plan_distiller(shape(0, 4, 1), 2, 3, h200, au).ok && !plan_distiller(shape(8, 4, 1), 0, 3, h200, au).ok,
         "invalid shapes are rejected");
}

static void test_reweight_plans() {
  DeviceInfo d;
  d.sm_count = 132;
  d.max_cluster = 8;
  ReweightPlanOptions au;
  // B = 128 fills the device: one block per row; small batches split rows over up to 8 blocks
  EXPECT(plan_reweight(128, 152064, 3584, d, au).cluster == 1, "B=128: cluster %d",
         plan_reweight(128, 152064, 3584, d, au).cluster);
  EXPECT(plan_reweight(1, 152064, 3584, d, au).cluster == 8, "B=1: cluster %d",
         plan_reweight(1, 152064, 3584, d, au).cluster);
  EXPECT(plan_reweight(64, 152064, 3584, d, au).cluster == 2, "B=64: cluster %d",
         plan_reweight(64, 152064, 3584, d, au).cluster);
  DeviceInfo a100 = d;
  a100.max_cluster = 1;
  a100.sm_count = 108;
  EXPECT(plan_reweight(1, 152064, 3584, a100, au).cluster == 1, "no clusters on this device");
  std::mt19937_64 g(5);
  for (int it = 0; it < 5000; ++it) {
    const int64_t B = static_cast<int64_t>(g() % 5000), V = 1 + static_cast<int64_t>(g() % 300000),
                  H = 1 + static_cast<int64_t>(g() % 9000);
    DeviceInfo di;
    di.sm_count = 1 + static_cast<int>(g() % 200);
    di.max_cluster = 1 << (g() % 4);
    ReweightPlanOptions o;
    o.dense = static_cast<int>(g() % 3) - 1;
    const ReweightPlan p = plan_reweight(B, V, H, di, o);
    EXPECT(p.ok, "reweight plan");
    const int c = p.cluster;
    EXPECT(c >= 1 && c <= di.max_cluster && (c & (c - 1)) == 0, "cluster %d (max %d)", c, di.max_cluster);
    if (c > 1) {
      EXPECT(B * c <= di.sm_count, "cluster %d x B %lld > %d SMs", c, (long long)B, di.sm_count);
      EXPECT(cdiv(V, kRwChunkElems) >= c, "cluster %d has blocks without a chunk (V %lld)", c, (long long)V);
    }
    EXPECT(p.dense_enabled == (o.dense != 0 && V >= kDenseMinV), "dense enabled for V %lld, option %d", (long long)V,
           o.dense);
    const size_t b = static_cast<size_t>(B > 0 ? B : 1);
    EXPECT(!p.dense_enabled || p.off_pred >= p.off_partials + b * static_cast<size_t>(p.n_vtiles) * sizeof(RwDensePartial),
           "partials overlap the prediction rows");
    EXPECT(p.n_vtiles == cdiv(V, kDenseBN) && p.dense_grid >= 1, "dense tiles");
    const size_t pred = p.pred_in_smem ? 0 : b * static_cast<size_t>(c) * static_cast<size_t>(p.Hp) * 4;
    EXPECT(p.off_pred + pred <= p.bytes && p.bytes % 256 == 0, "reweight workspace size");
    EXPECT(p.pred_in_smem == (H <= kRwPredSmemMaxH), "prediction staging");
  }
  EXPECT(sizeof(RwDensePartial) == 32 && sizeof(RwRowInfo) == 32, "struct sizes %zu %zu", sizeof(RwDensePartial),
         sizeof(RwRowInfo));
}

// The cuBLAS variant of the dense path: which operands it takes, its pieces (every operand of one
// cublasGemmEx call spans at most 2^31 - 1 elements and every piece is covered once), and the workspace.
static ReweightPlanOptions gemm_opts(DType pd, DType wd, int64_t ps, int64_t ws, int gemm = -1, bool have = true) {
  ReweightPlanOptions o;
  o.dense_gemm = gemm;
  o.have_cublas = have;
  o.pred_dtype = pd;
  o.weight_dtype = wd;
  o.pred_stride = ps;
  o.weight_stride = ws;
  return o;
}

static void check_pieces(const DenseGemmPlan& g, int64_t V, int64_t H, int64_t ws, const char* what) {
  const int64_t imax = 2147483647;
  EXPECT(g.v_chunk >= 1 && g.b_chunk >= 1 && g.ldd >= V && g.ldd % 4 == 0 && g.ldd <= imax, "%s: chunks", what);
  int64_t calls = 0, covered_v = 0, covered_b = 0;
  for (int64_t b0 = 0; b0 < g.d_rows; b0 += g.b_chunk) {
    const int64_t nb = std::min(g.b_chunk, g.d_rows - b0);
    covered_b += nb;
    for (int64_t v0 = 0; v0 < V; v0 += g.v_chunk) {
      const int64_t nv = std::min(g.v_chunk, V - v0);
      if (b0 == 0) covered_v += nv;
      ++calls;
      EXPECT(nv <= imax && nb <= imax && H <= imax && ws <= imax && g.ldp <= imax, "%s: int sizes", what);
      EXPECT((nv - 1) * ws + H <= imax, "%s: W piece spans %lld elements", what, (long long)((nv - 1) * ws + H));
      EXPECT((nb - 1) * g.ldp + H <= imax, "%s: pred piece", what);
      EXPECT((nb - 1) * g.ldd + nv <= imax, "%s: D piece spans %lld elements", what, (long long)((nb - 1) * g.ldd + nv));
      EXPECT(ws >= H && g.ldp >= H && g.ldd >= nv, "%s: leading dimensions", what);
    }
  }
  EXPECT(covered_v == V && covered_b == g.d_rows && calls == g.n_calls, "%s: pieces cover V x rows once", what);
}

static void test_dense_gemm_plans() {
  DeviceInfo d;
  d.sm_count = 132;
  d.max_cluster = 8;
  const int64_t B = 128, V = 152064, H = 3584;
  // issue-12 shape, bf16 prediction and LM head: auto = fused; cuBLAS when asked, one GEMM, D = B x V float32
  {
    const ReweightPlan a = plan_reweight(B, V, H, d, gemm_opts(DType::kBF16, DType::kBF16, H, H));
    EXPECT(a.dense_enabled && a.gemm == DenseGemm::kFused && !a.dg.cublas, "issue shape: fused variant by default");
    const ReweightPlan p = plan_reweight(B, V, H, d, gemm_opts(DType::kBF16, DType::kBF16, H, H, 1));
    EXPECT(p.dense_enabled && p.gemm == DenseGemm::kCublas, "issue shape: cuBLAS variant when asked");
    EXPECT(a.bytes < p.bytes, "auto: no D in the workspace");
    EXPECT(!p.dg.pedantic && !p.dg.copy_pred && p.dg.op_dtype == DType::kBF16, "bf16 x bf16 directly");
    EXPECT(p.dg.n_calls == 1 && p.dg.d_rows == B && p.dg.ldd == V, "one call over all rows");
    EXPECT(p.dg.d_bytes == static_cast<size_t>(B * V * 4), "D bytes %zu", p.dg.d_bytes);
    EXPECT(p.n_stiles == cdiv(V, kDenseStreamTile) && p.stream_grid >= 1 && p.stream_grid <= 8u * 132u,
           "stream tiles %lld grid %u", (long long)p.n_stiles, p.stream_grid);
    const ReweightPlan f = plan_reweight(B, V, H, d, gemm_opts(DType::kBF16, DType::kBF16, H, H, 0));
    EXPECT(f.gemm == DenseGemm::kFused && f.bytes < p.bytes, "fused requested");
    std::printf("reweight dense path B=128 V=152064 H=3584 bf16: cuBLAS workspace %.1f MB (D %.1f MB), fused %.2f MB\n",
                p.bytes / 1e6, p.dg.d_bytes / 1e6, f.bytes / 1e6);
    EXPECT(p.bytes >= p.dg.d_bytes + f.bytes - static_cast<size_t>(B * cdiv(V, kDenseBN)) * sizeof(RwDensePartial),
           "cuBLAS workspace holds D");
  }
  // no handle, dense off, small V: fused / no dense path, no D in the workspace
  EXPECT(plan_reweight(B, V, H, d, gemm_opts(DType::kBF16, DType::kBF16, H, H, 1, false)).gemm == DenseGemm::kFused,
         "no cuBLAS handle: fused");
  {
    ReweightPlanOptions o = gemm_opts(DType::kBF16, DType::kBF16, H, H, 1);
    o.dense = 0;
    const ReweightPlan p = plan_reweight(B, V, H, d, o);
    EXPECT(!p.dense_enabled && p.gemm == DenseGemm::kFused && p.off_pcopy == p.off_d, "dense off: no D");
    EXPECT(plan_reweight(B, 1000, H, d, gemm_opts(DType::kBF16, DType::kBF16, H, H, 1)).gemm == DenseGemm::kFused,
           "V below the dense minimum");
  }
  // operand pairs
  struct Pair {
    DType pd, wd;
    bool cublas, copy, pedantic;
    DType op;
  };
  const Pair pairs[] = {{DType::kBF16, DType::kBF16, true, false, false, DType::kBF16},
                        {DType::kF16, DType::kF16, true, false, false, DType::kF16},
                        {DType::kF32, DType::kF32, true, false, true, DType::kF32},
                        {DType::kBF16, DType::kF32, true, true, true, DType::kF32},
                        {DType::kF16, DType::kF32, true, true, true, DType::kF32},
                        {DType::kF32, DType::kBF16, false, false, false, DType::kF32},
                        {DType::kF32, DType::kF16, false, false, false, DType::kF32},
                        {DType::kBF16, DType::kF16, false, false, false, DType::kF32},
                        {DType::kF16, DType::kBF16, false, false, false, DType::kF32}};
  for (const Pair& q : pairs) {
    const DenseGemmPlan g = plan_dense_gemm(40, 5003, 200, gemm_opts(q.pd, q.wd, 200, 200, 1));
    EXPECT(g.cublas == q.cublas, "pair %d x %d: cublas %d", (int)q.pd, (int)q.wd, (int)g.cublas);
    if (!g.cublas) continue;
    EXPECT(g.copy_pred == q.copy && g.pedantic == q.pedantic && g.op_dtype == q.op, "pair %d x %d", (int)q.pd,
           (int)q.wd);
    EXPECT(g.copy_bytes == (q.copy ? static_cast<size_t>(40 * 200 * 4) : 0), "copy bytes %zu", g.copy_bytes);
    const ReweightPlan p = plan_reweight(40, 5003, 200, d, gemm_opts(q.pd, q.wd, 200, 200, 1));
    EXPECT(p.gemm == DenseGemm::kCublas, "plan uses the GEMM plan");
  }
  // strides
  EXPECT(!plan_dense_gemm(4, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 200, 100, 1)).cublas, "W stride < H");
  EXPECT(!plan_dense_gemm(4, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 200, 0, 1)).cublas, "W stride 0");
  EXPECT(!plan_dense_gemm(4, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 200, int64_t{1} << 31, 1)).cublas,
         "W stride beyond int");
  EXPECT(plan_dense_gemm(4, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 256, 264, 1)).ldp == 256, "strided rows");
  {
    const DenseGemmPlan g = plan_dense_gemm(4, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 0, 200, 1));
    EXPECT(g.cublas && g.d_rows == 1 && !g.copy_pred && g.d_bytes == static_cast<size_t>(5004 * 4),
           "broadcast prediction: one GEMM row");
    const DenseGemmPlan o = plan_dense_gemm(4, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 50, 200, 1));
    EXPECT(o.cublas && o.copy_pred && o.d_rows == 4 && o.ldp == 200, "overlapping prediction rows are copied");
    const DenseGemmPlan one = plan_dense_gemm(1, 5003, 200, gemm_opts(DType::kBF16, DType::kBF16, 7, 200, 1));
    EXPECT(one.cublas && !one.copy_pred && one.d_rows == 1 && one.ldp == 200, "one row: stride unused");
  }
  // pieces: beyond 2^31 elements of D or W the GEMM is split, every piece within int range
  {
    const DenseGemmPlan g = plan_dense_gemm(20000, V, H, gemm_opts(DType::kBF16, DType::kBF16, H, H, 1));
    EXPECT(g.cublas && g.n_calls >= 2, "B x V = %lld elements needs pieces (calls %lld)", (long long)(20000 * V),
           (long long)g.n_calls);
    check_pieces(g, V, H, H, "B=20000");
    const DenseGemmPlan w = plan_dense_gemm(8, 600000, 8192, gemm_opts(DType::kBF16, DType::kBF16, 8192, 8192, 1));
    EXPECT(w.cublas && w.v_chunk < 600000 && w.v_chunk % 128 == 0, "W of %lld elements split over V (chunk %lld)",
           (long long)(600000LL * 8192), (long long)w.v_chunk);
    check_pieces(w, 600000, 8192, 8192, "V x H > 2^31");
  }
  std::mt19937_64 g(11);
  for (int it = 0; it < 3000; ++it) {
    const int64_t b = 1 + static_cast<int64_t>(g() % 40000), v = 1024 + static_cast<int64_t>(g() % 400000),
                  h = 1 + static_cast<int64_t>(g() % 20000);
    const int64_t wsd = h + static_cast<int64_t>(g() % 3 == 0 ? g() % 100000 : 0);
    const int64_t psd = g() % 4 == 0 ? static_cast<int64_t>(g() % (2 * h + 1)) : h;
    const DType dts[3] = {DType::kF32, DType::kBF16, DType::kF16};
    const DType pd = dts[g() % 3], wd = dts[g() % 3];
    const ReweightPlanOptions o = gemm_opts(pd, wd, psd, wsd, static_cast<int>(g() % 3) - 1, g() % 5 != 0);
    DeviceInfo di;
    di.sm_count = 1 + static_cast<int>(g() % 200);
    const ReweightPlan p = plan_reweight(b, v, h, di, o);
    EXPECT(p.ok, "plan");
    const bool want = o.have_cublas && o.dense_gemm == 1 && wsd >= h && (pd == wd || wd == DType::kF32);
    EXPECT((p.gemm == DenseGemm::kCublas) == want, "random: cuBLAS %d, expected %d (pd %d wd %d ws %lld h %lld)",
           (int)(p.gemm == DenseGemm::kCublas), (int)want, (int)pd, (int)wd, (long long)wsd, (long long)h);
    if (p.gemm != DenseGemm::kCublas) continue;
    check_pieces(p.dg, v, h, wsd, "random");
    EXPECT(p.dg.d_rows == ((b > 1 && psd == 0) ? 1 : b), "D rows");
    const size_t bb = static_cast<size_t>(b);
    EXPECT(p.off_d % 256 == 0 && p.off_pcopy % 256 == 0, "alignment");
    EXPECT(p.off_partials + bb * static_cast<size_t>(p.n_stiles) * sizeof(RwDensePartial) <= p.off_pred &&
               p.off_pred <= p.off_d && p.off_d + p.dg.d_bytes <= p.off_pcopy &&
               p.off_pcopy + p.dg.copy_bytes <= p.bytes,
           "cuBLAS workspace layout");
  }
}

static void test_env() {
  setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", "fused", 1);
  EXPECT(reweight_dense_gemm_from_env() == 0, "fused");
  setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", "cublas", 1);
  EXPECT(reweight_dense_gemm_from_env() == 1, "cublas");
  setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", "tensor", 1);
  EXPECT(reweight_dense_gemm_from_env() == -2, "unknown value");
  setenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM", "auto", 1);
  EXPECT(reweight_dense_gemm_from_env() == -1, "auto");
  unsetenv("ESAMP_CUDA_REWEIGHT_DENSE_GEMM");
  setenv("ESAMP_CUDA_DISTILLER_ENGINE", "simt", 1);
  EXPECT(distiller_engine_from_env() == 0, "simt");
  setenv("ESAMP_CUDA_DISTILLER_ENGINE", "cublas", 1);
  EXPECT(distiller_engine_from_env() == 1, "cublas");
  setenv("ESAMP_CUDA_DISTILLER_ENGINE", "fast", 1);
  EXPECT(distiller_engine_from_env() == -2, "unknown value");
  unsetenv("ESAMP_CUDA_DISTILLER_ENGINE");
  EXPECT(distiller_engine_from_env() == -1, "unset");
  setenv("ESAMP_CUDA_REWEIGHT_DENSE", "force", 1);
  EXPECT(reweight_dense_from_env() == 1, "force");
  setenv("ESAMP_CUDA_REWEIGHT_DENSE", "off", 1);
  EXPECT(reweight_dense_from_env() == 0, "off");
  setenv("ESAMP_CUDA_REWEIGHT_DENSE", "auto", 1);
  EXPECT(reweight_dense_from_env() == -1, "auto");
  unsetenv("ESAMP_CUDA_REWEIGHT_DENSE");
}

int main() {
  test_bucket_bound();
  test_distiller_plans();
  test_reweight_plans();
  test_dense_gemm_plans();
  test_env();
  std::printf("test_cuda_plan: %d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
