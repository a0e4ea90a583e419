// Prefill attention on the GPU: the prefill kernel (kernels/prefill_attention.cuh) and the decode
// kernel the CUDA model ran prompt chunks through before it, at Llama-3.1-8B shapes (32 query / 8
// KV heads, head dim 128, bf16, one layer), each row a chunk of Q new tokens at the end of a
// context of C tokens (Q = C: a whole prompt at once, causal). Prints microseconds, TFLOP/s
// (causal FLOPs only: 4 x heads x head dim x visible (query, key) pairs) beside the card's bf16
// dense peak, and the ratio to PyTorch SDPA's flash kernel from bench/sdpa_prefill.py run on the
// same machine (--sdpa-json).
//
//   prefill_bench [--rows C:Q,...] [--kernels overlap,pingpong,wgmma,mma32,mma64] [--decode-max-q 16384] [--reps 5]
//                 [--sdpa-json FILE] [--json OUT]
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels/cuda_test_util.h"
#include "kernels/prefill_attention.cuh"
#include "kernels/sparse_decode.cuh"
#include "kernels/sparse_decode_problem.h"
#include "nlohmann/json.hpp"

namespace {

using namespace scout::kernels;

#define CHECK(expr) SCOUT_CUDA_CHECK(expr)

__global__ void FillBf16(uint16_t* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t x = uint32_t(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    const float f = (float(x & 0xffff) / 65536.0f) * 4.0f - 2.0f;  // uniform in [-2, 2)
    p[i] = static_cast<uint16_t>(__float_as_uint(f) >> 16);
  }
}

// bf16 dense tensor-core peak of the card, TFLOP/s (datasheet, without sparsity); 0 if unknown.
double PeakTflops(const std::string& name) {
  if (name.find("H100") != std::string::npos) return name.find("PCIe") != std::string::npos ? 756.0 : 989.4;
  if (name.find("H200") != std::string::npos) return 989.4;
  if (name.find("A100") != std::string::npos) return 312.0;
  return 0.0;
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  size_t at = 0;
  while (at <= s.size()) {
    const size_t comma = s.find(',', at);
    out.push_back(s.substr(at, comma == std::string::npos ? std::string::npos : comma - at));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

template <typename F>
double MedianUs(F fn, int reps) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  fn();  // warm-up (and the clocks up after setup)
  fn();
  CHECK(cudaDeviceSynchronize());
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    fn();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1000.0f);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string rows_arg = "32768:32768,131072:131072,32768:4096,131072:4096,131072:16384", kernels_arg = "overlap,pingpong,wgmma,mma32,mma64";
  std::string sdpa_path, json_path;
  int reps = 5, decode_max_q = 16384;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--rows") rows_arg = v;
    else if (f == "--kernels") kernels_arg = v;
    else if (f == "--reps") reps = std::atoi(v.c_str());
    else if (f == "--decode-max-q") decode_max_q = std::atoi(v.c_str());
    else if (f == "--sdpa-json") sdpa_path = v;
    else if (f == "--json") json_path = v;
    else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      return 2;
    }
  }
  nlohmann::json sdpa = nlohmann::json::object();
  if (!sdpa_path.empty()) {
    std::ifstream in(sdpa_path);
    if (!in) {
      std::fprintf(stderr, "cannot read %s\n", sdpa_path.c_str());
      return 2;
    }
    in >> sdpa;
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const double peak = PeakTflops(prop.name);
  std::printf("%s, %d SMs; bf16 dense peak %.0f TFLOP/s; 32 q / 8 KV heads, head dim 128, one layer\n", prop.name,
              prop.multiProcessorCount, peak);
  std::printf("%8s %7s | %-22s %10s %8s %6s | %10s %8s\n", "context", "q", "kernel", "us", "TFLOP/s", "%peak",
              "SDPA us", "SDPA/us");
  nlohmann::json out = {{"card", prop.name}, {"peak_tflops", peak}, {"rows", nlohmann::json::array()}};
  for (const std::string& row : Split(rows_arg)) {
    const size_t colon = row.find(':');
    const int ctx = std::atoi(row.substr(0, colon).c_str());
    const int qn = colon == std::string::npos ? ctx : std::atoi(row.substr(colon + 1).c_str());
    DecodeShape shape{.seq_lens = {ctx}, .q_tokens = {qn}, .num_heads = 32, .num_kv_heads = 8, .head_dim = 128,
                      .shuffle_blocks = false};
    DecodeProblem pr = MakeDecodeProblem(shape, 1, /*fill_values=*/false);
    const size_t q_elems = size_t(qn) * 32 * 128, kv_elems = size_t(pr.num_blocks) * 8 * 2 * 16 * 128;
    uint16_t *q = nullptr, *o = nullptr, *kv = nullptr;
    int32_t *indptr = nullptr, *lens = nullptr, *table = nullptr;
    CHECK(cudaMalloc(&q, q_elems * 2));
    CHECK(cudaMalloc(&o, q_elems * 2));
    CHECK(cudaMalloc(&kv, kv_elems * 2));
    CHECK(cudaMalloc(&indptr, pr.q_indptr.size() * 4));
    CHECK(cudaMalloc(&lens, pr.seq_lens.size() * 4));
    CHECK(cudaMalloc(&table, pr.block_table.size() * 4));
    CHECK(cudaMemcpy(indptr, pr.q_indptr.data(), pr.q_indptr.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(lens, pr.seq_lens.data(), pr.seq_lens.size() * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(table, pr.block_table.data(), pr.block_table.size() * 4, cudaMemcpyHostToDevice));
    FillBf16<<<1024, 256>>>(q, q_elems, 2);
    FillBf16<<<1024, 256>>>(kv, kv_elems, 1);
    CHECK(cudaGetLastError());
    SparseDecodeParams p = pr.PagedParams();
    p.q = q;
    p.out = o;
    p.kv = kv;
    p.q_indptr = indptr;
    p.seq_lens = lens;
    p.block_table = table;
    const double pairs = double(qn) * ctx - double(qn) * (qn - 1) / 2.0;  // visible (query, key) pairs
    const double flops = 4.0 * 32 * 128 * pairs;
    const std::string key = std::to_string(ctx) + "," + std::to_string(qn);
    const double sdpa_us = sdpa.contains(key) && sdpa[key].contains("flash") ? sdpa[key]["flash"].get<double>() : 0.0;
    auto report = [&](const std::string& name, double us) {
      const double tf = flops / us * 1e-6;
      std::printf("%8d %7d | %-22s %10.1f %8.1f %5.1f%% | %10.1f %8.2fx\n", ctx, qn, name.c_str(), us, tf,
                  peak > 0 ? 100.0 * tf / peak : 0.0, sdpa_us, sdpa_us > 0 ? sdpa_us / us : 0.0);
      out["rows"].push_back({{"context", ctx}, {"q_tokens", qn}, {"kernel", name}, {"us", us}, {"tflops", tf},
                             {"sdpa_flash_us", sdpa_us}, {"sdpa_over_kernel", sdpa_us > 0 ? sdpa_us / us : 0.0}});
    };
    for (const std::string& k : Split(kernels_arg)) {
      const PrefillKernel kernel = k == "pingpong" ? PrefillKernel::kWgmmaPingPong
                                   : k == "overlap" ? PrefillKernel::kWgmmaOverlap
                                   : k == "wgmma"  ? PrefillKernel::kWgmma
                                   : k == "mma32" ? PrefillKernel::kMma32
                                   : k == "mma64" ? PrefillKernel::kMma64
                                                  : PrefillKernel::kAuto;
      const cudaError_t e = PrefillAttention(p, qn, nullptr, kernel);
      if (e != cudaSuccess) {
        std::printf("%8d %7d | prefill %-14s %s\n", ctx, qn, k.c_str(), cudaGetErrorString(e));
        continue;
      }
      const double us = MedianUs([&] { CHECK(PrefillAttention(p, qn, nullptr, kernel)); }, reps);
      report("prefill " + k, us);
    }
    if (qn <= decode_max_q) {  // the path prompt chunks took before the prefill kernel
      int sms = prop.multiProcessorCount;
      const int rows = SparseDecodeRowsPerCta();
      SparseDecodePlan plan = PlanSparseDecode(1, 32, 8, qn, pr.max_list_blocks(), qn, 128, sms,
                                               SparseDecodeCtasPerSm(128, rows), 0, rows);
      void* ws = nullptr;
      CHECK(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 4)));
      const double us = MedianUs([&] { CHECK(SparseDecode(p, plan, ws, nullptr)); }, reps);
      report("decode kernel (before)", us);
      CHECK(cudaFree(ws));
    }
    for (void* ptr : {static_cast<void*>(q), static_cast<void*>(o), static_cast<void*>(kv), static_cast<void*>(indptr),
                      static_cast<void*>(lens), static_cast<void*>(table)}) {
      CHECK(cudaFree(ptr));
    }
  }
  if (!json_path.empty()) std::ofstream(json_path) << out.dump(1) << "\n";
  return 0;
}
