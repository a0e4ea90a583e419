// The host-memory KV store: every block of every session, whatever the GPU holds.
#pragma once

#include <cstddef>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvstore/block_table.h"

namespace scout::kvstore {

// Shape of the KV the store holds. A unit is one (layer, KV head, 16-token block): its 16 keys
// then its 16 values, what a Selection names and what the prefetcher moves (8 KiB at head_dim
// 128 in bf16). A slab is one logical block of a session in every layer and head:
// [layer][kv_head][K|V][16][head_dim].
struct KvLayout {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int elem_bytes = 2;  // bf16

  size_t unit_bytes() const { return size_t{2} * kBlockSize * head_dim * elem_bytes; }
  size_t slab_bytes() const { return unit_bytes() * num_layers * num_kv_heads; }
};

// Host memory for the store, handed out in large chunks. The CPU build uses plain aligned
// memory; GPU builds pass an allocator of pinned, device-mapped memory (PinnedHostAllocator in
// kvstore/copy_engine.cuh). Both functions must be thread-safe: chunks are allocated from
// several threads at once.
struct HostAllocator {
  std::function<absl::StatusOr<void*>(size_t bytes)> allocate;
  std::function<void(void*)> release;
};
HostAllocator AlignedHostAllocator();

struct HostStoreOptions {
  size_t chunk_bytes = size_t{1} << 30;  // memory is taken in chunks of this size (whole slabs)
  // false: a chunk is allocated when a reservation first needs one of its slabs, so a store sized
  // for millions of tokens comes up at once and pins memory as KV arrives (pinning runs at
  // ~0.6 s per GiB on the GPU machine: 90 s for a 1M-token Llama-3.1-8B session up front).
  bool allocate_upfront = false;
  // > 0 (chunks allocated as needed): a background thread keeps the chunk of the next free slab
  // and this many chunks after it allocated ahead of need, so a growing session (a long prefill)
  // does not wait in Reserve for pinning (tenths of a second per GiB). Slabs go
  // lowest first, so those are the chunks the next reservations take. The store pins them as
  // soon as it is made, sessions or not (per tensor-parallel rank). After a background
  // allocation fails (said once on stderr) the thread stops; Reserve then allocates, and
  // reports, as without it. A store must be destroyed before the process's CUDA teardown.
  int chunks_ahead = 0;
};

// Owns the memory and the per-session slab tables. Not thread-safe: one owner serialises calls;
// the bytes of distinct units may be read concurrently (the copy engine does).
class HostKvStore {
 public:
  // Room for capacity_blocks slabs. InvalidArgument for a bad layout; ResourceExhausted naming
  // the bytes if up-front memory runs out.
  static absl::StatusOr<std::unique_ptr<HostKvStore>> Create(const KvLayout& layout, int32_t capacity_blocks,
                                                             HostAllocator allocator = AlignedHostAllocator(),
                                                             const HostStoreOptions& options = {});
  ~HostKvStore();
  HostKvStore(const HostKvStore&) = delete;
  HostKvStore& operator=(const HostKvStore&) = delete;

  // Session lifecycle; same codes as BlockTableManager (AlreadyExists, NotFound).
  absl::Status AddSession(SequenceId session) { return tables_.AddSequence(session); }
  absl::Status ReleaseSession(SequenceId session) { return tables_.Release(session); }
  // Grows a session to num_tokens, all or nothing: ResourceExhausted (no free slab, or host
  // memory for a new chunk refused; the message names which) leaves it unchanged. The new
  // tokens' bytes are whatever the slab held before.
  absl::Status Reserve(SequenceId session, int64_t num_tokens);
  // Drops tokens at positions >= num_tokens (rollback of a reservation or of rejected tokens).
  absl::Status Truncate(SequenceId session, int64_t num_tokens) { return tables_.Truncate(session, num_tokens); }
  const BlockTable* Find(SequenceId session) const { return tables_.Find(session); }
  const BlockTableManager& tables() const { return tables_; }

  // Address of one unit of a slab; keys at +0, values at +unit_bytes()/2.
  std::byte* unit(int32_t slab, int layer, int head) const {
    const int32_t chunk = slab / slabs_per_chunk_;
    return chunks_[chunk] + static_cast<size_t>(slab % slabs_per_chunk_) * layout_.slab_bytes() +
           (static_cast<size_t>(layer) * layout_.num_kv_heads + head) * layout_.unit_bytes();
  }
  // Writes the keys and values of tokens [first, first + n) of one (layer, head): k and v hold n
  // rows of head_dim elements. OutOfRange if the session has not reserved those tokens.
  absl::Status WriteTokens(SequenceId session, int layer, int head, int64_t first, int64_t n, const std::byte* k,
                           const std::byte* v);

  const KvLayout& layout() const { return layout_; }
  int32_t capacity_blocks() const { return tables_.allocator().capacity(); }
  int32_t used_blocks() const { return tables_.allocator().num_used(); }
  size_t bytes() const { return static_cast<size_t>(capacity_blocks()) * layout_.slab_bytes(); }
  // The chunks (nullptr where not yet allocated), for registering or filling them elsewhere:
  // stores allocated up front, or without chunks_ahead (a background thread writes entries).
  const std::vector<std::byte*>& chunks() const { return chunks_; }
  int num_allocated_chunks() const;
  // Returns once no chunk is queued or being allocated ahead (tests, benchmarks).
  void AwaitAhead();
  size_t chunk_bytes() const { return static_cast<size_t>(slabs_per_chunk_) * layout_.slab_bytes(); }

 private:
  HostKvStore(const KvLayout& layout, int32_t capacity_blocks, HostAllocator allocator, int32_t slabs_per_chunk);
  // Allocates the listed chunks, which the caller marked kPending (several threads); on failure
  // those that did allocate stay, the others go back to kAbsent.
  absl::Status AllocateChunks(const std::vector<int32_t>& which);
  size_t ChunkBytes(int32_t chunk) const;
  // Queues for the background thread the absent chunks from the next free slab's on (mu_ held).
  void KickAhead();
  void AheadLoop();

  enum ChunkState : uint8_t { kAbsent, kPending, kReady };
  KvLayout layout_;
  HostAllocator allocator_;
  int32_t slabs_per_chunk_;
  // Entries are written under mu_ (by Reserve's allocation or the background thread) and read
  // without it by unit(), only for chunks the owner saw kReady under mu_.
  std::vector<std::byte*> chunks_;
  BlockTableManager tables_;
  // std::mutex rather than absl::Mutex: ThreadSanitizer sees through pthreads.
  mutable std::mutex mu_;
  std::condition_variable changed_;  // any of the fields below changed
  std::vector<ChunkState> state_;    // guarded by mu_, as are the fields below
  std::deque<int32_t> ahead_queue_;
  int32_t ahead_current_ = -1;  // the chunk the background thread is allocating
  bool ahead_failed_ = false;
  bool stop_ = false;
  int chunks_ahead_ = 0;
  std::thread ahead_;  // last: started once the rest is built
};

}  // namespace scout::kvstore
