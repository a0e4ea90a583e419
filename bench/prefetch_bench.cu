// Selective prefetch host -> GPU at Llama-3.1-8B KV shape (32 layers x 8 KV heads, head dim 128,
// bf16: 8 KiB a unit). One session of --tokens tokens lives in the pinned host store; each case
// runs a warm-up step with a random selection, then a step whose selection overlaps it by the
// given fraction, and times the second (transfer-list upload + the gathers: consecutive layers
// grouped into launches of at least --launch-units units, 1 for one launch per layer). Each row
// runs --repeats times with fresh selections and prints the median, least and most GB/s.
// --host-alloc pinned (cudaHostAlloc) or hugepages (2 MiB pages, registered) picks the store's memory.
// Baselines in the same run: a 1 GiB pinned cudaMemcpy (the PCIe roofline) and one
// cudaMemcpyAsync per unit for the same transfers (the naive way).
//
//   prefetch_bench [--tokens 131072] [--fractions 0.01,0.02,0.05,0.1] [--overlaps 0,0.5,0.9]
//                  [--launch-units N] [--signal 0|1] [--signal-ctas C] [--overlap-fraction F] [--overlap-keep K] [--reserve-ctas C]
//                  [--repeats 3] [--host-alloc pinned|hugepages] [--skip-overlap 0|1]
//                  [--grow-gib G [--grow-work-ms 250]]
//
// --grow-gib G instead measures what a growing session waits for in Reserve: a store of G GiB
// whose chunks come as the session needs them, grown by one 1 GiB chunk of tokens per step with
// --grow-work-ms of other work between steps (standing for the prefill of those tokens), once
// without and with chunks allocated ahead in the background (HostStoreOptions::chunks_ahead), twice.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda_test_util.h"
#include "kernels/sparse_decode.cuh"
#include "kvstore/copy_engine.cuh"

using namespace scout::kvstore;

#define CHECK SCOUT_CUDA_CHECK

std::vector<double> ParseList(const std::string& s) {
  std::vector<double> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stod(item));
  return v;
}

// Reserve's time per step for a session growing one chunk a step, chunks_ahead 0 and 2.
int GrowBench(const KvLayout& layout, const std::string& host_alloc, double gib, int work_ms) {
  const int64_t chunk_tokens = int64_t{kBlockSize} * ((size_t{1} << 30) / layout.slab_bytes());
  const int32_t nb = static_cast<int32_t>(gib * double(size_t{1} << 30) / layout.slab_bytes());
  std::printf("growing one session by %lld tokens (1 GiB) a step, %d ms of other work between steps, %s memory\n",
              static_cast<long long>(chunk_tokens), work_ms, host_alloc.c_str());
  std::printf("%12s | %6s %14s %14s %12s\n", "chunks ahead", "steps", "Reserve ms mean", "Reserve ms max", "total s");
  // Twice each, alternating: in the VM the first run also pays the hypervisor backing fresh
  // guest memory on first touch, which later runs reuse.
  for (int ahead : {0, 2, 0, 2}) {
    absl::StatusOr<HostAllocator> allocator = HostAllocatorNamed(host_alloc);
    if (!allocator.ok()) return 2;
    const auto t0 = std::chrono::steady_clock::now();
    auto store = HostKvStore::Create(layout, nb, *allocator, {.chunks_ahead = ahead});
    if (!store.ok() || !(*store)->AddSession(1).ok()) return 1;
    std::vector<double> waits;
    for (int64_t tokens = chunk_tokens; tokens <= int64_t{nb} * kBlockSize; tokens += chunk_tokens) {
      std::this_thread::sleep_for(std::chrono::milliseconds(work_ms));
      const auto r0 = std::chrono::steady_clock::now();
      if (absl::Status st = (*store)->Reserve(1, tokens); !st.ok()) {
        std::fprintf(stderr, "%s\n", st.ToString().c_str());
        return 1;
      }
      waits.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - r0).count());
    }
    double sum = 0, most = 0;
    for (double w : waits) sum += w, most = std::max(most, w);
    std::printf("%12d | %6zu %14.1f %14.1f %12.1f\n", ahead, waits.size(), sum / waits.size(), most,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return 0;
}

