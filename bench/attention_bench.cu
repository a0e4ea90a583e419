// Decode attention on the GPU at Llama-3.1-8B shapes (32 query heads, 8 KV heads, head dim 128,
// bf16, one layer): dense and STS block-sparse, against the HBM roofline measured in the same run
// and, when --sdpa-json names the output of bench/sdpa_baseline.py from the same machine, PyTorch
// SDPA. L2 is flushed before every timed launch: by default by writing 256 MB (as
// triton.testing.do_bench does, which leaves L2 full of dirty lines that the timed kernel's reads
// must write back), with --flush read by reading 256 MB (L2 full of clean lines), or not at all.
//
//   attention_bench [--contexts 32768,131072,524288,1048576] [--batches 1,16] [--q-tokens 1,5]
//                   [--keep 0.1] [--sdpa-json FILE] [--reps 20] [--flush write|read|none]
//                   [--cc 0] [--dense 0] [--splits N] [--tune 2k0,3f1,...] [--select-only 1]
//                   [--santa 256,2048] [--data random|peaked] [--peak-sigma 3] [--peak-corr 0.5]
//                   [--layout shuffled|contiguous] [--counters kept|memset] [--lookup table|slots]
//                   [--timeline 1]
//
// --lookup slots hands the sparse kernels each listed block's unit of the pool directly (as the
// host tier's block cache does) instead of logical blocks through the block table. --timeline 1
// prints, after each tensor-core decode row, where one launch's time went (PrintTimeline).
//
// Batch-1 STS rows are followed by two floors timed the same way: a device copy of the same
// bytes, and a plain kernel reading the same selected units where they lie.
//
// --counters: the in-kernel merge's arrival counters kept zero by the kernel in a buffer of the
// caller's (kept, as the runtime does) or zeroed by a memset before each launch.
//
// --layout: where each sequence's 16-token blocks sit in the paged pool: shuffled (default:
// scattered over the pool, as after long churn) or contiguous (in order, as for a session
// prefilled at once; the layout SDPA's contiguous tensors have).
//
// --santa adds SANTA rows (santaS over the dense list, sts+santaS over the sparse one) with err,
// the relative L2 distance from the exact kernel's output on the same inputs, and their speed
// against that exact kernel.
//
// --data: random (default) fills q, K and V uniform in [-2, 2): the attention of every head is
// nearly flat over tens of thousands of keys. peaked keeps V so and gives each key j of KV head h
// a salience x_jg per query head g of the group, x_jg = c z_j + sqrt(1 - c^2) y_jg (standard
// normals, c = --peak-corr: the heads of a group partly agree), and each query head a direction
// u_g of +-1 entries: k_j = sigma / sqrt(128) sum_g x_jg u_g + U(-1/4, 1/4) noise, q_g = u_g +
// U(-1/4, 1/4) noise, so head g's logits are about sigma x_jg (sigma = --peak-sigma) plus cross
// terms and noise: log-normal attention weights, a few keys carrying most of the mass and a long
// tail, as real heads at long context show (no sink or recency structure). The bench prints each
// head's measured effective support (exp(entropy) and 1 / sum p^2) over the first sequence's
// dense list, for its last query token, so the reader can judge.
//
// --tune adds, per case, dense and sts rows with the tensor-core kernel's knobs set: stages
// (2..4), merge (k: merge kernel, p: merge kernel as a programmatic dependent launch, f: merged
// by the last split CTA), K/V loads L2 evict-first (0/1). Their err column is the relative L2
// distance from the default kernel's output on the same inputs.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda_test_util.h"
#include "kernels/block_select.cuh"
#include "kernels/block_select_problem.h"
#include "kernels/santa.cuh"
#include "kernels/sparse_decode.cuh"
#include "kernels/sparse_decode_problem.h"

using namespace scout::kernels;

#define CHECK SCOUT_CUDA_CHECK

__global__ void EmptyKernel() {}

// Reads count 8 KiB units at kv + offsets[i] * 4096 elements (one warp a unit, all 16 loads of a
// lane issued together) and keeps only an xor of them: the floor of reading the same scattered
// units STS reads, without its arithmetic.
__global__ void __launch_bounds__(256) ReadUnits(const uint16_t* kv, const int64_t* offsets, int count, uint4* sink) {
  const int lane = threadIdx.x & 31;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int u = blockIdx.x * 8 + (threadIdx.x >> 5); u < count; u += gridDim.x * 8) {
    const uint4* src = reinterpret_cast<const uint4*>(kv + offsets[u] * 4096);
    uint4 v[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = src[i * 32 + lane];
#pragma unroll
    for (int i = 0; i < 16; ++i) acc.x ^= v[i].x, acc.y ^= v[i].y, acc.z ^= v[i].z, acc.w ^= v[i].w;
  }
  if (acc.x == 0x9e3779b9u && acc.y == 1u) sink[0] = acc;  // never in practice; keeps the loads
}

