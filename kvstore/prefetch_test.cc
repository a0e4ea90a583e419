#include "kvstore/prefetch_planner.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <tuple>

#include "gtest/gtest.h"

namespace scout::kvstore {
namespace {

const KvLayout kLayout{.num_layers = 3, .num_kv_heads = 2, .head_dim = 8, .elem_bytes = 2};

// Random operation sequences (add session, append tokens, select + prefetch, keep a step in
// flight, release) against a plain model of what each token's K and V rows hold. After every
// step: every cache slot in use holds exactly the bytes of the host unit it claims, units pinned
// by an in-flight step never move, and the host store holds what was written.
TEST(PrefetchModelTest, SlotsHoldTheBytesOfTheHostBlocksTheyClaim) {
  for (uint32_t seed = 1; seed <= 12; ++seed) {
    std::mt19937 rng(seed);
    // Odd seeds keep a chunk allocated ahead by the store's background thread.
    const int ahead = static_cast<int>(seed % 2);
    auto store_or = HostKvStore::Create(kLayout, 40, AlignedHostAllocator(),
                                        {.chunk_bytes = 5 * kLayout.slab_bytes(), .chunks_ahead = ahead});
    ASSERT_TRUE(store_or.ok()) << store_or.status();
    HostKvStore& store = **store_or;
    store.AwaitAhead();
    ASSERT_EQ(store.chunks().size(), 8u);  // 40 slabs in chunks of 5
    ASSERT_EQ(store.num_allocated_chunks(), ahead == 0 ? 0 : 2);  // allocated as sessions grow
    const int32_t kSlots = 24;
    BlockCache cache(kSlots, kLayout.num_layers, kLayout.num_kv_heads);
    const size_t unit = kLayout.unit_bytes(), row = kLayout.head_dim * kLayout.elem_bytes;
    std::vector<std::byte> pool(kSlots * unit);
    // model: (session, layer, head, pos) -> K row bytes then V row bytes
    std::map<std::tuple<SequenceId, int, int, int64_t>, std::vector<std::byte>> model;
    std::map<SequenceId, int64_t> lengths;
    uint64_t step = 0;
    std::map<int32_t, UnitKey> in_flight;  // slots pinned by an unreleased step
    uint64_t in_flight_step = 0;

    auto release_in_flight = [&] {
      if (!in_flight.empty()) cache.ReleaseStep(in_flight_step);
      in_flight.clear();
    };
    auto check_slots = [&] {
      for (int32_t s = 0; s < kSlots; ++s) {
        if (!cache.in_use(s)) continue;
        const UnitKey& k = cache.key_of(s);
        const BlockTable* t = store.Find(k.session);
        ASSERT_NE(t, nullptr) << "slot " << s << " claims a released session";
        ASSERT_LT(k.block, static_cast<int32_t>(t->blocks.size()));
        ASSERT_EQ(std::memcmp(pool.data() + s * unit, store.unit(t->blocks[k.block], k.layer, k.head), unit), 0)
            << "slot " << s << " differs from host block " << k.block << " (seed " << seed << ", step " << step << ")";
      }
      for (const auto& [slot, key] : in_flight) {
        ASSERT_TRUE(cache.in_use(slot));
        ASSERT_EQ(cache.key_of(slot), key) << "a pinned unit was evicted";
      }
    };

    for (int op_i = 0; op_i < 400; ++op_i) {
      const int op = std::uniform_int_distribution<int>(0, 9)(rng);
      const SequenceId sid = std::uniform_int_distribution<SequenceId>(0, 3)(rng);
      const bool known = lengths.count(sid) > 0;
      if (op == 0) {
        EXPECT_EQ(store.AddSession(sid).ok(), !known);
        lengths.emplace(sid, 0);
      } else if (op <= 3 && known) {
        // Append tokens, half the time through the GPU write path (rows written into cache
        // slots, then flushed), else written on the host with cached copies invalidated.
        const int64_t n = std::uniform_int_distribution<int64_t>(1, 40)(rng);
        const int64_t first = lengths[sid];
        release_in_flight();  // a write waits for the steps reading the blocks it touches
        auto random_rows = [&](std::vector<std::byte>* k, std::vector<std::byte>* v) {
          k->resize(n * row);
          v->resize(n * row);
          for (auto& b : *k) b = std::byte(rng());
          for (auto& b : *v) b = std::byte(rng());
        };
        auto remember = [&](int layer, int head, const std::vector<std::byte>& k, const std::vector<std::byte>& v) {
          for (int64_t i = 0; i < n; ++i) {
            std::vector<std::byte> kv(k.begin() + i * row, k.begin() + (i + 1) * row);
            kv.insert(kv.end(), v.begin() + i * row, v.begin() + (i + 1) * row);
            model[{sid, layer, head, first + i}] = kv;
          }
        };
        if (std::uniform_int_distribution<int>(0, 1)(rng) == 0) {
          ++step;
          absl::StatusOr<AppendPlan> ap = PlanAppend(sid, n, store, cache, step);
          if (!ap.ok()) {
            EXPECT_EQ(ap.status().code(), absl::StatusCode::kResourceExhausted) << ap.status();
            EXPECT_EQ(store.Find(sid)->num_tokens, first) << "a failed append changed the session";
            continue;
          }
          ExecuteFetchOnHost(*ap, unit, pool.data());
          size_t at = 0;
          for (int layer = 0; layer < kLayout.num_layers; ++layer) {
            for (int head = 0; head < kLayout.num_kv_heads; ++head) {
              std::vector<std::byte> k, v;
              random_rows(&k, &v);
              for (int64_t i = 0; i < n; ++i) {  // what the GPU kernel does
                const int64_t pos = first + i;
                std::byte* u = pool.data() + size_t(ap->slots[at + pos / kBlockSize - ap->first_block]) * unit;
                std::memcpy(u + (pos % kBlockSize) * row, k.data() + i * row, row);
                std::memcpy(u + (kBlockSize + pos % kBlockSize) * row, v.data() + i * row, row);
              }
              at += ap->num_blocks;
              remember(layer, head, k, v);
            }
          }
          ExecuteFlushOnHost(*ap, unit, pool.data());
          cache.ReleaseStep(step);
        } else {
          absl::Status s = store.Reserve(sid, first + n);
          if (!s.ok()) {
            EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
            continue;
          }
          for (int layer = 0; layer < kLayout.num_layers; ++layer) {
            for (int head = 0; head < kLayout.num_kv_heads; ++head) {
              std::vector<std::byte> k, v;
              random_rows(&k, &v);
              ASSERT_TRUE(store.WriteTokens(sid, layer, head, first, n, k.data(), v.data()).ok());
              remember(layer, head, k, v);
              for (int64_t b = first / kBlockSize; b <= (first + n - 1) / kBlockSize; ++b) {
                ASSERT_TRUE(cache.Invalidate({sid, layer, head, static_cast<int32_t>(b)}).ok());
              }
            }
          }
        }
        lengths[sid] = first + n;
      } else if (op <= 7 && known && lengths[sid] > 0) {
        // Select a random subset of blocks per (layer, head), plan, move, check.
        const int32_t nb = static_cast<int32_t>(BlocksFor(lengths[sid]));
        Selection sel{.num_layers = kLayout.num_layers, .num_kv_heads = kLayout.num_kv_heads, .indptr = {0}, .blocks = {}};
        for (int list = 0; list < kLayout.num_layers * kLayout.num_kv_heads; ++list) {
          for (int32_t b = 0; b < nb; ++b) {
            if (std::uniform_int_distribution<int>(0, 3)(rng) == 0) sel.blocks.push_back(b);
          }
          sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
        }
        ++step;
        absl::StatusOr<PrefetchPlan> plan = PlanPrefetch(sel, sid, store, cache, step);
        if (!plan.ok()) {
          EXPECT_EQ(plan.status().code(), absl::StatusCode::kResourceExhausted) << plan.status();
          // Nothing of this step stays pinned; the in-flight step's units are untouched.
          check_slots();
          continue;
        }
        EXPECT_EQ(plan->hits + plan->misses, static_cast<int64_t>(sel.blocks.size()));
        for (int layer = 0; layer < kLayout.num_layers; ++layer) {  // layer by layer, as the GPU does
          ExecutePrefetchOnHost(*plan, unit, pool.data(), layer, layer + 1);
        }
        for (int list = 0; list < kLayout.num_layers * kLayout.num_kv_heads; ++list) {
          for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
            const UnitKey want{sid, list / kLayout.num_kv_heads, list % kLayout.num_kv_heads, sel.blocks[i]};
            ASSERT_EQ(cache.key_of(plan->slots[i]), want);
          }
        }
        check_slots();
        // Keep this step in flight across the next operation sometimes; else release it.
        release_in_flight();
        if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) {
          in_flight_step = step;
          for (int list = 0; list < kLayout.num_layers * kLayout.num_kv_heads; ++list) {
            for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
              in_flight[plan->slots[i]] = {sid, list / kLayout.num_kv_heads, list % kLayout.num_kv_heads, sel.blocks[i]};
            }
          }
        } else {
          cache.ReleaseStep(step);
        }
      } else if (op == 8 && known) {
        release_in_flight();
        ASSERT_TRUE(cache.EraseSession(sid).ok());
        ASSERT_TRUE(store.ReleaseSession(sid).ok());
        lengths.erase(sid);
        for (auto it = model.begin(); it != model.end();) {
          it = std::get<0>(it->first) == sid ? model.erase(it) : std::next(it);
        }
      }
      check_slots();
      // The host store holds what was written.
      for (const auto& [key, kv] : model) {
        const auto& [s, layer, head, pos] = key;
        const std::byte* u = store.unit(store.Find(s)->blocks[pos / kBlockSize], layer, head);
        ASSERT_EQ(std::memcmp(u + (pos % kBlockSize) * row, kv.data(), row), 0);
        ASSERT_EQ(std::memcmp(u + (kBlockSize + pos % kBlockSize) * row, kv.data() + row, row), 0);
      }
    }
    EXPECT_GT(cache.counters().evictions, 0) << "the cache never filled: the test did not exercise eviction";
    EXPECT_GT(cache.counters().hits, 0);
  }
}

