// C++ benchmark of esamp::reweight_cpu (no libtorch: links esamp_core only; the dense path uses
// esamp::sgemm_reference through CpuGemm{}).
//
//   bench_reweight_cpu [--reps N] [--warmup N] [--B 64] [--V 49152] [--H 576] [--wdtype f32|bf16] [--cases abc]
//   bench_reweight_cpu --selftest     # Philox known answers (SPEC 4) + a small sanity run; exit code 0 = ok
//
// Problem (same recipe as bench/bench_reweight.py): LM-like logits per row = 2 * N(0, 1) background plus a
// Zipf-shaped head on 256 random tokens, head_j = s_r - a_r * ln(j), s_r ~ U(12, 18), a_r ~ U(1, 2.5);
// W ~ N(0, 0.05^2) [V, H]; pred ~ N(0, 1) [B, H]; beta = 0.25, T = 1; cases (a) min_p = 0.05,
// (b) top_p = 0.9, (c) no filter.  Prints median / p10 / p90 microseconds over --reps runs after warm-up.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "esamp/philox.h"
#include "esamp/sampling.h"
#include "bench_util.h"

using namespace esamp;
using esamp_bench::pct;

namespace {

int selftest() {
  int fails = 0;
  struct Kat {
    uint32_t c[4], k[2], want[4];
  };
  const Kat kats[2] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
  };
  for (const Kat& k : kats) {
    U32x4 c{{k.c[0], k.c[1], k.c[2], k.c[3]}};
    U32x4 r = philox4x32_10(c, k.k[0], k.k[1]);
    for (int i = 0; i < 4; ++i) {
      if (r.v[i] != k.want[i]) {
        std::printf("philox KAT mismatch word %d: got %08x want %08x\n", i, r.v[i], k.want[i]);
        ++fails;
      }
    }
  }
  if (fails == 0) std::printf("philox known answers: ok\n");
  // Noise range: every word maps to a finite g.
  const float gmin = gumbel_from_word(0u), gmax = gumbel_from_word(0xffffffffu);
  if (!(std::isfinite(gmin) && std::isfinite(gmax) && gmin < gmax)) {
    std::printf("gumbel range wrong: [%g, %g]\n", gmin, gmax);
    ++fails;
  }
  // A small reweight run: tokens in range, logprobs <= 0.
  const int64_t B = 5, V = 37, H = 3;
  std::vector<float> logits(B * V), pred(B * H), W(V * H);
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  for (auto& x : logits) x = 3 * nd(g);
  for (auto& x : pred) x = nd(g);
  for (auto& x : W) x = 0.3f * nd(g);
  std::vector<float> beta(B, 0.25f), T(B, 1.f), top_p(B, 0.9f), min_p(B, 0.f);
  std::vector<int64_t> top_k(B, 0), seed(B), step(B, 3);
  std::iota(seed.begin(), seed.end(), 11);
  T[1] = 0.f;
  ReweightProblem pr;
  pr.B = B; pr.V = V; pr.H = H;
  pr.logits = logits.data(); pr.logits_stride = V;
  pr.pred = pred.data(); pr.pred_stride = H;
  pr.weight = W.data(); pr.weight_stride = H;
  pr.p = {beta.data(), T.data(), top_k.data(), top_p.data(), min_p.data(), seed.data(), step.data()};
  std::vector<int64_t> tok(B, -1);
  std::vector<float> lp(B);
  if (reweight_cpu(pr, tok.data(), lp.data(), CpuGemm{}) != Status::kOk) {
    std::printf("reweight_cpu failed\n");
    ++fails;
  }
  for (int64_t r = 0; r < B; ++r) {
    if (tok[r] < 0 || tok[r] >= V || lp[r] > 0.f) {
      std::printf("row %lld: token %lld logprob %g\n", (long long)r, (long long)tok[r], lp[r]);
      ++fails;
    }
  }
  std::printf("selftest: %s\n", fails ? "FAILED" : "ok");
  return fails ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 30, warmup = 3;
  int64_t B = 64, V = 49152, H = 576;
  std::string wdtype = "f32", which = "abc";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() { return esamp_bench::arg_value(argc, argv, i); };
    if (a == "--selftest") return selftest();
    if (a == "--reps") reps = std::atoi(next());
    else if (a == "--warmup") warmup = std::atoi(next());
    else if (a == "--B") B = std::atoll(next());
    else if (a == "--V") V = std::atoll(next());
    else if (a == "--H") H = std::atoll(next());
    else if (a == "--wdtype") wdtype = next();
    else if (a == "--cases") which = next();
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (reps < 1 || B < 1 || V < 256 || H < 1 || (wdtype != "f32" && wdtype != "bf16")) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }

  std::mt19937_64 g(0);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  std::vector<float> logits(B * V), pred(B * H), W(V * H);
  for (int64_t r = 0; r < B; ++r) {
    float* l = logits.data() + r * V;
    for (int64_t v = 0; v < V; ++v) l[v] = 2.f * nd(g);
    const float s = 12.f + 6.f * ud(g), a = 1.f + 1.5f * ud(g);
    std::vector<int64_t> perm(V);
    std::iota(perm.begin(), perm.end(), 0);
    for (int64_t j = 0; j < 256; ++j) {  // partial Fisher-Yates: 256 distinct head tokens
      std::uniform_int_distribution<int64_t> pick(j, V - 1);
      std::swap(perm[j], perm[pick(g)]);
      l[perm[j]] = s - a * std::log(static_cast<float>(j + 1));
    }
  }
  for (auto& x : pred) x = nd(g);
  for (auto& x : W) x = 0.05f * nd(g);
  std::vector<uint16_t> Wh;
  if (wdtype == "bf16") {
    Wh.resize(W.size());
    for (size_t i = 0; i < W.size(); ++i) Wh[i] = float_to_bf16_bits(W[i]);
  }

  std::vector<float> beta(B, 0.25f), T(B, 1.f), top_p(B, 1.f), min_p(B, 0.f);
  std::vector<int64_t> top_k(B, 0), seed(B), step(B, 0);
  std::iota(seed.begin(), seed.end(), 1000);
  ReweightProblem pr;
  pr.B = B; pr.V = V; pr.H = H;
  pr.logits = logits.data(); pr.logits_stride = V;
  pr.pred = pred.data(); pr.pred_stride = H;
  pr.weight = wdtype == "f32" ? static_cast<const void*>(W.data()) : Wh.data();
  pr.weight_dtype = wdtype == "f32" ? DType::kF32 : DType::kBF16;
  pr.weight_stride = H;
  pr.p = {beta.data(), T.data(), top_k.data(), top_p.data(), min_p.data(), seed.data(), step.data()};
  std::vector<int64_t> tok(B);
  std::vector<float> lp(B), mixed(B * V);

  std::printf("bench_reweight_cpu: B=%lld V=%lld H=%lld W=%s beta=0.25 T=1, CpuGemm=sgemm_reference, "
              "%d reps after %d warm-up\n", (long long)B, (long long)V, (long long)H, wdtype.c_str(), reps, warmup);
  struct Case {
    const char* name;
    float min_p, top_p;
  };
  const Case cases[] = {{"(a) min_p=0.05", 0.05f, 1.f}, {"(b) top_p=0.9", 0.f, 0.9f}, {"(c) no filter", 0.f, 1.f}};
  for (const Case& c : cases) {
    if (which.find(c.name[1]) == std::string::npos) continue;
    std::fill(min_p.begin(), min_p.end(), c.min_p);
    std::fill(top_p.begin(), top_p.end(), c.top_p);
    // Candidate-set sizes of this case (from reweight_logits).
    if (reweight_logits_cpu(pr, mixed.data(), V, CpuGemm{}) != Status::kOk) return 1;
    std::vector<double> sizes(B);
    for (int64_t r = 0; r < B; ++r) {
      int64_t n = 0;
      for (int64_t v = 0; v < V; ++v) n += std::isfinite(mixed[r * V + v]) ? 1 : 0;
      sizes[r] = static_cast<double>(n);
    }
    std::vector<double> us;
    for (int i = 0; i < warmup + reps; ++i) {
      for (int64_t r = 0; r < B; ++r) step[r] = i;
      const auto t0 = std::chrono::steady_clock::now();
      const Status st = reweight_cpu(pr, tok.data(), lp.data(), CpuGemm{});
      const auto t1 = std::chrono::steady_clock::now();
      if (st != Status::kOk) {
        std::printf("reweight_cpu failed: %s\n", status_string(st));
        return 1;
      }
      if (i >= warmup) us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    }
    std::printf("%-16s |C| median %7.0f (min %.0f, max %.0f)   median %10.1f us   p10 %10.1f   p90 %10.1f\n", c.name,
                pct(sizes, 0.5), pct(sizes, 0.0), pct(sizes, 1.0), pct(us, 0.5),
                pct(us, 0.1), pct(us, 0.9));
  }
  return 0;
}