// The command line (see the usage at the top).
struct Args {
  long tokens = 131072;
  double grow_gib = 0;
  int grow_work_ms = 250;
  std::string fractions = "0.01,0.02,0.05,0.1", overlaps = "0,0.5,0.9";
  double overlap_frac = 0.02, overlap_keep = 0.9;
  int reserve_ctas = 0, launch_units = 0, signal = 1, signal_ctas = 0, repeats = 3, skip_overlap = 0;
  std::string host_alloc = "pinned";
};

bool ParseArgs(int argc, char** argv, Args* a) {
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i], v = argv[i + 1];
    if (f == "--tokens") a->tokens = std::stol(v);
    else if (f == "--fractions") a->fractions = v;
    else if (f == "--overlaps") a->overlaps = v;
    else if (f == "--overlap-fraction") a->overlap_frac = std::stod(v);
    else if (f == "--overlap-keep") a->overlap_keep = std::stod(v);
    else if (f == "--reserve-ctas") a->reserve_ctas = std::stoi(v);
    else if (f == "--launch-units") a->launch_units = std::stoi(v);
    else if (f == "--signal") a->signal = std::stoi(v);
    else if (f == "--signal-ctas") a->signal_ctas = std::stoi(v);
    else if (f == "--repeats") a->repeats = std::max(1, std::stoi(v));
    else if (f == "--host-alloc") a->host_alloc = v;
    else if (f == "--skip-overlap") a->skip_overlap = std::stoi(v);
    else if (f == "--grow-gib") a->grow_gib = std::stod(v);
    else if (f == "--grow-work-ms") a->grow_work_ms = std::stoi(v);
    else {
      std::fprintf(stderr, "unknown flag %s\n", f.c_str());
      return false;
    }
  }
  return true;
}

// Pinned host -> device copy of 1 GiB, best of 5: bytes per second.
double PcieRoofline() {
  const size_t big = size_t{1} << 30;
  std::byte *hbig, *dbig;
  CHECK(cudaMallocHost(&hbig, big));
  CHECK(cudaMalloc(&dbig, big));
  std::memset(hbig, 1, big);
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  float best = 1e30f;
  for (int i = 0; i < 5; ++i) {
    CHECK(cudaEventRecord(a));
    CHECK(cudaMemcpyAsync(dbig, hbig, big, cudaMemcpyHostToDevice));
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    best = std::min(best, ms);
  }
  const double roof = big / (best * 1e-3);
  CHECK(cudaFree(dbig));
  CHECK(cudaFreeHost(hbig));
  return roof;
}

// What the sweep and the overlap run share.
struct Ctx {
  const KvLayout& layout;
  HostKvStore& store;
  absl::StatusOr<std::unique_ptr<CudaCopyEngine>>& engine;
  cudaStream_t s;
  const cudaDeviceProp& prop;
  int32_t nb;
  int lists;
  int32_t slots;
  double roof;
  const Args& args;
  std::byte* pool;
  uint64_t step = 0;
  std::mt19937 rng{7};
};

// The shared state under the names the sweep and the overlap use.
#define PREFETCH_UNPACK(c) \
  [[maybe_unused]] const KvLayout& layout = (c).layout; \
  [[maybe_unused]] HostKvStore& store = (c).store; \
  [[maybe_unused]] absl::StatusOr<std::unique_ptr<CudaCopyEngine>>& engine = (c).engine; \
  [[maybe_unused]] cudaStream_t s = (c).s; \
  [[maybe_unused]] const cudaDeviceProp& prop = (c).prop; \
  [[maybe_unused]] const int32_t nb = (c).nb; \
  [[maybe_unused]] const int lists = (c).lists; \
  [[maybe_unused]] const int32_t slots = (c).slots; \
  [[maybe_unused]] const double roof = (c).roof; \
  [[maybe_unused]] uint64_t& step = (c).step; \
  [[maybe_unused]] const long tokens = (c).args.tokens; \
  [[maybe_unused]] const std::string& overlaps = (c).args.overlaps; \
  [[maybe_unused]] const std::vector<double> fracs = ParseList((c).args.fractions); \
  [[maybe_unused]] const double overlap_frac = (c).args.overlap_frac, overlap_keep = (c).args.overlap_keep; \
  [[maybe_unused]] const int reserve_ctas = (c).args.reserve_ctas, repeats = (c).args.repeats; \
  [[maybe_unused]] std::byte* pool = (c).pool; \
  [[maybe_unused]] std::mt19937& rng = (c).rng; \
  cudaEvent_t a, b; \
  CHECK(cudaEventCreate(&a)); \
  CHECK(cudaEventCreate(&b));