// Chunks come as reservations need them; a refused chunk leaves the session as it was.
TEST(HostKvStoreTest, AllocatesChunksOnDemandAndRollsBackWhenRefused) {
  std::atomic<int> allocations = 0, releases = 0;  // the store allocates from several threads
  HostAllocator counting{[&](size_t bytes) -> absl::StatusOr<void*> {
                           if (allocations == 3) return absl::ResourceExhaustedError("test: no more memory");
                           ++allocations;
                           return std::malloc(bytes);
                         },
                         [&](void* p) {
                           ++releases;
                           std::free(p);
                         }};
  {
    auto store = HostKvStore::Create(kLayout, 20, counting, {.chunk_bytes = 4 * kLayout.slab_bytes()});
    ASSERT_TRUE(store.ok());
    EXPECT_EQ(allocations.load(), 0);
    ASSERT_TRUE((*store)->AddSession(1).ok());
    ASSERT_TRUE((*store)->Reserve(1, 5 * kBlockSize).ok());  // 5 slabs: chunks 0 and 1
    EXPECT_EQ(allocations.load(), 2);
    ASSERT_TRUE((*store)->Reserve(1, 8 * kBlockSize).ok());  // still chunk 1
    EXPECT_EQ(allocations.load(), 2);
    ASSERT_TRUE((*store)->Reserve(1, 12 * kBlockSize).ok());  // chunk 2
    EXPECT_EQ(allocations.load(), 3);
    absl::Status s = (*store)->Reserve(1, 13 * kBlockSize);  // chunk 3 refused
    EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
    EXPECT_NE(s.message().find("test: no more memory"), std::string::npos);
    EXPECT_EQ((*store)->Find(1)->num_tokens, 12 * kBlockSize);
    EXPECT_EQ((*store)->used_blocks(), 12);
    // Upfront allocation fails cleanly too.
    auto eager = HostKvStore::Create(kLayout, 20, counting, {.chunk_bytes = 4 * kLayout.slab_bytes(), .allocate_upfront = true});
    EXPECT_EQ(eager.status().code(), absl::StatusCode::kResourceExhausted);
  }
  EXPECT_EQ(releases.load(), allocations.load()) << "chunks leaked";
}

