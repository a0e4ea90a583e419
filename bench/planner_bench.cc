// Host cost of PlanPrefetch per unit: a Llama-3.1-8B-shaped selection (32 layers x 8 KV heads) of
// a session, with overlapping consecutive steps. The store's slabs are small (head_dim 8): the
// planner never touches KV bytes, only addresses, so its cost does not depend on them.
//
//   planner_bench [--tokens 131072] [--fraction 0.1] [--overlap 0.5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <string>

#include "kvstore/prefetch_planner.h"

using namespace scout::kvstore;

int main(int argc, char** argv) {
  long tokens = 131072;
  double frac = 0.1, overlap = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string f = argv[i], v = argv[i + 1];
    if (f == "--tokens") tokens = std::stol(v);
    else if (f == "--fraction") frac = std::stod(v);
    else if (f == "--overlap") overlap = std::stod(v);
  }
  const KvLayout layout{.num_layers = 32, .num_kv_heads = 8, .head_dim = 8, .elem_bytes = 2};
  const int32_t nb = static_cast<int32_t>(BlocksFor(tokens));
  auto store = HostKvStore::Create(layout, nb);
  if (!store.ok() || !(*store)->AddSession(1).ok() || !(*store)->Reserve(1, tokens).ok()) return 1;
  const int lists = 32 * 8, per_list = std::max(1, int(frac * nb));
  BlockCache cache(static_cast<int32_t>(2.2 * per_list * lists), 32, 8);
  std::mt19937 rng(1);
  std::vector<std::vector<int32_t>> cur(lists);
  std::vector<int32_t> all(nb);
  for (int32_t i = 0; i < nb; ++i) all[i] = i;
  double total_ms = 0;
  long units = 0;
  for (int step = 1; step <= 6; ++step) {
    Selection sel{.num_layers = 32, .num_kv_heads = 8, .indptr = {0}, .blocks = {}};
    for (int l = 0; l < lists; ++l) {
      std::vector<int32_t> keep(cur[l].begin(), cur[l].begin() + std::min<size_t>(cur[l].size(), size_t(overlap * per_list)));
      std::vector<char> used(nb, 0);
      for (int32_t x : keep) used[x] = 1;
      std::shuffle(all.begin(), all.end(), rng);
      for (int32_t x : all) {
        if (int(keep.size()) >= per_list) break;
        if (!used[x]) keep.push_back(x), used[x] = 1;
      }
      std::sort(keep.begin(), keep.end());
      cur[l] = keep;
      sel.blocks.insert(sel.blocks.end(), keep.begin(), keep.end());
      sel.indptr.push_back(int32_t(sel.blocks.size()));
    }
    auto t0 = std::chrono::steady_clock::now();
    auto plan = PlanPrefetch(sel, 1, **store, cache, step);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (!plan.ok()) return 1;
    cache.ReleaseStep(step);
    if (step > 1) total_ms += ms, units += long(sel.blocks.size());
    std::printf("step %d: %zu units, %lld misses, %.2f ms\n", step, sel.blocks.size(), (long long)plan->misses, ms);
  }
  std::printf("planner: %.1f ns per selected unit (steps 2-6)\n", total_ms * 1e6 / units);
  return 0;
}