__global__ void FillBf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 15; x *= 2246822519u; x ^= x >> 13;
    // uniform in [-2, 2): a bf16 with 7 bits of mantissa
    float f = (float(x & 0xffff) / 65536.0f) * 4.0f - 2.0f;
    p[i] = static_cast<uint16_t>(__float_as_uint(f) >> 16);
  }
}

__device__ uint32_t Mix32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
  return uint32_t(x);
}
__device__ float Uniform01(uint64_t key) { return (Mix32(key) + 0.5f) * 0x1p-32f; }
__device__ float Gauss(uint64_t key) {
  return sqrtf(-2.0f * logf(Uniform01(key))) * cospif(2.0f * Uniform01(key ^ 0x5bd1e995ull << 32));
}
__device__ float Bf16Round(float f) { return __uint_as_float(__float_as_uint(f) & 0xffff0000u); }
// Sign of direction u_g of query head g (of KV head h) at dim d.
__device__ float DirSign(int h, int g, int d) { return (Mix32((uint64_t(h) * 64 + g) << 16 | d) & 1) ? 1.0f : -1.0f; }

// --data peaked (see the top of the file): kv [units = blocks x 8][2][16][128], q [rows][32][128].
__global__ void FillPeakedKv(uint16_t* kv, size_t n, float sigma, float corr) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const int d = i % 128, which = (i / (16 * 128)) % 2;
    const size_t unit = i / (2 * 16 * 128), key = unit * 16 + (i / 128) % 16;
    const int h = unit % 8;
    float f;
    if (which == 1) {
      f = Uniform01(i * 3 + 1) * 4.0f - 2.0f;
    } else {
      const float z = Gauss(key * 8 + 7), a = sigma / sqrtf(128.0f);
      f = (Uniform01(i * 3 + 2) - 0.5f) * 0.5f;
      for (int g = 0; g < 4; ++g) {
        const float x = corr * z + sqrtf(1.0f - corr * corr) * Gauss(key * 8 + g);
        f += a * x * DirSign(h, g, d);
      }
    }
    kv[i] = static_cast<uint16_t>(__float_as_uint(Bf16Round(f)) >> 16);
  }
}
__global__ void FillPeakedQ(uint16_t* q, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const int d = i % 128, head = (i / 128) % 32;
    const float f = DirSign(head / 4, head % 4, d) + (Uniform01(i * 5 + 3) - 0.5f) * 0.5f;
    q[i] = static_cast<uint16_t>(__float_as_uint(Bf16Round(f)) >> 16);
  }
}

// Reads n 16-byte words and writes nothing (sink is written only if the xor equals `never`).
__global__ void ReadFlush(const uint4* p, size_t n, uint32_t never, uint32_t* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const uint4 v = p[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == never) *sink = acc;
}

std::vector<long> ParseList(const std::string& s) {
  std::vector<long> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stol(item));
  return v;
}

// "ctx,batch,q" -> microseconds, from a flat JSON object written by sdpa_baseline.py.
std::map<std::string, double> ReadSdpa(const std::string& path) {
  std::map<std::string, double> m;
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t at = 0;
  while ((at = text.find('"', at)) != std::string::npos) {
    size_t end = text.find('"', at + 1);
    std::string key = text.substr(at + 1, end - at - 1);
    size_t colon = text.find(':', end);
    m[key] = std::strtod(text.c_str() + colon + 1, nullptr);
    at = text.find_first_of(",}", colon);
  }
  return m;
}