// With chunks_ahead the background thread allocates the next free slab's chunk and the ones
// after it, so reservations find them ready; a failure there stops it, and Reserve then
// allocates (and reports) by itself.
TEST(HostKvStoreTest, AllocatesChunksAheadInTheBackground) {
  std::mutex mu;
  std::vector<std::thread::id> allocators;  // the thread of each allocation
  int fail_at = -1;                         // allocation index to refuse
  std::atomic<int> releases = 0;
  HostAllocator recording{[&](size_t bytes) -> absl::StatusOr<void*> {
                            std::lock_guard<std::mutex> lock(mu);
                            if (static_cast<int>(allocators.size()) == fail_at) {
                              fail_at = -1;
                              return absl::ResourceExhaustedError("test: refused once");
                            }
                            allocators.push_back(std::this_thread::get_id());
                            return std::malloc(bytes);
                          },
                          [&](void* p) {
                            ++releases;
                            std::free(p);
                          }};
  auto allocations = [&] {
    std::lock_guard<std::mutex> lock(mu);
    return allocators.size();
  };
  auto by_this_thread = [&] {
    std::lock_guard<std::mutex> lock(mu);
    return std::count(allocators.begin(), allocators.end(), std::this_thread::get_id());
  };
  {
    auto store = HostKvStore::Create(kLayout, 20, recording, {.chunk_bytes = 4 * kLayout.slab_bytes(), .chunks_ahead = 1});
    ASSERT_TRUE(store.ok());
    HostKvStore& st = **store;
    st.AwaitAhead();
    EXPECT_EQ(allocations(), 2u);  // chunks 0 and 1, before any session
    EXPECT_EQ(st.num_allocated_chunks(), 2);
    ASSERT_TRUE(st.AddSession(1).ok());
    ASSERT_TRUE(st.Reserve(1, 5 * kBlockSize).ok());  // slabs 0-4: chunks 0 and 1, both ready
    st.AwaitAhead();
    EXPECT_EQ(allocations(), 3u);  // next free slab 5 (chunk 1): chunk 2 ahead
    ASSERT_TRUE(st.Reserve(1, 12 * kBlockSize).ok());  // slabs up to 11: chunk 2, ready
    st.AwaitAhead();
    EXPECT_EQ(allocations(), 5u);  // next free slab 12 (chunk 3): chunks 3 and 4
    ASSERT_TRUE(st.Reserve(1, 20 * kBlockSize).ok());  // the whole store
    st.AwaitAhead();
    EXPECT_EQ(allocations(), 5u);
    EXPECT_EQ(st.num_allocated_chunks(), 5);
    // The bytes are usable: a row written lands in the unit that names it.
    std::vector<std::byte> k(kLayout.head_dim * kLayout.elem_bytes, std::byte{7}), v(k.size(), std::byte{9});
    ASSERT_TRUE(st.WriteTokens(1, 2, 1, 16 * kBlockSize + 3, 1, k.data(), v.data()).ok());
    const std::byte* u = st.unit(st.Find(1)->blocks[16], 2, 1);  // holds token 16 * 16 + 3
    EXPECT_EQ(u[3 * k.size()], std::byte{7});
    EXPECT_EQ(u[(kBlockSize + 3) * k.size()], std::byte{9});
    EXPECT_EQ(by_this_thread(), 0);  // this thread never waited for an allocation of its own
  }
  EXPECT_EQ(releases.load(), 5);
  {
    std::lock_guard<std::mutex> lock(mu);
    allocators.clear();
    fail_at = 1;  // the background thread's second chunk is refused
  }
  releases = 0;
  {
    auto store = HostKvStore::Create(kLayout, 20, recording, {.chunk_bytes = 4 * kLayout.slab_bytes(), .chunks_ahead = 2});
    ASSERT_TRUE(store.ok());
    HostKvStore& st = **store;
    st.AwaitAhead();
    EXPECT_EQ(st.num_allocated_chunks(), 1);  // chunk 0; chunk 1 refused, so the thread stopped
    ASSERT_TRUE(st.AddSession(1).ok());
    EXPECT_EQ(allocations(), 1u);
    ASSERT_TRUE(st.Reserve(1, 9 * kBlockSize).ok());  // chunks 1 and 2, by Reserve itself
    EXPECT_EQ(allocations(), 3u);
    st.AwaitAhead();
    EXPECT_EQ(st.num_allocated_chunks(), 3);  // and nothing more ahead
  }
  EXPECT_EQ(releases.load(), 3);
}