// Selected fractions x overlaps with the last step: units moved, time, bandwidth against the roof.
int RunSweep(Ctx& c) {
  PREFETCH_UNPACK(c);
  std::printf("%8s %8s | %9s %10s %9s %8s %10s %13s | %10s %9s\n", "select", "overlap", "units", "MB moved", "ms",
              "GB/s", "of roof", "least-most", "naive GB/s", "plan ms");
  std::vector<int32_t> all(nb);
  for (double frac : fracs) {
    for (double ov : ParseList(overlaps)) {
      const int per_list = std::max(1, int(frac * nb));
      std::vector<double> gbps;
      double units = 0, ms_median = 0, naive_gbps = 0, plan_ms = 0;
      std::vector<double> ms_all;
      for (int rep = 0; rep < repeats; ++rep) {
        BlockCache cache(slots, layout.num_layers, layout.num_kv_heads);
        // Step A: random per-list selection, moved to warm the cache.
        std::vector<std::vector<int32_t>> prev(lists);
        Selection sa{.num_layers = 32, .num_kv_heads = 8, .indptr = {0}, .blocks = {}};
        for (int32_t i = 0; i < nb; ++i) all[i] = i;
        for (int l = 0; l < lists; ++l) {
          std::shuffle(all.begin(), all.end(), rng);
          prev[l].assign(all.begin(), all.begin() + per_list);
          std::sort(prev[l].begin(), prev[l].end());
          sa.blocks.insert(sa.blocks.end(), prev[l].begin(), prev[l].end());
          sa.indptr.push_back(int32_t(sa.blocks.size()));
        }
        auto pa = PlanPrefetch(sa, 1, store, cache, ++step);
        if (!pa.ok() || !(*engine)->Execute(*pa).ok()) return 1;
        CHECK(cudaStreamSynchronize(s));
        cache.ReleaseStep(step);
        // Step B: keep `ov` of each list, replace the rest with blocks not in it.
        Selection sb{.num_layers = 32, .num_kv_heads = 8, .indptr = {0}, .blocks = {}};
        for (int l = 0; l < lists; ++l) {
          std::vector<int32_t> keep(prev[l].begin(), prev[l].begin() + int(ov * per_list));
          std::vector<char> used(nb, 0);
          for (int32_t x : prev[l]) used[x] = 1;
          std::shuffle(all.begin(), all.end(), rng);
          for (int32_t x : all) {
            if (int(keep.size()) >= per_list) break;
            if (!used[x]) keep.push_back(x);
          }
          std::sort(keep.begin(), keep.end());
          sb.blocks.insert(sb.blocks.end(), keep.begin(), keep.end());
          sb.indptr.push_back(int32_t(sb.blocks.size()));
        }
        auto p0 = std::chrono::steady_clock::now();
        auto pb = PlanPrefetch(sb, 1, store, cache, ++step);
        plan_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p0).count();
        if (!pb.ok()) {
          std::fprintf(stderr, "%s\n", pb.status().ToString().c_str());
          return 1;
        }
        CHECK(cudaEventRecord(a, s));
        if (!(*engine)->Execute(*pb).ok()) return 1;
        CHECK(cudaEventRecord(b, s));
        CHECK(cudaEventSynchronize(b));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, a, b));
        units = double(pb->transfers.size());
        const double bytes = units * layout.unit_bytes();
        gbps.push_back(bytes / (ms * 1e-3) / 1e9);
        ms_all.push_back(ms);
        if (rep + 1 == repeats) {
          // Naive: one cudaMemcpyAsync per unit, same transfers (the last repeat's).
          CHECK(cudaEventRecord(a, s));
          for (const Transfer& t : pb->transfers) {
            CHECK(cudaMemcpyAsync(pool + size_t(t.slot) * layout.unit_bytes(), t.src, layout.unit_bytes(),
                                  cudaMemcpyHostToDevice, s));
          }
          CHECK(cudaEventRecord(b, s));
          CHECK(cudaEventSynchronize(b));
          float naive_ms;
          CHECK(cudaEventElapsedTime(&naive_ms, a, b));
          naive_gbps = bytes / (naive_ms * 1e-3) / 1e9;
        }
        cache.ReleaseStep(step);
      }
      std::sort(gbps.begin(), gbps.end());
      std::sort(ms_all.begin(), ms_all.end());
      ms_median = ms_all[ms_all.size() / 2];
      const double med = gbps[gbps.size() / 2];
      char spread[32];
      std::snprintf(spread, sizeof spread, "%.0f-%.0f%%", 100 * gbps.front() * 1e9 / roof, 100 * gbps.back() * 1e9 / roof);
      std::printf("%7.0f%% %7.0f%% | %9.0f %10.1f %9.3f %8.1f %9.0f%% %13s | %10.1f %9.1f\n", frac * 100, ov * 100,
                  units, units * layout.unit_bytes() / 1e6, ms_median, med, 100 * med * 1e9 / roof, spread, naive_gbps,
                  plan_ms);
      std::fflush(stdout);
    }
  }
  return 0;
}