struct Timer {
  void* flush = nullptr;
  size_t flush_bytes = size_t{256} << 20;
  std::string mode = "write";
  cudaEvent_t a, b;
  Timer() {
    CHECK(cudaMalloc(&flush, flush_bytes));
    CHECK(cudaMemset(flush, 1, flush_bytes));
    CHECK(cudaEventCreate(&a));
    CHECK(cudaEventCreate(&b));
  }
  // Median microseconds of fn over reps launches, each after an L2 flush. First 100 ms of
  // untimed launches: after the host-side setup of a case the GPU has idled and its clocks
  // dropped (seen: the first case after setup ran 12% slower with 2 warm-up launches).
  template <typename F>
  double Median(F fn, int reps) {
    CHECK(cudaEventRecord(a));
    for (int i = 0;; ++i) {
      fn();
      if (i % 8 == 7) {
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        if (ms > 100.0f) break;
      }
    }
    std::vector<float> t;
    for (int i = 0; i < reps + 2; ++i) {
      Flush(i);
      CHECK(cudaEventRecord(a));
      fn();
      CHECK(cudaEventRecord(b));
      CHECK(cudaEventSynchronize(b));
      float ms;
      CHECK(cudaEventElapsedTime(&ms, a, b));
      if (i >= 2) t.push_back(ms * 1000.0f);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  }
  // fn once after the same flush as a timed launch, then waits for it.
  template <typename F>
  void Once(F fn, int i) {
    Flush(i);
    fn();
    CHECK(cudaDeviceSynchronize());
  }
  // The L2 flush before launch i: write (dirty lines, as do_bench), read (clean lines) or none.
  void Flush(int i) {
    if (mode == "write") {
      CHECK(cudaMemsetAsync(flush, i, flush_bytes));
    } else if (mode == "read") {
      ReadFlush<<<1056, 512>>>(static_cast<const uint4*>(flush), flush_bytes / 16, 0x9e3779b9u + i,
                               static_cast<uint32_t*>(flush));
      CHECK(cudaGetLastError());
    }
  }
};

// Where one launch's time goes, from the decode kernel's per-CTA %globaltimer stamps
// (SparseDecodePlan::timeline), relative to the first CTA's start, in us, median / max over CTAs:
// last CTA start; warp 0's first unit landed; warp 0's loop end and the CTA's last warp's; the
// warps' results merged in shared memory; the output or partial stored; arrived (in-kernel
// merge); and the merging CTAs' merge time after arriving.
void PrintTimeline(const std::vector<unsigned long long>& st, int ctas) {
  auto at = [&](int c, int k) { return st[size_t(c) * kTimelineStamps + k]; };
  unsigned long long t0 = ~0ull, end = 0;
  std::vector<double> start, first, loop0, loop_all, merged, stored, arrived, merge;
  std::map<unsigned long long, int> per_sm;
  for (int c = 0; c < ctas; ++c) {
    if (at(c, 0) != 0) t0 = std::min(t0, at(c, 0));  // a CTA past its group's rows stamps nothing
  }
  auto rel = [&](unsigned long long t) { return (t - t0) * 1e-3; };
  for (int c = 0; c < ctas; ++c) {
    if (at(c, 0) == 0) continue;
    for (int k : {5, 6, 7}) end = std::max(end, at(c, k));
    start.push_back(rel(at(c, 0)));
    if (at(c, 1) != 0) first.push_back(rel(at(c, 1)));
    loop0.push_back(rel(at(c, 2)));
    loop_all.push_back(rel(at(c, 3)));
    merged.push_back(rel(at(c, 4)));
    stored.push_back(rel(at(c, 5)));
    if (at(c, 6) != 0) arrived.push_back(rel(at(c, 6)));
    if (at(c, 7) != 0) merge.push_back((at(c, 7) - at(c, 6)) * 1e-3);
    ++per_sm[at(c, 8)];
  }
  auto q = [](std::vector<double> v, double f) {
    if (v.empty()) return 0.0;
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, size_t(f * (v.size() - 1) + 0.5))];
  };
  int most = 0;
  for (auto& [sm, n] : per_sm) most = std::max(most, n);
  std::printf("%8s %5s %3s %14s | span %.1f us; start last %.1f; first unit %.1f/%.1f; warp 0 done %.1f/%.1f; "
              "all warps %.1f/%.1f; merged %.1f/%.1f; stored %.1f/%.1f; arrived %.1f/%.1f; merge %.1f/%.1f; %d CTAs "
              "on %zu SMs (<= %d each)\n",
              "", "", "", "(timeline)", rel(end), q(start, 1.0), q(first, 0.5), q(first, 1.0), q(loop0, 0.5),
              q(loop0, 1.0), q(loop_all, 0.5), q(loop_all, 1.0), q(merged, 0.5), q(merged, 1.0), q(stored, 0.5),
              q(stored, 1.0), q(arrived, 0.5), q(arrived, 1.0), q(merge, 0.5), q(merge, 1.0), int(start.size()),
              per_sm.size(), most);
}