// A reservation takes a chunk still queued for the background thread off the queue and
// allocates it on its own thread, and waits for the one the thread has in hand.
TEST(HostKvStoreTest, ReserveTakesQueuedChunksAndWaitsForTheOneInHand) {
  std::mutex mu;
  std::condition_variable cv;
  bool hold = true;  // the first allocation blocks until the test lets it go
  std::vector<std::thread::id> who;
  std::atomic<int> releases = 0;
  HostAllocator blocking{[&](size_t bytes) -> absl::StatusOr<void*> {
                           std::unique_lock<std::mutex> lock(mu);
                           who.push_back(std::this_thread::get_id());
                           cv.notify_all();
                           if (who.size() == 1) cv.wait(lock, [&] { return !hold; });
                           return std::malloc(bytes);
                         },
                         [&](void* p) {
                           ++releases;
                           std::free(p);
                         }};
  {
    auto store = HostKvStore::Create(kLayout, 20, blocking, {.chunk_bytes = 4 * kLayout.slab_bytes(), .chunks_ahead = 1});
    ASSERT_TRUE(store.ok());
    HostKvStore& st = **store;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return who.size() >= 1; });  // chunk 0 in hand, chunk 1 queued
    }
    ASSERT_TRUE(st.AddSession(1).ok());
    absl::Status reserved = absl::UnknownError("not run");
    std::thread owner([&] { reserved = st.Reserve(1, 5 * kBlockSize); });  // slabs 0-4: chunks 0 and 1
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return who.size() >= 2; });
      EXPECT_EQ(who[1], owner.get_id());  // chunk 1, taken off the queue
      hold = false;
      cv.notify_all();
    }
    owner.join();
    ASSERT_TRUE(reserved.ok()) << reserved;
    st.AwaitAhead();
    EXPECT_EQ(st.num_allocated_chunks(), 3);  // and chunk 2 ahead
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_EQ(who.size(), 3u);
  }
  EXPECT_EQ(releases.load(), 3);
}