// STS attention of layer L (q = 5 verification rows, over the slot pool) while layer L+1's units
// are still moving, against the two run serially.
int RunOverlap(Ctx& c) {
  PREFETCH_UNPACK(c);
  const double frac = overlap_frac;
  BlockCache cache(slots, layout.num_layers, layout.num_kv_heads);
  const int per_list = std::max(1, int(frac * nb));
  std::vector<int32_t> all(nb);
  for (int32_t i = 0; i < nb; ++i) all[i] = i;
  // Two steps: the first warms the cache, the second keeps `overlap_keep` of each list (a
  // speculative round's selection changes little from the last), so only its misses move.
  auto make = [&](const std::vector<std::vector<int32_t>>* prev, std::vector<std::vector<int32_t>>* lists_out) {
    Selection sel{.num_layers = 32, .num_kv_heads = 8, .indptr = {0}, .blocks = {}};
    for (int l = 0; l < lists; ++l) {
      std::vector<char> used(nb, 0);
      std::vector<int32_t> pick = {0, nb - 4, nb - 3, nb - 2, nb - 1};  // sink and recent window
      if (prev != nullptr) {
        for (int32_t x : (*prev)[l]) {
          if (int(pick.size()) >= 5 + int(overlap_keep * (per_list - 5))) break;
          if (x != 0 && x < nb - 4) pick.push_back(x);
        }
      }
      for (int32_t x : pick) used[x] = 1;
      std::shuffle(all.begin(), all.end(), rng);
      for (int32_t x : all) {
        if (int(pick.size()) >= per_list) break;
        if (!used[x]) pick.push_back(x), used[x] = 1;
      }
      std::sort(pick.begin(), pick.end());
      (*lists_out)[l] = pick;
      sel.blocks.insert(sel.blocks.end(), pick.begin(), pick.end());
      sel.indptr.push_back(int32_t(sel.blocks.size()));
    }
    return sel;
  };
  std::vector<std::vector<int32_t>> first_lists(lists), second_lists(lists);
  Selection warm = make(nullptr, &first_lists);
  auto warm_plan = PlanPrefetch(warm, 1, store, cache, ++step);
  if (!warm_plan.ok() || !(*engine)->Execute(*warm_plan).ok()) return 1;
  CHECK(cudaStreamSynchronize(s));
  cache.ReleaseStep(step);
  Selection sel = make(&first_lists, &second_lists);
  auto plan = PlanPrefetch(sel, 1, store, cache, ++step);
  if (!plan.ok()) return 1;
  // Attention inputs for every layer: one sequence, 5 query tokens, 32 heads.
  const int qt = 5;
  uint16_t *q, *out;
  int32_t *qi, *sl, *bt, *si, *sb, *ss;
  CHECK(cudaMalloc(&q, qt * 32 * 128 * 2));
  CHECK(cudaMemset(q, 0x3c, qt * 32 * 128 * 2));
  CHECK(cudaMalloc(&out, qt * 32 * 128 * 2));
  std::vector<int32_t> qiv = {0, qt}, slv = {int32_t(tokens)}, btv = {0};
  auto up = [](const std::vector<int32_t>& v, int32_t** d) {
    CHECK(cudaMalloc(d, v.size() * 4));
    CHECK(cudaMemcpy(*d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
  };
  up(qiv, &qi); up(slv, &sl); up(btv, &bt);
  up(sel.indptr, &si); up(sel.blocks, &sb); up(plan->slots, &ss);
  using namespace scout::kernels;
  const int ctas = SparseDecodeCtasPerSm(128, SparseDecodeRowsPerCta());
  // --reserve-ctas leaves CTA slots per SM free for the gather kernel. Measured 2026-11-27 on the
  // H100: reserving 0, 1 of 2 made no difference (41-46% of the attention hidden either way).
  SparseDecodePlan dplan = PlanSparseDecode(1, 32, 8, qt, per_list, qt, 128, prop.multiProcessorCount,
                                            std::max(1, ctas - reserve_ctas));
  void* ws;
  CHECK(cudaMalloc(&ws, dplan.workspace_bytes));
  auto layer_params = [&](int layer) {
    SparseDecodeParams p{.q = q, .out = out, .kv = reinterpret_cast<const uint16_t*>(pool), .q_indptr = qi,
                         .seq_lens = sl, .block_table = bt, .max_blocks_per_seq = 1,
                         .sel_indptr = si + layer * 8, .sel_blocks = sb, .sel_slots = ss, .num_seqs = 1,
                         .num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .scale = 0.0883883f};
    return p;
  };
  cudaStream_t compute;
  CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  std::vector<cudaEvent_t> attn_done(32);
  for (auto& e : attn_done) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  cudaEvent_t c0, c1;
  CHECK(cudaEventCreate(&c0));
  CHECK(cudaEventCreate(&c1));
  auto run = [&](bool serial) {
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaEventRecord(c0, s));
    CHECK(cudaStreamWaitEvent(compute, c0));
    if (!(*engine)->Upload(*plan).ok()) std::exit(1);
    if (!serial && !(*engine)->Launch(*plan).ok()) std::exit(1);
    for (int layer = 0; layer < 32; ++layer) {
      if (serial && layer > 0) CHECK(cudaStreamWaitEvent(s, attn_done[layer - 1]));
      if (serial && !(*engine)->LaunchLayer(*plan, layer).ok()) std::exit(1);
      if (!(*engine)->WaitLayer(compute, layer).ok()) std::exit(1);
      CHECK(SparseDecode(layer_params(layer), dplan, ws, compute));
      CHECK(cudaEventRecord(attn_done[layer], compute));
    }
    CHECK(cudaEventRecord(c1, compute));
    CHECK(cudaEventSynchronize(c1));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, c0, c1));
    return ms;
  };
  // Attention alone, data resident.
  CHECK(cudaEventRecord(c0, compute));
  for (int layer = 0; layer < 32; ++layer) CHECK(SparseDecode(layer_params(layer), dplan, ws, compute));
  CHECK(cudaEventRecord(c1, compute));
  CHECK(cudaEventSynchronize(c1));
  float attn_ms;
  CHECK(cudaEventElapsedTime(&attn_ms, c0, c1));
  // Copies alone.
  CHECK(cudaEventRecord(c0, s));
  if (!(*engine)->Execute(*plan).ok()) return 1;
  CHECK(cudaEventRecord(c1, s));
  CHECK(cudaEventSynchronize(c1));
  float copy_ms;
  CHECK(cudaEventElapsedTime(&copy_ms, c0, c1));
  run(false);  // warm
  std::vector<float> ser, ovl;
  for (int i = 0; i < 9; ++i) {
    ser.push_back(run(true));
    ovl.push_back(run(false));
  }
  std::sort(ser.begin(), ser.end());
  std::sort(ovl.begin(), ovl.end());
  const float serial_ms = ser[4], overlap_ms = ovl[4];  // medians of 9, alternating
  std::printf("\noverlap, %.0f%% selection keeping %.0f%% of the last step's (%zu of %zu units moved), 32 layers, "
              "STS attention q=%d over the slot pool, attention grid %d CTAs/SM of %d:\n",
              frac * 100, overlap_keep * 100, plan->transfers.size(), sel.blocks.size(), qt,
              std::max(1, ctas - reserve_ctas), ctas);
  std::printf("  copies alone %.3f ms | attention alone %.3f ms | serial %.3f ms | overlapped %.3f ms "
              "(hidden: %.0f%% of the attention)\n",
              copy_ms, attn_ms, serial_ms, overlap_ms, 100.0 * (serial_ms - overlap_ms) / attn_ms);
  cache.ReleaseStep(step);
  return 0;
}

