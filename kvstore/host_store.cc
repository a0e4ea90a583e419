#include "kvstore/host_store.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

HostAllocator AlignedHostAllocator() {
  return {[](size_t bytes) -> absl::StatusOr<void*> {
            void* p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
            if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes of host memory"));
            return p;
          },
          [](void* p) { std::free(p); }};
}

HostKvStore::HostKvStore(const KvLayout& layout, int32_t capacity_blocks, HostAllocator allocator,
                         int32_t slabs_per_chunk)
    : layout_(layout),
      allocator_(std::move(allocator)),
      slabs_per_chunk_(slabs_per_chunk),
      chunks_((capacity_blocks + slabs_per_chunk - 1) / slabs_per_chunk, nullptr),
      tables_(capacity_blocks),
      state_(chunks_.size(), kAbsent) {}

HostKvStore::~HostKvStore() {
  if (ahead_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    changed_.notify_all();
    ahead_.join();
  }
  for (std::byte* c : chunks_) {
    if (c != nullptr) allocator_.release(c);
  }
}

int HostKvStore::num_allocated_chunks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(std::count(state_.begin(), state_.end(), kReady));
}

size_t HostKvStore::ChunkBytes(int32_t chunk) const {
  const int32_t first = chunk * slabs_per_chunk_;
  return static_cast<size_t>(std::min(slabs_per_chunk_, capacity_blocks() - first)) * layout_.slab_bytes();
}

void HostKvStore::KickAhead() {
  if (chunks_ahead_ <= 0 || ahead_failed_) return;
  const int32_t next = tables_.allocator().LowestFree();
  if (next < 0) return;
  const int32_t first = next / slabs_per_chunk_;
  const int32_t end = std::min<int32_t>(first + 1 + chunks_ahead_, static_cast<int32_t>(chunks_.size()));
  bool queued = false;
  for (int32_t c = first; c < end; ++c) {
    if (state_[c] != kAbsent) continue;
    state_[c] = kPending;
    ahead_queue_.push_back(c);
    queued = true;
  }
  if (queued) changed_.notify_all();  // Reserve calls this every step; most steps queue nothing
}

void HostKvStore::AheadLoop() {
  for (;;) {
    int32_t c = 0;
    {
      std::unique_lock<std::mutex> lock(mu_);
      changed_.wait(lock, [&] { return stop_ || !ahead_queue_.empty(); });
      if (stop_) return;
      c = ahead_queue_.front();
      ahead_queue_.pop_front();
      ahead_current_ = c;
    }
    absl::StatusOr<void*> got = allocator_.allocate(ChunkBytes(c));
    std::lock_guard<std::mutex> lock(mu_);
    ahead_current_ = -1;
    if (got.ok()) {
      chunks_[c] = static_cast<std::byte*>(*got);
      state_[c] = kReady;
    } else {
      // Reserve allocates it itself when needed, and reports what the allocator says.
      std::fprintf(stderr, "KV store: allocating host memory ahead stopped (%s); chunks now come as reservations need them\n",
                   got.status().ToString().c_str());
      state_[c] = kAbsent;
      ahead_failed_ = true;
      for (int32_t q : ahead_queue_) state_[q] = kAbsent;
      ahead_queue_.clear();
    }
    changed_.notify_all();
  }
}

void HostKvStore::AwaitAhead() {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait(lock, [&] { return ahead_queue_.empty() && ahead_current_ < 0; });
}

absl::Status HostKvStore::AllocateChunks(const std::vector<int32_t>& which) {
  // Several threads: pinning is page-by-page kernel work, and a long prefill can cross many chunks.
  std::vector<absl::StatusOr<void*>> got(which.size(), absl::UnknownError("not allocated"));
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next++; i < which.size(); i = next++) {
      got[i] = allocator_.allocate(ChunkBytes(which[i]));
    }
  };
  const int threads = std::clamp<int>(static_cast<int>(std::thread::hardware_concurrency()), 1, 16);
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min<int>(threads, static_cast<int>(which.size())); ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  absl::Status failed;
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < which.size(); ++i) {
    if (got[i].ok()) {
      chunks_[which[i]] = static_cast<std::byte*>(*got[i]);
      state_[which[i]] = kReady;
      continue;
    }
    state_[which[i]] = kAbsent;
    if (failed.ok()) {
      failed = absl::ResourceExhaustedError(absl::StrCat("KV store: host memory for blocks from ", which[i] * slabs_per_chunk_,
                                                         " refused: ", got[i].status().message()));
    }
  }
  return failed;
}