TEST(PrefetchPlannerTest, RejectsBadSelectionsAndFullCacheCleanly) {
  auto store = HostKvStore::Create(kLayout, 8);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->AddSession(1).ok());
  ASSERT_TRUE((*store)->Reserve(1, 40).ok());  // 3 blocks
  BlockCache cache(4, 3, 2);
  auto sel_of = [](std::vector<int32_t> blocks) {
    Selection s{.num_layers = 3, .num_kv_heads = 2, .indptr = {0}, .blocks = {}};
    for (int list = 0; list < 6; ++list) {
      s.blocks.insert(s.blocks.end(), blocks.begin(), blocks.end());
      s.indptr.push_back(static_cast<int32_t>(s.blocks.size()));
    }
    return s;
  };
  EXPECT_EQ(PlanPrefetch(sel_of({0, 3}), 1, **store, cache, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanPrefetch(sel_of({1, 1}), 1, **store, cache, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanPrefetch(sel_of({0}), 2, **store, cache, 1).status().code(), absl::StatusCode::kNotFound);
  // 6 lists x 1 block fits in 4 slots only if earlier ones can be evicted: they are pinned.
  absl::StatusOr<PrefetchPlan> p = PlanPrefetch(sel_of({0}), 1, **store, cache, 1);
  EXPECT_EQ(p.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache.num_used(), 0) << "a failed plan left claimed slots behind";
  // Store exhaustion is clean too.
  EXPECT_EQ((*store)->Reserve(1, 1000).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ((*store)->Find(1)->num_tokens, 40);
}

}  // namespace
}  // namespace scout::kvstore