int main(int argc, char** argv) {
  Args args;
  if (!ParseArgs(argc, argv, &args)) return 2;
  const long tokens = args.tokens;
  const std::string& host_alloc = args.host_alloc;
  const KvLayout layout{.num_layers = 32, .num_kv_heads = 8, .head_dim = 128, .elem_bytes = 2};
  if (args.grow_gib > 0) {
    CHECK(cudaFree(nullptr));
    return GrowBench(layout, host_alloc, args.grow_gib, args.grow_work_ms);
  }
  const int lists = layout.num_layers * layout.num_kv_heads;
  const int32_t nb = static_cast<int32_t>((tokens + kBlockSize - 1) / kBlockSize);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  CHECK(cudaFree(nullptr));  // create the context before timing the allocation

  auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<HostAllocator> allocator = HostAllocatorNamed(host_alloc);
  if (!allocator.ok()) {
    std::fprintf(stderr, "%s\n", allocator.status().ToString().c_str());
    return 2;
  }
  auto store_or = HostKvStore::Create(layout, nb, *allocator, {.allocate_upfront = true});
  if (!store_or.ok()) {
    std::fprintf(stderr, "%s\n", store_or.status().ToString().c_str());
    return 1;
  }
  const double alloc_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  HostKvStore& store = **store_or;
  // Touch every page (a real store holds written KV): one byte pattern per 4 KiB.
  for (std::byte* c : store.chunks()) {
    for (size_t i = 0; i < store.chunk_bytes(); i += 4096) c[i] = std::byte(i >> 12);
  }
  if (!store.AddSession(1).ok() || !store.Reserve(1, tokens).ok()) return 1;
  {  // whether the kernel gave transparent huge pages (Linux; 0 kB also with MAP_HUGETLB pages)
    std::ifstream meminfo("/proc/meminfo");
    for (std::string line; std::getline(meminfo, line);) {
      if (line.rfind("AnonHugePages:", 0) == 0 || line.rfind("Hugetlb:", 0) == 0) std::printf("%s\n", line.c_str());
    }
  }
  std::printf("device: %s; session %ld tokens = %.1f GiB of KV in %s host memory (allocated in %.1f s, %zu chunks)\n",
              prop.name, tokens, store.bytes() / double(1 << 30), host_alloc.c_str(), alloc_s, store.chunks().size());

  // PCIe roofline: 1 GiB pinned host -> device.
  const double roof = PcieRoofline();
  std::printf("pinned cudaMemcpy 1 GiB host->device: %.1f GB/s (roofline)\n\n", roof / 1e9);

  const std::vector<double> fracs = ParseList(args.fractions);
  const double max_frac = *std::max_element(fracs.begin(), fracs.end());
  const int32_t slots = static_cast<int32_t>(2.2 * max_frac * nb * lists) + lists * 8;
  std::byte* pool;
  CHECK(cudaMalloc(&pool, size_t(slots) * layout.unit_bytes()));
  auto engine = CudaCopyEngine::Create(pool, layout.unit_bytes(), layout.num_layers, slots);
  if (!engine.ok()) return 1;
  if (args.launch_units > 0) (*engine)->set_min_launch_units(args.launch_units);
  (*engine)->set_signal(args.signal != 0);
  if (args.signal_ctas > 0) (*engine)->set_signal_ctas(args.signal_ctas);
  if ((*engine)->signal() && (*engine)->can_signal()) {
    std::printf("gathers: one signalled launch for all layers (layers waited for with cuStreamWaitValue64)\n");
  } else {
    std::printf("gathers: layers grouped into launches of at least %d units (1: one launch per layer)\n",
                (*engine)->min_launch_units());
  }
  cudaStream_t s = (*engine)->stream();

  Ctx c{.layout = layout, .store = store, .engine = engine, .s = s, .prop = prop, .nb = nb, .lists = lists,
        .slots = slots, .roof = roof, .args = args, .pool = pool};
  if (int rc = RunSweep(c); rc != 0) return rc;
  std::printf("\n(per layer: ms / 32)\n");

  // Overlap: STS attention of layer L (q = 5 verification rows, over the slot pool) while layer
  // L+1's units are still moving. Serial: each layer's gather waits for the previous attention.
  if (args.skip_overlap == 0) {
    if (int rc = RunOverlap(c); rc != 0) return rc;
  }
  return 0;
}