absl::StatusOr<std::unique_ptr<HostKvStore>> HostKvStore::Create(const KvLayout& layout, int32_t capacity_blocks,
                                                                 HostAllocator allocator, const HostStoreOptions& options) {
  if (layout.num_layers <= 0 || layout.num_kv_heads <= 0 || layout.head_dim <= 0 || layout.elem_bytes <= 0 ||
      capacity_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad KV store shape: layers=", layout.num_layers, " kv_heads=",
                                                   layout.num_kv_heads, " head_dim=", layout.head_dim,
                                                   " blocks=", capacity_blocks));
  }
  const int32_t per_chunk = static_cast<int32_t>(std::max<size_t>(1, options.chunk_bytes / layout.slab_bytes()));
  std::unique_ptr<HostKvStore> store(new HostKvStore(layout, capacity_blocks, std::move(allocator), per_chunk));
  if (options.allocate_upfront) {
    std::vector<int32_t> all(store->chunks_.size());
    for (size_t c = 0; c < all.size(); ++c) all[c] = static_cast<int32_t>(c);
    {
      std::lock_guard<std::mutex> lock(store->mu_);
      for (ChunkState& st : store->state_) st = kPending;
    }
    if (absl::Status s = store->AllocateChunks(all); !s.ok()) return s;  // the destructor frees the rest
  } else if (options.chunks_ahead > 0) {
    store->chunks_ahead_ = std::min<int>(options.chunks_ahead, static_cast<int>(store->chunks_.size()));
    store->ahead_ = std::thread([s = store.get()] { s->AheadLoop(); });
    std::lock_guard<std::mutex> lock(store->mu_);
    store->KickAhead();
  }
  return store;
}

absl::Status HostKvStore::Reserve(SequenceId session, int64_t num_tokens) {
  const BlockTable* t = tables_.Find(session);
  const int64_t old_tokens = t != nullptr ? t->num_tokens : 0;
  const size_t old_blocks = t != nullptr ? t->blocks.size() : 0;
  if (absl::Status s = tables_.Grow(session, num_tokens); !s.ok()) return s;
  t = tables_.Find(session);
  std::vector<int32_t> needed;
  for (size_t i = old_blocks; i < t->blocks.size(); ++i) {
    const int32_t c = t->blocks[i] / slabs_per_chunk_;
    if (std::find(needed.begin(), needed.end(), c) == needed.end()) needed.push_back(c);
  }
  // Allocated here: absent chunks, and those queued ahead but not started (taken off the queue);
  // the one the background thread is allocating now is waited for after ours are in (and taken
  // if it failed).
  std::vector<int32_t> missing;
  int32_t busy = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int32_t c : needed) {
      if (state_[c] == kAbsent) {
        state_[c] = kPending;
        missing.push_back(c);
      } else if (state_[c] == kPending && c == ahead_current_) {
        busy = c;
      } else if (state_[c] == kPending) {
        // Pending and not in hand: still queued (only the background thread and this owner set
        // kPending, and this call is the owner's).
        if (auto it = std::find(ahead_queue_.begin(), ahead_queue_.end(), c); it != ahead_queue_.end()) {
          ahead_queue_.erase(it);
        }
        missing.push_back(c);
      }
    }
  }
  absl::Status s = missing.empty() ? absl::OkStatus() : AllocateChunks(missing);
  if (s.ok() && busy >= 0) {
    bool take = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Only the background thread moves a chunk it took to ready or absent.
      changed_.wait(lock, [&] { return state_[busy] != kPending; });
      if (state_[busy] == kAbsent) {
        state_[busy] = kPending;
        take = true;
      }
    }
    if (take) s = AllocateChunks({busy});
  }
  if (!s.ok()) {
    tables_.Truncate(session, old_tokens).IgnoreError();  // frees exactly the slabs Grow took
    return s;
  }
  std::lock_guard<std::mutex> lock(mu_);
  KickAhead();
  return absl::OkStatus();
}

absl::Status HostKvStore::WriteTokens(SequenceId session, int layer, int head, int64_t first, int64_t n,
                                      const std::byte* k, const std::byte* v) {
  const BlockTable* t = tables_.Find(session);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  if (first < 0 || n < 0 || first + n > t->num_tokens) {
    return absl::OutOfRangeError(absl::StrCat("tokens [", first, ", ", first + n, ") of session ", session,
                                              " outside its ", t->num_tokens, " reserved tokens"));
  }
  if (layer < 0 || layer >= layout_.num_layers || head < 0 || head >= layout_.num_kv_heads) {
    return absl::OutOfRangeError(absl::StrCat("layer ", layer, " head ", head, " outside the layout"));
  }
  const size_t row = static_cast<size_t>(layout_.head_dim) * layout_.elem_bytes;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = first + i;
    std::byte* u = unit(t->blocks[pos / kBlockSize], layer, head);
    std::memcpy(u + (pos % kBlockSize) * row, k + i * row, row);
    std::memcpy(u + (kBlockSize + pos % kBlockSize) * row, v + i * row, row);
  }
  return absl::OkStatus();
}

}  // namespace scout::kvstore
