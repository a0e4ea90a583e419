// CPU backend throughput: prefill and decode tokens/s of a model at given context lengths, each
// against a roofline measured in the same run (sgemm rate for prefill, memory bandwidth for
// decode).
//
//   cpu_model_bench --model models/scout-tiny-target [--contexts 1024,8192] [--decode-tokens 32]
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "runtime/cpu_model.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Best of several copies of a buffer far larger than the caches: bytes read + written per second.
double CopyBandwidth() {
  const size_t n = size_t{256} << 20;
  std::vector<char> a(n, 1), b(n, 2);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), n);
    best = std::min(best, Seconds(t0, Clock::now()));
    a[i] = b[n - 1 - i];  // keep the copies observable
  }
  return 2.0 * n / best;
}

// FLOP/s of a large single-precision GEMM through the same BLAS the backend uses.
double SgemmRate() {
  const int n = 1024;
  std::vector<float> a(n * n, 0.5f), b(n * n, 0.25f), c(n * n);
  double best = 1e30;
  for (int i = 0; i < 4; ++i) {
    auto t0 = Clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return 2.0 * n * n * n / best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir = "models/scout-tiny-target", contexts = "1024,8192";
  int64_t decode_tokens = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i];
    if (f == "--model") model_dir = argv[i + 1];
    else if (f == "--contexts") contexts = argv[i + 1];
    else if (f == "--decode-tokens") (void)absl::SimpleAtoi(argv[i + 1], &decode_tokens);
    else { std::fprintf(stderr, "unknown flag %s\n", f.c_str()); return 2; }
  }
  auto model = scout::runtime::CpuModel::Load(model_dir);
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
    return 1;
  }
  scout::runtime::CpuModel& m = **model;
  const auto& c = m.config();
  const double bw = CopyBandwidth(), rate = SgemmRate();
  const double params = static_cast<double>(m.weight_bytes()) / sizeof(float);
  const double kv_bytes_per_token = 2.0 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * sizeof(float);
  std::printf("model %s: %.2fM params (fp32 %.1f MB), KV %.0f bytes/token\n", model_dir.c_str(), params / 1e6,
              m.weight_bytes() / 1e6, kv_bytes_per_token);
  std::printf("baselines measured now: memcpy %.1f GB/s (read+write), sgemm %.1f GFLOP/s\n\n", bw / 1e9, rate / 1e9);
  std::printf("%8s | %14s %14s %7s | %14s %14s %7s\n", "context", "prefill tok/s", "sgemm roof", "ratio",
              "decode tok/s", "memory roof", "ratio");
  std::mt19937 rng(1);
  for (absl::string_view cs : absl::StrSplit(contexts, ',')) {
    int64_t ctx;
    if (!absl::SimpleAtoi(cs, &ctx) || ctx <= decode_tokens || ctx > c.max_position_embeddings) {
      std::fprintf(stderr, "bad context %s\n", std::string(cs).c_str());
      return 2;
    }
    const int64_t prompt = ctx - decode_tokens;
    std::vector<int32_t> ids(prompt);
    for (int32_t& t : ids) t = std::uniform_int_distribution<int32_t>(0, 255)(rng);
    if (!m.AddSequence(1).ok()) return 1;
    std::vector<float> logits;
    auto t0 = Clock::now();
    for (int64_t at = 0; at < prompt; at += 512) {
      scout::runtime::SequenceInput in{.seq = 1, .tokens = std::span<const int32_t>(ids).subspan(at, std::min<int64_t>(512, prompt - at))};
      if (absl::Status s = m.Forward({&in, 1}, &logits); !s.ok()) return 1;
    }
    auto t1 = Clock::now();
    int32_t tok = 0;
    for (int64_t i = 0; i < decode_tokens; ++i) {
      tok = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      scout::runtime::SequenceInput in{.seq = 1, .tokens = {&tok, 1}};
      if (absl::Status s = m.Forward({&in, 1}, &logits); !s.ok()) return 1;
    }
    auto t2 = Clock::now();
    (void)m.ReleaseSequence(1);
    const double prefill_tps = prompt / Seconds(t0, t1), decode_tps = decode_tokens / Seconds(t1, t2);
    // Prefill floor: 2 FLOP per parameter per token plus causal attention (QK and PV, 2 FLOP each).
    const double attn_flops = 2.0 * 2.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * (prompt / 2.0);
    const double prefill_roof = rate / (2.0 * params + attn_flops);
    // Decode floor: every weight and the whole KV read once per token (copy bandwidth counts
    // read + write, so bytes moved once cost half of it).
    const double decode_roof = (bw / 2.0) / (params * sizeof(float) + ctx * kv_bytes_per_token);
    std::printf("%8lld | %14.1f %14.1f %6.0f%% | %14.1f %14.1f %6.0f%%\n", static_cast<long long>(ctx), prefill_tps,
                prefill_roof, 100 * prefill_tps / prefill_roof, decode_tps, decode_roof, 100 * decode_tps / decode_roof);
  }
  return 0;
}
