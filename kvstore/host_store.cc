#include "kvstore/host_store.h"

#include <algorithm>
#include <atomic>
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
    : layout_(layout), allocator_(std::move(allocator)), slabs_per_chunk_(slabs_per_chunk), tables_(capacity_blocks) {}

HostKvStore::~HostKvStore() {
  for (std::byte* c : chunks_) allocator_.release(c);
}

absl::StatusOr<std::unique_ptr<HostKvStore>> HostKvStore::Create(const KvLayout& layout, int32_t capacity_blocks,
                                                                 HostAllocator allocator, size_t chunk_bytes) {
  if (layout.num_layers <= 0 || layout.num_kv_heads <= 0 || layout.head_dim <= 0 || layout.elem_bytes <= 0 ||
      capacity_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("bad KV store shape: layers=", layout.num_layers, " kv_heads=",
                                                   layout.num_kv_heads, " head_dim=", layout.head_dim,
                                                   " blocks=", capacity_blocks));
  }
  const int32_t per_chunk = static_cast<int32_t>(std::max<size_t>(1, chunk_bytes / layout.slab_bytes()));
  std::unique_ptr<HostKvStore> store(new HostKvStore(layout, capacity_blocks, std::move(allocator), per_chunk));
  // Chunks are allocated by several threads: pinning host memory is page-by-page kernel work
  // (~0.6 s per GiB on one thread on the GPU machine), and a 1M-token session is 128 GiB.
  const int32_t num_chunks = (capacity_blocks + per_chunk - 1) / per_chunk;
  std::vector<absl::StatusOr<void*>> got(num_chunks, absl::UnknownError("not allocated"));
  std::atomic<int32_t> next{0};
  auto worker = [&] {
    for (int32_t c = next++; c < num_chunks; c = next++) {
      const int32_t first = c * per_chunk;
      got[c] = store->allocator_.allocate(static_cast<size_t>(std::min(per_chunk, capacity_blocks - first)) *
                                          layout.slab_bytes());
    }
  };
  const int threads = std::clamp<int>(static_cast<int>(std::thread::hardware_concurrency()), 1, 16);
  std::vector<std::thread> pool;
  for (int t = 1; t < std::min(threads, num_chunks); ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  absl::Status failed;
  for (int32_t c = 0; c < num_chunks; ++c) {
    if (got[c].ok()) {
      store->chunks_.push_back(static_cast<std::byte*>(*got[c]));
    } else if (failed.ok()) {
      failed = absl::ResourceExhaustedError(absl::StrCat("KV store of ", store->bytes(), " bytes: chunk at block ",
                                                         c * per_chunk, " failed: ", got[c].status().message()));
    }
  }
  if (!failed.ok()) return failed;  // the destructor releases the chunks that were allocated
  return store;
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