namespace scout::kvstore {
namespace {

// Regression (review 2026-11-27): a plan that ran out of slots unpinned everything its step
// held, earlier plans of the same step included, so their units could be evicted mid-step.
TEST(PrefetchPlannerTest, FailedPlanUnpinsOnlyItsOwnUnits) {
  auto store = HostKvStore::Create(kLayout, 8);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE((*store)->AddSession(1).ok());
  ASSERT_TRUE((*store)->Reserve(1, 40).ok());
  BlockCache cache(8, 3, 2);
  Selection one{.num_layers = 3, .num_kv_heads = 2, .indptr = {0, 1, 1, 1, 1, 1, 1}, .blocks = {0}};
  ASSERT_TRUE(PlanPrefetch(one, 1, **store, cache, 7).ok());
  const int32_t pinned_slot = cache.Find({1, 0, 0, 0});
  Selection many{.num_layers = 3, .num_kv_heads = 2, .indptr = {0}, .blocks = {}};
  for (int list = 0; list < 6; ++list) {
    many.blocks.insert(many.blocks.end(), {1, 2});
    many.indptr.push_back(static_cast<int32_t>(many.blocks.size()));
  }
  EXPECT_EQ(PlanPrefetch(many, 1, **store, cache, 7).status().code(), absl::StatusCode::kResourceExhausted);
  // The first plan's unit is still pinned: cycling every other slot through other steps (each
  // released at once) must evict around it. Unpinned, it would be the least recently used.
  for (int i = 0; i < 10; ++i) {
    Selection other{.num_layers = 3, .num_kv_heads = 2, .indptr = {0}, .blocks = {}};
    for (int list = 0; list < 6; ++list) {
      if (list == 1 + i % 5) other.blocks.push_back(i / 5 + 1);  // (layer, head) = list, block 1 or 2
      other.indptr.push_back(static_cast<int32_t>(other.blocks.size()));
    }
    ASSERT_TRUE(PlanPrefetch(other, 1, **store, cache, 100 + i).ok());
    cache.ReleaseStep(100 + i);
  }
  EXPECT_GT(cache.counters().evictions, 0);
  EXPECT_EQ(cache.Find({1, 0, 0, 0}), pinned_slot) << "the first plan's unit was evicted";
  // Malformed index arrays are refused before anything is read.
  Selection bad{.num_layers = 3, .num_kv_heads = 2, .indptr = {0, 2, 1, 2, 2, 2, 2}, .blocks = {0, 1}};
  EXPECT_EQ(PlanPrefetch(bad, 1, **store, cache, 9).status().code(), absl::StatusCode::kInvalidArgument);
}

// A step plans each sequence from the one batch-flat Selection (no per-sequence copies): the
// plan of sequence s of the batch is the plan of that sequence's lists alone, slots included.
TEST(PrefetchPlannerTest, PlansOneSequenceOfABatchSelection) {
  auto store = HostKvStore::Create(kLayout, 16);
  ASSERT_TRUE(store.ok());
  for (SequenceId s : {1, 2}) {
    ASSERT_TRUE((*store)->AddSession(s).ok());
    ASSERT_TRUE((*store)->Reserve(s, 16 * s + 40).ok());
  }
  std::mt19937 rng(7);
  Selection batch{.num_seqs = 2, .num_layers = 3, .num_kv_heads = 2, .indptr = {0}, .blocks = {}};
  std::vector<Selection> alone(2, Selection{.num_layers = 3, .num_kv_heads = 2, .indptr = {0}, .blocks = {}});
  for (int seq = 0; seq < 2; ++seq) {
    const int32_t nb = static_cast<int32_t>((*store)->Find(seq + 1)->blocks.size());
    for (int list = 0; list < 6; ++list) {
      for (int32_t b = 0; b < nb; ++b) {
        if (rng() % 2 == 0) continue;
        batch.blocks.push_back(b);
        alone[seq].blocks.push_back(b);
      }
      batch.indptr.push_back(static_cast<int32_t>(batch.blocks.size()));
      alone[seq].indptr.push_back(static_cast<int32_t>(alone[seq].blocks.size()));
    }
  }
  for (int seq = 0; seq < 2; ++seq) {
    BlockCache a(32, 3, 2), b(32, 3, 2);
    absl::StatusOr<PrefetchPlan> from_batch = PlanPrefetchLayers(batch, seq, seq + 1, **store, a, 1, 0, 3);
    absl::StatusOr<PrefetchPlan> from_alone = PlanPrefetch(alone[seq], seq + 1, **store, b, 1);
    ASSERT_TRUE(from_batch.ok()) << from_batch.status();
    ASSERT_TRUE(from_alone.ok()) << from_alone.status();
    EXPECT_EQ(from_batch->slots, from_alone->slots) << "sequence " << seq;
    ASSERT_EQ(from_batch->transfers.size(), from_alone->transfers.size());
    for (size_t i = 0; i < from_batch->transfers.size(); ++i) {
      EXPECT_EQ(from_batch->transfers[i].src, from_alone->transfers[i].src);
      EXPECT_EQ(from_batch->transfers[i].slot, from_alone->transfers[i].slot);
    }
  }
  BlockCache c(32, 3, 2);
  EXPECT_EQ(PlanPrefetchLayers(batch, 2, 1, **store, c, 1, 0, 3).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanPrefetch(batch, 1, **store, c, 1).status().code(), absl::StatusCode::kInvalidArgument)
      << "a two-sequence selection planned as one session's";
}

}  // namespace
// A model that gives each layer its own cache plans its layers on separate threads: the plans
// put exactly the host bytes into each layer's slots, as one plan over one cache would.
TEST(PrefetchLayersTest, PerLayerCachesPlannedConcurrentlyMoveTheSameBytes) {
  std::mt19937 rng(5);
  auto store_or = HostKvStore::Create(kLayout, 64, AlignedHostAllocator(), {.chunk_bytes = 8 * kLayout.slab_bytes()});
  ASSERT_TRUE(store_or.ok()) << store_or.status();
  HostKvStore& store = **store_or;
  const size_t unit = kLayout.unit_bytes();
  ASSERT_TRUE(store.AddSession(7).ok());
  ASSERT_TRUE(store.Reserve(7, 40 * kBlockSize).ok());
  for (int32_t slab : store.Find(7)->blocks) {
    for (int l = 0; l < kLayout.num_layers; ++l) {
      for (int h = 0; h < kLayout.num_kv_heads; ++h) {
        for (size_t i = 0; i < unit; ++i) store.unit(slab, l, h)[i] = std::byte(rng());
      }
    }
  }
  const int32_t per_layer = 30;
  std::vector<std::unique_ptr<BlockCache>> caches;
  for (int l = 0; l < kLayout.num_layers; ++l) {
    caches.push_back(std::make_unique<BlockCache>(per_layer, kLayout.num_layers, kLayout.num_kv_heads));
  }
  std::vector<std::byte> pool(kLayout.num_layers * per_layer * unit);
  for (uint64_t step = 1; step <= 6; ++step) {
    Selection sel{.num_layers = kLayout.num_layers, .num_kv_heads = kLayout.num_kv_heads, .indptr = {0}, .blocks = {}};
    for (int list = 0; list < kLayout.num_layers * kLayout.num_kv_heads; ++list) {
      for (int32_t b = 0; b < 40; ++b) {
        if (rng() % 4 == 0) sel.blocks.push_back(b);
      }
      sel.indptr.push_back(static_cast<int32_t>(sel.blocks.size()));
    }
    std::vector<absl::StatusOr<PrefetchPlan>> plans(kLayout.num_layers, absl::UnknownError("not run"));
    std::vector<std::thread> threads;
    for (int l = 0; l < kLayout.num_layers; ++l) {
      threads.emplace_back([&, l] { plans[l] = PlanPrefetchLayers(sel, 7, store, *caches[l], step, l, l + 1); });
    }
    for (std::thread& t : threads) t.join();
    for (int l = 0; l < kLayout.num_layers; ++l) {
      ASSERT_TRUE(plans[l].ok()) << plans[l].status();
      const PrefetchPlan& p = *plans[l];
      ASSERT_EQ(p.layer_begin.size(), static_cast<size_t>(kLayout.num_layers) + 1);
      EXPECT_EQ(p.layer_begin[l + 1] - p.layer_begin[l], static_cast<int32_t>(p.transfers.size()));
      std::byte* layer_pool = pool.data() + l * per_layer * unit;
      ExecutePrefetchOnHost(p, unit, layer_pool, 0, kLayout.num_layers);
      // Every selected block of this layer reads the bytes of its host unit.
      const int32_t first = sel.indptr[l * kLayout.num_kv_heads];
      ASSERT_EQ(p.slots.size(), static_cast<size_t>(sel.indptr[(l + 1) * kLayout.num_kv_heads] - first));
      for (int h = 0; h < kLayout.num_kv_heads; ++h) {
        const int list = l * kLayout.num_kv_heads + h;
        for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
          const std::byte* host = store.unit(store.Find(7)->blocks[sel.blocks[i]], l, h);
          ASSERT_EQ(std::memcmp(layer_pool + p.slots[i - first] * unit, host, unit), 0)
              << "layer " << l << " head " << h << " block " << sel.blocks[i] << " step " << step;
        }
      }
      caches[l]->ReleaseStep(step);
    }
  }
}

}  // namespace scout::kvstore
