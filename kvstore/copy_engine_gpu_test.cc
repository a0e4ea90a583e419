// The GPU copy engine moves exactly the planned units (ctest label gpu).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <random>

#include "gtest/gtest.h"
#include "kvstore/copy_engine.cuh"

namespace scout::kvstore {
namespace {

TEST(CudaCopyEngineTest, SlotsMatchHostUnitsOverManySteps) {
  // head dim 64 from cudaHostAlloc'd chunks, 128 from registered huge pages.
  for (int head_dim : {64, 128}) {
    const KvLayout layout{.num_layers = 4, .num_kv_heads = 3, .head_dim = head_dim, .elem_bytes = 2};
    auto allocator = HostAllocatorNamed(head_dim == 64 ? "pinned" : "hugepages");
    ASSERT_TRUE(allocator.ok()) << allocator.status();
    auto store_or = HostKvStore::Create(layout, 64, *allocator,
                                        {.chunk_bytes = 10 * layout.slab_bytes(), .allocate_upfront = true});
    ASSERT_TRUE(store_or.ok()) << store_or.status();
    HostKvStore& store = **store_or;
    std::mt19937 rng(head_dim);
    // Fill each chunk's slabs (the last chunk holds only the slabs left: 64 in chunks of 10).
    for (size_t ci = 0; ci < store.chunks().size(); ++ci) {
      const size_t slabs = std::min<size_t>(10, 64 - ci * 10);
      for (size_t i = 0; i < slabs * layout.slab_bytes(); ++i) store.chunks()[ci][i] = std::byte(rng());
    }
    ASSERT_TRUE(store.AddSession(5).ok());
    ASSERT_TRUE(store.Reserve(5, 50 * kBlockSize - 3).ok());
    const int32_t kSlots = 300;
    const size_t unit = layout.unit_bytes();
    std::byte* pool = nullptr;
    ASSERT_EQ(cudaMalloc(&pool, kSlots * unit), cudaSuccess);
    ASSERT_EQ(cudaMemset(pool, 0xAB, kSlots * unit), cudaSuccess);  // poison
    BlockCache cache(kSlots, layout.num_layers, layout.num_kv_heads);
    auto engine = CudaCopyEngine::Create(pool, unit, layout.num_layers, 4 * 3 * 50);
    ASSERT_TRUE(engine.ok()) << engine.status();
    EXPECT_TRUE((*engine)->can_signal());  // the H100 machine's driver has stream memory operations
    cudaStream_t side;
    ASSERT_EQ(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking), cudaSuccess);
    cudaEvent_t seen;
    ASSERT_EQ(cudaEventCreate(&seen), cudaSuccess);
    std::vector<std::byte> back(kSlots * unit);
    for (uint64_t step = 1; step <= 20; ++step) {
      Selection sel{.num_layers = 4, .num_kv_heads = 3, .indptr = {0}, .blocks = {}};
      for (int list = 0; list < 12; ++list) {
        for (int32_t b = 0; b < 50; ++b) {
          if (rng() % 5 == 0) sel.blocks.push_back(b);
        }
        sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
      }
      absl::StatusOr<PrefetchPlan> plan = PlanPrefetch(sel, 5, store, cache, step);
      ASSERT_TRUE(plan.ok()) << plan.status();
      // One signalled launch; one launch per layer, small groups, every layer in one launch.
      const int group_units[] = {1, 5, 40, 1 << 20};
      (*engine)->set_signal(step % 2 == 0);
      (*engine)->set_min_launch_units(group_units[step % 4]);
      ASSERT_TRUE((*engine)->Execute(*plan).ok());
      // Waiting for layer 0 alone says its units are in, whatever launch moved them.
      ASSERT_TRUE((*engine)->WaitLayer(side, 0).ok());
      ASSERT_EQ(cudaEventRecord(seen, side), cudaSuccess);
      ASSERT_EQ(cudaEventSynchronize(seen), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(back.data(), pool, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      const BlockTable* t = store.Find(5);
      for (int list = 0; list < 3; ++list) {
        for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
          const std::byte* host = store.unit(t->blocks[sel.blocks[i]], 0, list);
          ASSERT_EQ(std::memcmp(back.data() + plan->slots[i] * unit, host, unit), 0)
              << "layer 0 at its event, step " << step << " head " << list << " block " << sel.blocks[i];
        }
      }
      for (int layer = 1; layer < 4; ++layer) ASSERT_TRUE((*engine)->WaitLayer(side, layer).ok());
      ASSERT_EQ(cudaEventRecord(seen, side), cudaSuccess);
      ASSERT_EQ(cudaEventSynchronize(seen), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(back.data(), pool, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      for (int list = 0; list < 12; ++list) {
        for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
          const std::byte* host = store.unit(t->blocks[sel.blocks[i]], list / 3, list % 3);
          ASSERT_EQ(std::memcmp(back.data() + plan->slots[i] * unit, host, unit), 0)
              << "step " << step << " list " << list << " block " << sel.blocks[i];
        }
      }
      cache.ReleaseStep(step);
    }
    EXPECT_GT(cache.counters().hits, 0);
    EXPECT_GT(cache.counters().evictions, 0);
    engine->reset();
    cudaEventDestroy(seen);
    cudaStreamDestroy(side);
    cudaFree(pool);
  }
}

// The write path on the GPU: rows written into the appended units' slots reach the host store
// through Flush, partial blocks keeping their earlier rows through Fetch.
TEST(CudaCopyEngineTest, AppendFetchFlushKeepsHostCurrent) {
  const KvLayout layout{.num_layers = 2, .num_kv_heads = 2, .head_dim = 64, .elem_bytes = 2};
  auto store_or = HostKvStore::Create(layout, 32, PinnedHostAllocator(), {.chunk_bytes = 4 * layout.slab_bytes()});
  ASSERT_TRUE(store_or.ok()) << store_or.status();
  HostKvStore& store = **store_or;
  ASSERT_TRUE(store.AddSession(1).ok());
  const size_t unit = layout.unit_bytes(), row = layout.head_dim * layout.elem_bytes;
  const int32_t kSlots = 12;  // small: appended units get evicted between appends
  std::byte* pool = nullptr;
  ASSERT_EQ(cudaMalloc(&pool, kSlots * unit), cudaSuccess);
  BlockCache cache(kSlots, 2, 2);
  auto engine = CudaCopyEngine::Create(pool, unit, layout.num_layers, 64);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::mt19937 rng(3);
  std::vector<std::vector<std::byte>> expect(4);  // per (layer, head): K row, V row per token
  int64_t len = 0;
  for (uint64_t step = 1; step <= 30; ++step) {
    const int64_t n = 1 + rng() % 21;
    absl::StatusOr<AppendPlan> ap = PlanAppend(1, n, store, cache, step);
    ASSERT_TRUE(ap.ok()) << ap.status();
    ASSERT_TRUE((*engine)->Fetch(*ap).ok());
    ASSERT_EQ(cudaStreamSynchronize((*engine)->stream()), cudaSuccess);
    // Stand-in for the kernel that appends K/V on the GPU: copy the new rows into the slots.
    size_t at = 0;
    for (int lh = 0; lh < 4; ++lh) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t pos = len + i;
        std::vector<std::byte> k(row), v(row);
        for (auto& b : k) b = std::byte(rng());
        for (auto& b : v) b = std::byte(rng());
        std::byte* u = pool + size_t(ap->slots[at + pos / kBlockSize - ap->first_block]) * unit;
        ASSERT_EQ(cudaMemcpy(u + (pos % kBlockSize) * row, k.data(), row, cudaMemcpyHostToDevice), cudaSuccess);
        ASSERT_EQ(cudaMemcpy(u + (kBlockSize + pos % kBlockSize) * row, v.data(), row, cudaMemcpyHostToDevice), cudaSuccess);
        expect[lh].insert(expect[lh].end(), k.begin(), k.end());
        expect[lh].insert(expect[lh].end(), v.begin(), v.end());
      }
      at += ap->num_blocks;
    }
    ASSERT_TRUE((*engine)->Flush(*ap).ok());
    ASSERT_EQ(cudaStreamSynchronize((*engine)->stream()), cudaSuccess);
    cache.ReleaseStep(step);
    len += n;
    const BlockTable* t = store.Find(1);
    for (int lh = 0; lh < 4; ++lh) {
      for (int64_t pos = 0; pos < len; ++pos) {
        const std::byte* u = store.unit(t->blocks[pos / kBlockSize], lh / 2, lh % 2);
        ASSERT_EQ(std::memcmp(u + (pos % kBlockSize) * row, expect[lh].data() + pos * 2 * row, row), 0)
            << "K row " << pos << " of unit " << lh << " after step " << step;
        ASSERT_EQ(std::memcmp(u + (kBlockSize + pos % kBlockSize) * row, expect[lh].data() + (pos * 2 + 1) * row, row), 0);
      }
    }
  }
  EXPECT_GT(cache.counters().evictions, 0);
  engine->reset();
  cudaFree(pool);
}

TEST(CudaCopyEngineTest, HostAllocatorsByName) {
  EXPECT_TRUE(HostAllocatorNamed("pinned").ok());
  EXPECT_TRUE(HostAllocatorNamed("hugepages").ok());
  const absl::StatusOr<HostAllocator> bad = HostAllocatorNamed("huge");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("expected pinned or hugepages"), std::string::npos);
  // An odd size is rounded up to whole 2 MiB pages, released without leaking the mapping.
  auto huge = HugePageHostAllocator();
  for (int i = 0; i < 3; ++i) {
    absl::StatusOr<void*> p = huge.allocate((size_t{3} << 20) + 5);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % (size_t{2} << 20), 0u);
    std::memset(*p, 7, (size_t{3} << 20) + 5);
    huge.release(*p);
  }
}

}  // namespace
}  // namespace scout::kvstore