// Effective support of each query head's attention (last query token of sequence 0, its dense
// list): exp(entropy) and 1 / sum p^2, from the device's q and K in double precision.
void PrintSupport(const DecodeProblem& pr, const uint16_t* kv_dev, const uint16_t* q_dev, int q_tokens) {
  const int len = pr.seq_lens[0], nb = (len + 15) / 16;
  std::vector<uint16_t> q(32 * 128), k(size_t(len) * 128);
  CHECK(cudaMemcpy(q.data(), q_dev + size_t(q_tokens - 1) * 32 * 128, q.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<double> ent(32), inv_sq(32);
  for (int h = 0; h < 8; ++h) {
    for (int b = 0; b < nb; ++b) {
      const size_t unit = (size_t(pr.block_table[b]) * 8 + h) * 2 * 16 * 128;
      const int n = std::min(16, len - b * 16);
      CHECK(cudaMemcpy(k.data() + size_t(b) * 16 * 128, kv_dev + unit, size_t(n) * 128 * 2, cudaMemcpyDeviceToHost));
    }
    for (int g = 0; g < 4; ++g) {
      const int head = h * 4 + g;
      std::vector<double> lg(len);
      double mx = -1e300;
      for (int j = 0; j < len; ++j) {
        double dot = 0;
        for (int d = 0; d < 128; ++d) dot += double(Bf16ToFloat(q[head * 128 + d])) * Bf16ToFloat(k[size_t(j) * 128 + d]);
        lg[j] = dot / std::sqrt(128.0);
        mx = std::max(mx, lg[j]);
      }
      double sum = 0;
      for (double& x : lg) sum += (x = std::exp(x - mx));
      double h_nat = 0, sq = 0;
      for (double x : lg) {
        const double p = x / sum;
        if (p > 0) h_nat -= p * std::log(p);
        sq += p * p;
      }
      ent[head] = std::exp(h_nat);
      inv_sq[head] = 1.0 / sq;
    }
  }
  std::printf("attention support over %d keys, per query head (exp(entropy) / (1 / sum p^2)):\n", len);
  for (int head = 0; head < 32; ++head) {
    std::printf("  h%02d %6.0f/%-5.0f%s", head, ent[head], inv_sq[head], head % 8 == 7 ? "\n" : "");
  }
  std::vector<double> e = ent, s2 = inv_sq;
  std::sort(e.begin(), e.end());
  std::sort(s2.begin(), s2.end());
  std::printf("  median exp(entropy) %.0f, median 1/sum p^2 %.0f\n", e[16], s2[16]);
}

int main(int argc, char** argv) {
  std::string contexts = "32768,131072,524288,1048576", batches = "1,16", qtoks = "1,5", sdpa_path;
  double keep = 0.1;
  std::vector<int> santa_samples;
  int force_splits = 0;  // 0: the planner's choice
  int reps = 20;
  bool cc = true, dense = true, select_only = false;
  bool timeline = false;
  std::string lookup = "table";
  std::string flush = "write", data = "random", layout = "shuffled", counters_mode = "kept";
  float peak_sigma = 3.0f, peak_corr = 0.5f;
  std::vector<std::string> tunes;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i], v = argv[i + 1];
    if (f == "--contexts") contexts = v;
    else if (f == "--batches") batches = v;
    else if (f == "--q-tokens") qtoks = v;
    else if (f == "--keep") keep = std::stod(v);
    else if (f == "--sdpa-json") sdpa_path = v;
    else if (f == "--reps") reps = std::stoi(v);
    else if (f == "--splits") force_splits = std::stoi(v);
    else if (f == "--santa") for (long x : ParseList(v)) santa_samples.push_back(int(x));
    else if (f == "--flush") flush = v;
    else if (f == "--timeline") timeline = v != "0";
    else if (f == "--lookup") lookup = v;
    else if (f == "--data") data = v;
    else if (f == "--layout") layout = v;
    else if (f == "--counters") counters_mode = v;
    else if (f == "--peak-sigma") peak_sigma = std::stof(v);
    else if (f == "--peak-corr") peak_corr = std::stof(v);
    else if (f == "--cc") cc = v != "0";
    else if (f == "--dense") dense = v != "0";
    else if (f == "--select-only") select_only = v != "0";
    else if (f == "--tune") {
      std::stringstream ss(v);
      std::string item;
      while (std::getline(ss, item, ',')) {
        if (item.size() != 3 || item[0] < '2' || item[0] > '4' || std::string("kpf").find(item[1]) == std::string::npos ||
            (item[2] != '0' && item[2] != '1')) {
          std::fprintf(stderr, "bad --tune item %s\n", item.c_str());
          return 2;
        }
        tunes.push_back(item);
      }
    }
    else { std::fprintf(stderr, "unknown flag %s\n", f.c_str()); return 2; }
  }
  std::map<std::string, double> sdpa;
  if (!sdpa_path.empty()) sdpa = ReadSdpa(sdpa_path);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  size_t free_b, total_b;
  CHECK(cudaMemGetInfo(&free_b, &total_b));
  Timer timer;
  if (flush != "write" && flush != "read" && flush != "none") {
    std::fprintf(stderr, "--flush write|read|none\n");
    return 2;
  }
  timer.mode = flush;
  if (counters_mode != "kept" && counters_mode != "memset") {
    std::fprintf(stderr, "--counters kept|memset\n");
    return 2;
  }
  unsigned int* kept_counters = nullptr;  // zero, and left zero by every launch
  if (counters_mode == "kept") {
    CHECK(cudaMalloc(&kept_counters, 65536 * sizeof(unsigned int)));
    CHECK(cudaMemset(kept_counters, 0, 65536 * sizeof(unsigned int)));
  }
  if (layout != "shuffled" && layout != "contiguous") {
    std::fprintf(stderr, "--layout shuffled|contiguous\n");
    return 2;
  }
  if (data != "random" && data != "peaked") {
    std::fprintf(stderr, "--data random|peaked\n");
    return 2;
  }
  if (lookup != "table" && lookup != "slots") {
    std::fprintf(stderr, "--lookup table|slots\n");
    return 2;
  }
  std::map<std::string, double> sts_us;  // "ctx,batch,q" -> sparse attention time of one layer
  std::map<long, bool> support_done;     // contexts whose attention support was printed

  // Copy bandwidth (bytes read + written) of a 2 GiB device-to-device copy.
  double copy_bw;
  {
    const size_t n = size_t{1} << 30;
    void *x, *y;
    CHECK(cudaMalloc(&x, n));
    CHECK(cudaMalloc(&y, n));
    double us = timer.Median([&] { CHECK(cudaMemcpyAsync(y, x, n, cudaMemcpyDeviceToDevice)); }, 10);
    copy_bw = 2.0 * n / (us * 1e-6);
    CHECK(cudaFree(x));
    CHECK(cudaFree(y));
  }
  const double empty_us = timer.Median([] { EmptyKernel<<<132, 128>>>(); CHECK(cudaGetLastError()); }, reps);
  std::printf("device: %s, %d SMs, L2 %d MB; copy bandwidth %.2f TB/s (read + write, 1 GiB D2D); an empty kernel "
              "timed the same way: %.1f us\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, copy_bw / 1e12, empty_us);
  std::printf("L2 flush before each timed launch: %s; blocks of each sequence: %s; merge counters: %s; sparse lists "
              "read through: %s\n", flush.c_str(), layout.c_str(), counters_mode.c_str(),
              lookup == "slots" ? "unit slots" : "the block table");
  if (data == "peaked") {
    std::printf("data: peaked, sigma %.2f, heads' salience correlation %.2f\n", peak_sigma, peak_corr);
  } else {
    std::printf("data: random, q, K, V uniform in [-2, 2)\n");
  }
  std::printf("shape: 32 q heads, 8 KV heads, head dim 128, bf16, one layer; sparse keeps %.0f%% of blocks + sink + last\n\n",
              keep * 100);
  std::printf("%8s %5s %3s %14s | %10s %9s %8s %8s | %10s %8s\n", "context", "batch", "q", "kind", "us", "TB/s",
              "roofline", "splits", "sdpa us", "vs sdpa");

  for (long ctx : select_only ? std::vector<long>{} : ParseList(contexts)) {
    for (long batch : ParseList(batches)) {
      for (long qt : ParseList(qtoks)) {
        const size_t kv_bytes = size_t(batch) * ctx * 8 * 2 * 128 * 2;
        if (kv_bytes + (size_t{2} << 30) > free_b) {
          std::printf("%8ld %5ld %3ld   skip | KV of %.1f GiB does not fit with room to spare\n", ctx, batch, qt,
                      kv_bytes / double(1 << 30));
          continue;
        }
        struct Variant { double frac; int rows; const char* name; int santa = 0; const char* tune = nullptr; };
        std::vector<Variant> variants = {{-1.0, 0, "dense"}, {keep, 0, "sts"}};
        if (int cc_rows = SparseDecodeCudaCoreRows(32, 8, int(qt)); cc && cc_rows > 0) {
          variants.push_back({-1.0, cc_rows, "dense-cc"});
          variants.push_back({keep, cc_rows, "sts-cc"});
        }
        if (!dense) {
          variants.erase(std::remove_if(variants.begin(), variants.end(), [](const Variant& v) { return v.frac < 0; }),
                         variants.end());
        }
        for (const std::string& t : tunes) {
          static char names[64][24];
          static int used = 0;
          char* dn = names[used++ % 64];
          std::snprintf(dn, 24, "dense/%s", t.c_str());
          char* sn = names[used++ % 64];
          std::snprintf(sn, 24, "sts/%s", t.c_str());
          if (dense) variants.push_back({-1.0, 16, dn, 0, t.c_str()});
          variants.push_back({keep, 16, sn, 0, t.c_str()});
        }
        for (int S : santa_samples) {
          static char names[16][24];
          static int used = 0;
          char* dn = names[used++ % 16];
          std::snprintf(dn, 24, "santa%d", S);
          char* sn = names[used++ % 16];
          std::snprintf(sn, 24, "sts+santa%d", S);
          variants.push_back({-1.0, 16, dn, S});
          variants.push_back({keep, 16, sn, S});
        }
        std::map<double, std::vector<uint16_t>> exact_out;  // list kind -> output of the exact kernel
        std::map<double, double> exact_us;                   // list kind -> its time
        for (const Variant& var : variants) {
          const double frac = var.frac;
          DecodeShape shape{.seq_lens = std::vector<int>(batch, int(ctx)), .q_tokens = std::vector<int>(batch, int(qt)),
                            .num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .keep_fraction = frac,
                            .shuffle_blocks = layout == "shuffled"};
          DecodeProblem pr = MakeDecodeProblem(shape, 1234, /*fill_values=*/false);
          SparseDecodeParams p = pr.params();
          const size_t kv_elems = size_t(pr.num_blocks) * 8 * 2 * kKvBlockSize * 128;
          const size_t q_elems = size_t(pr.total_q_rows()) * 32 * 128;
          uint16_t *kv, *q, *out;
          int32_t *qi, *sl, *bt, *si = nullptr, *sb = nullptr, *ss = nullptr;
          CHECK(cudaMalloc(&kv, kv_elems * 2));
          CHECK(cudaMalloc(&q, q_elems * 2));
          CHECK(cudaMalloc(&out, q_elems * 2));
          if (data == "peaked") {
            FillPeakedKv<<<1024, 256>>>(kv, kv_elems, peak_sigma, peak_corr);
            FillPeakedQ<<<64, 256>>>(q, q_elems);
          } else {
            FillBf16<<<1024, 256>>>(kv, kv_elems, 1);
            FillBf16<<<64, 256>>>(q, q_elems, 2);
          }
          CHECK(cudaGetLastError());
          if (data == "peaked" && frac < 0 && !support_done.count(ctx)) {
            support_done[ctx] = true;
            PrintSupport(pr, kv, q, int(qt));
          }
          auto up = [](const std::vector<int32_t>& v, int32_t** d) {
            CHECK(cudaMalloc(d, std::max<size_t>(4, v.size() * 4)));
            CHECK(cudaMemcpy(*d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
          };
          up(pr.q_indptr, &qi);
          up(pr.seq_lens, &sl);
          up(pr.block_table, &bt);
          if (frac >= 0) {
            up(pr.sel_indptr, &si);
            up(pr.sel_blocks, &sb);
            if (lookup == "slots") {
              // Each entry's unit of the pool, as the host tier's block cache hands them over: one
              // dependent load (list entry) before the K/V copies instead of two (and the block table).
              std::vector<int32_t> slots(pr.sel_blocks.size());
              for (int s = 0; s < batch; ++s) {
                for (int h = 0; h < 8; ++h) {
                  for (int e = pr.sel_indptr[s * 8 + h]; e < pr.sel_indptr[s * 8 + h + 1]; ++e) {
                    slots[e] = pr.block_table[size_t(s) * pr.max_blocks_per_seq + pr.sel_blocks[e]] * 8 + h;
                  }
                }
              }
              up(slots, &ss);
            }
          }
          p.q = q; p.out = out; p.kv = kv; p.q_indptr = qi; p.seq_lens = sl; p.block_table = bt;
          p.sel_indptr = si; p.sel_blocks = sb; p.sel_slots = ss;
          const int rows = var.rows > 0 ? var.rows : SparseDecodeRowsPerCta();
          const int stages = var.tune != nullptr ? var.tune[0] - '0' : 0;
          const int ctas = SparseDecodeCtasPerSm(128, rows, stages);
          SparseDecodePlan plan = PlanSparseDecode(p.num_seqs, 32, 8, int(qt), pr.max_list_blocks(),
                                                   pr.total_q_rows(), 128, prop.multiProcessorCount, ctas,
                                                   force_splits, rows);
          if (var.tune != nullptr) {
            plan.stages = stages;
            plan.merge = var.tune[1] == 'k'   ? SparseDecodeMerge::kKernel
                         : var.tune[1] == 'p' ? SparseDecodeMerge::kKernelPdl
                                              : SparseDecodeMerge::kInKernel;
            plan.kv_evict_first = var.tune[2] == '1';
          }
          SantaPlan splan;
          if (var.santa > 0) {
            splan = PlanSanta(p.num_seqs, 32, 8, int(qt), pr.max_list_blocks(), pr.total_q_rows(), 128,
                              prop.multiProcessorCount, SparseDecodeCtasPerSm(128, 16));
          }
          void* ws;
          CHECK(cudaMalloc(&ws, var.santa > 0 ? splan.workspace_bytes : plan.workspace_bytes));
          uint64_t seed = 1;
          std::function<void()> timeline_text;
          double us = var.santa > 0
                          ? timer.Median([&] { CHECK(Santa({.attn = p, .samples = var.santa, .seed = seed++}, splan, ws, nullptr)); }, reps)
                          : timer.Median([&] { CHECK(SparseDecode(p, plan, ws, nullptr, kept_counters)); }, reps);
          if (timeline && var.santa == 0 && rows == 16) {
            // Three stamped launches after the same flush; the one of median span is printed.
            const int ctas_total = plan.row_groups * plan.num_splits * p.num_seqs * p.num_kv_heads;
            unsigned long long* dst;
            CHECK(cudaMalloc(&dst, size_t(ctas_total) * kTimelineStamps * 8));
            SparseDecodePlan stamped = plan;
            stamped.timeline = dst;
            std::vector<std::pair<unsigned long long, std::vector<unsigned long long>>> runs;
            for (int i = 0; i < 3; ++i) {
              CHECK(cudaMemset(dst, 0, size_t(ctas_total) * kTimelineStamps * 8));
              timer.Once([&] { CHECK(SparseDecode(p, stamped, ws, nullptr, kept_counters)); }, i);
              std::vector<unsigned long long> st(size_t(ctas_total) * kTimelineStamps);
              CHECK(cudaMemcpy(st.data(), dst, st.size() * 8, cudaMemcpyDeviceToHost));
              unsigned long long lo = ~0ull, hi = 0;
              for (int c = 0; c < ctas_total; ++c) {
                if (st[size_t(c) * kTimelineStamps] == 0) continue;
                lo = std::min(lo, st[size_t(c) * kTimelineStamps]);
                for (int k : {5, 6, 7}) hi = std::max(hi, st[size_t(c) * kTimelineStamps + k]);
              }
              runs.push_back({hi - lo, std::move(st)});
            }
            std::sort(runs.begin(), runs.end(), [](auto& x, auto& y) { return x.first < y.first; });
            timeline_text = [&, st = runs[1].second, ctas_total] { PrintTimeline(st, ctas_total); };
            CHECK(cudaFree(dst));
          }
          std::vector<uint16_t> host_out(q_elems);
          CHECK(cudaMemcpy(host_out.data(), out, q_elems * 2, cudaMemcpyDeviceToHost));
          char err_text[64] = "";
          if (var.santa == 0 && var.rows == 0) {
            exact_out[frac] = host_out;
            exact_us[frac] = us;
          }
          if ((var.santa > 0 || var.tune != nullptr) && exact_out.count(frac)) {
            double num = 0, den = 0;
            for (size_t i = 0; i < q_elems; ++i) {
              const double a = Bf16ToFloat(host_out[i]), b = Bf16ToFloat(exact_out[frac][i]);
              num += (a - b) * (a - b);
              den += b * b;
            }
            std::snprintf(err_text, sizeof err_text, " err %.3f, %.2fx exact", std::sqrt(num / den),
                          exact_us[frac] / us);
          }
          // Bytes the kernel must read: the listed blocks' K and V (whole blocks), q, and out written.
          size_t blocks = 0;
          if (frac < 0) {
            blocks = size_t(batch) * 8 * ((ctx + 15) / 16);
          } else {
            blocks = pr.sel_blocks.size();
          }
          // SANTA: K of every listed block, at most S value rows per (sequence, KV head, row group).
          const double bytes =
              var.santa > 0
                  ? double(blocks) * kKvBlockSize * 128 * 2 +
                        std::min(double(var.santa), double(blocks) * kKvBlockSize / (8 * batch)) * 8 * batch *
                            splan.split.row_groups * 128 * 2 + 2.0 * q_elems * 2
                  : double(blocks) * 2 * kKvBlockSize * 128 * 2 + 2.0 * q_elems * 2;
          const double tbs = bytes / (us * 1e-6) / 1e12;
          // The copy moved copy_bw bytes a second, reads and writes counted: HBM's ceiling for any mix.
          const double roof_us = bytes / copy_bw * 1e6;
          char key[64];
          std::snprintf(key, sizeof key, "%ld,%ld,%ld", ctx, batch, qt);
          auto it = sdpa.find(key);
          char sd[32] = "-", ratio[32] = "-";
          if (it != sdpa.end() && it->second > 0) {
            std::snprintf(sd, sizeof sd, "%.1f", it->second);
            std::snprintf(ratio, sizeof ratio, "%.2fx", it->second / us);
          }
          if (frac >= 0 && var.santa == 0 && var.rows == 0) sts_us[key] = std::min(us, sts_us.count(key) ? sts_us[key] : 1e30);
          std::printf("%8ld %5ld %3ld %14s | %10.1f %9.2f %7.0f%% %8d | %10s %8s%s\n", ctx, batch, qt,
                      var.name, us, tbs, 100.0 * roof_us / us, var.santa > 0 ? splan.split.num_splits : plan.num_splits,
                      sd, ratio, err_text);
          if (timeline_text) timeline_text();
          // What a launch moving the same bytes can reach at this size: a device-to-device copy of
          // half of them (as many bytes read plus written), timed the same way (batch 1 rows).
          if (frac >= 0 && var.santa == 0 && var.rows == 0 && var.tune == nullptr && batch == 1 && bytes < 2e9) {
            const size_t half = size_t(bytes / 2) / 256 * 256;
            void *x, *y;
            CHECK(cudaMalloc(&x, half));
            CHECK(cudaMalloc(&y, half));
            CHECK(cudaMemset(x, 1, half));
            const double copy_us = timer.Median([&] { CHECK(cudaMemcpyAsync(y, x, half, cudaMemcpyDeviceToDevice)); }, reps);
            std::printf("%8s %5s %3s %14s | %10.1f %9.2f %7.0f%% %8s |\n", "", "", "", "(same bytes, copy)", copy_us,
                        2.0 * half / (copy_us * 1e-6) / 1e12, 100.0 * roof_us / copy_us, "");
            CHECK(cudaFree(x));
            CHECK(cudaFree(y));
            // The same selected units read where they lie (scattered 8 KiB), by a plain kernel.
            std::vector<int64_t> offsets;
            for (int h = 0; h < 8; ++h) {
              for (int e = pr.sel_indptr[h]; e < pr.sel_indptr[h + 1]; ++e) {
                offsets.push_back(int64_t{pr.block_table[pr.sel_blocks[e]]} * 8 + h);
              }
            }
            int64_t* doff;
            uint4* sink;
            CHECK(cudaMalloc(&doff, offsets.size() * 8));
            CHECK(cudaMalloc(&sink, 16));
            CHECK(cudaMemcpy(doff, offsets.data(), offsets.size() * 8, cudaMemcpyHostToDevice));
            const int n = int(offsets.size());
            const double read_us = timer.Median(
                [&] {
                  ReadUnits<<<std::min(2 * prop.multiProcessorCount, (n + 7) / 8), 256>>>(kv, doff, n, sink);
                  CHECK(cudaGetLastError());
                },
                reps);
            std::printf("%8s %5s %3s %14s | %10.1f %9.2f %7.0f%% %8s |\n", "", "", "", "(same units, read)", read_us,
                        double(n) * 8192 / (read_us * 1e-6) / 1e12, 100.0 * roof_us / read_us, "");
            CHECK(cudaFree(doff));
            CHECK(cudaFree(sink));
          }
          std::fflush(stdout);
          for (void* d : {(void*)kv, (void*)q, (void*)out, (void*)qi, (void*)sl, (void*)bt, (void*)si, (void*)sb, (void*)ss, ws}) {
            if (d) CHECK(cudaFree(d));
          }
        }
      }
    }
  }

  // Block selection for one speculative round of one sequence: the draft (Llama-3.2-1B shape:
  // 16 layers x 32 heads) gives block masses for k = 4 positions; each of the target's 32 x 8
  // (layer, KV head) units maps to 2 draft heads and keeps `keep` of its blocks.
  std::printf("\nblock selection, batch 1, k=4, 512 draft heads -> 256 target units (32 layers x 8 KV heads)\n");
  std::printf("%8s | %10s | %22s %8s\n", "context", "select us", "32 layers sts attn us", "share");
  for (long ctx : ParseList(contexts)) {
    const int nb = int((ctx + 15) / 16);
    const int budget = std::max(5, int(keep * nb));
    SelectProblem pr = MakeSelectProblem({nb}, 4, 512, 256, budget, 1, 4, 2, false, 99);
    std::vector<void*> owned;
    auto dev = [&](const auto& v) {
      void* d;
      CHECK(cudaMalloc(&d, std::max<size_t>(4, v.size() * sizeof(v[0]))));
      CHECK(cudaMemcpy(d, v.data(), v.size() * sizeof(v[0]), cudaMemcpyHostToDevice));
      owned.push_back(d);
      return d;
    };
    BlockSelectParams d = pr.p;
    d.mass = static_cast<const float*>(dev(pr.mass));
    d.num_blocks = static_cast<const int32_t*>(dev(pr.num_blocks));
    d.map_indptr = static_cast<const int32_t*>(dev(pr.map_indptr));
    d.map_heads = static_cast<const int32_t*>(dev(pr.map_heads));
    d.out_indptr = static_cast<const int32_t*>(dev(pr.out_indptr));
    d.out_blocks = static_cast<int32_t*>(dev(pr.out_blocks));
    void* scratch;
    CHECK(cudaMalloc(&scratch, BlockSelectScratchBytes(d)));
    const double us = timer.Median([&] { CHECK(BlockSelect(d, scratch, nullptr)); }, reps);
    char key[64];
    std::snprintf(key, sizeof key, "%ld,1,5", ctx);
    auto it = sts_us.find(key);
    if (it != sts_us.end()) {
      std::printf("%8ld | %10.1f | %22.1f %7.1f%%\n", ctx, us, 32 * it->second, 100.0 * us / (32 * it->second));
    } else {
      std::printf("%8ld | %10.1f | %22s %8s\n", ctx, us, "-", "-");
    }
    CHECK(cudaFree(scratch));
    for (void* p : owned) CHECK(cudaFree(p));
  }
  return 0;
}
