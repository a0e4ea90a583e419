#include "kvstore/prefetch_planner.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

absl::StatusOr<PrefetchPlan> PlanPrefetch(const Selection& sel, SequenceId session, const HostKvStore& store,
                                          BlockCache& cache, uint64_t step) {
  return PlanPrefetchLayers(sel, session, store, cache, step, 0, sel.num_layers);
}

absl::StatusOr<PrefetchPlan> PlanPrefetchLayers(const Selection& sel, SequenceId session, const HostKvStore& store,
                                                BlockCache& cache, uint64_t step, int layer_first, int layer_last) {
  if (sel.num_seqs != 1) {
    return absl::InvalidArgumentError(absl::StrCat("a selection of ", sel.num_seqs, " sequences for one session"));
  }
  return PlanPrefetchLayers(sel, 0, session, store, cache, step, layer_first, layer_last);
}

absl::StatusOr<PrefetchPlan> PlanPrefetchLayers(const Selection& sel, int seq, SequenceId session,
                                                const HostKvStore& store, BlockCache& cache, uint64_t step,
                                                int layer_first, int layer_last) {
  const KvLayout& layout = store.layout();
  if (sel.num_layers != layout.num_layers || sel.num_kv_heads != layout.num_kv_heads || sel.num_seqs < 1 ||
      sel.indptr.size() != static_cast<size_t>(sel.num_lists()) + 1 || sel.indptr.front() != 0 ||
      sel.indptr.back() != static_cast<int32_t>(sel.blocks.size()) ||
      !std::is_sorted(sel.indptr.begin(), sel.indptr.end())) {
    return absl::InvalidArgumentError(absl::StrCat("selection of ", sel.num_seqs, " x ", sel.num_layers, " x ",
                                                   sel.num_kv_heads, " lists does not match the store's ",
                                                   layout.num_layers, " x ", layout.num_kv_heads));
  }
  if (seq < 0 || seq >= sel.num_seqs) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", seq, " of a selection of ", sel.num_seqs));
  }
  if (layer_first < 0 || layer_last > sel.num_layers || layer_first > layer_last) {
    return absl::InvalidArgumentError(absl::StrCat("layers [", layer_first, ", ", layer_last, ") of ", sel.num_layers));
  }
  const BlockTable* table = store.Find(session);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  const int32_t nblocks = static_cast<int32_t>(table->blocks.size());
  const int list_first = sel.List(seq, layer_first, 0), list_last = sel.List(seq, layer_last, 0);
  for (int list = list_first; list < list_last; ++list) {
    for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
      const int32_t b = sel.blocks[i];
      if (b < 0 || b >= nblocks) {
        return absl::InvalidArgumentError(absl::StrCat("selection names block ", b, " of session ", session,
                                                       " which has ", nblocks));
      }
      if (i > sel.indptr[list] && b <= sel.blocks[i - 1]) {
        return absl::InvalidArgumentError(absl::StrCat("selection list ", list, " is not strictly ascending at ", b));
      }
    }
  }
  PrefetchPlan plan;
  const int32_t first_entry = sel.indptr[list_first];
  plan.slots.resize(sel.indptr[list_last] - first_entry);
  plan.layer_begin.assign(layer_first + 1, 0);
  std::vector<UnitKey> claimed;  // misses: their slots hold nothing valid until the transfer
  for (int layer = layer_first; layer < layer_last; ++layer) {
    for (int head = 0; head < sel.num_kv_heads; ++head) {
      const int list = sel.List(seq, layer, head);
      for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
        const UnitKey key{session, layer, head, sel.blocks[i]};
        absl::StatusOr<std::pair<int32_t, bool>> got = cache.Acquire(key, step);
        if (!got.ok()) {
          cache.Unpin(step, static_cast<int64_t>(plan.hits + plan.misses));  // this plan's pins only
          for (const UnitKey& k : claimed) cache.Invalidate(k).IgnoreError();
          return got.status();
        }
        plan.slots[i - first_entry] = got->first;
        if (got->second) {
          ++plan.hits;
        } else {
          ++plan.misses;
          claimed.push_back(key);
          plan.transfers.push_back({store.unit(table->blocks[key.block], layer, head), got->first});
        }
      }
    }
    plan.layer_begin.push_back(static_cast<int32_t>(plan.transfers.size()));
  }
  plan.layer_begin.resize(sel.num_layers + 1, static_cast<int32_t>(plan.transfers.size()));
  return plan;
}

void ExecutePrefetchOnHost(const PrefetchPlan& plan, size_t unit_bytes, std::byte* pool, int layer_first,
                           int layer_last) {
  for (int32_t i = plan.layer_begin[layer_first]; i < plan.layer_begin[layer_last]; ++i) {
    const Transfer& t = plan.transfers[i];
    std::memcpy(pool + static_cast<size_t>(t.slot) * unit_bytes, t.src, unit_bytes);
  }
}

absl::StatusOr<AppendPlan> PlanAppend(SequenceId session, int64_t num_tokens, HostKvStore& store, BlockCache& cache,
                                      uint64_t step) {
  const BlockTable* table = store.Find(session);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  if (num_tokens <= 0) return absl::InvalidArgumentError(absl::StrCat("append of ", num_tokens, " tokens"));
  const int64_t first_token = table->num_tokens;
  if (absl::Status s = store.Reserve(session, first_token + num_tokens); !s.ok()) return s;
  absl::StatusOr<AppendPlan> plan =
      PlanAppendLayers(session, first_token, num_tokens, store, cache, step, 0, store.layout().num_layers);
  if (!plan.ok()) {
    // Give back what the reservation took.
    if (absl::Status s = store.Truncate(session, first_token); !s.ok()) return s;
  }
  return plan;
}

absl::StatusOr<AppendPlan> PlanAppendLayers(SequenceId session, int64_t first_token, int64_t num_tokens,
                                            const HostKvStore& store, BlockCache& cache, uint64_t step,
                                            int layer_first, int layer_last) {
  const BlockTable* table = store.Find(session);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  if (num_tokens <= 0 || first_token < 0 || first_token + num_tokens > table->num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("append of tokens [", first_token, ", ", first_token + num_tokens,
                                                   ") to a session of ", table->num_tokens, " reserved"));
  }
  const KvLayout& layout = store.layout();
  if (layer_first < 0 || layer_last > layout.num_layers || layer_first > layer_last) {
    return absl::InvalidArgumentError(absl::StrCat("layers [", layer_first, ", ", layer_last, ") of ", layout.num_layers));
  }
  AppendPlan plan;
  plan.first_token = first_token;
  plan.num_tokens = num_tokens;
  plan.first_block = static_cast<int32_t>(plan.first_token / kBlockSize);
  plan.num_blocks = static_cast<int32_t>(BlocksFor(plan.first_token + num_tokens)) - plan.first_block;
  // The first block holds earlier tokens when the session did not end on a block boundary.
  const bool partial_first = plan.first_token % kBlockSize != 0;
  std::vector<UnitKey> claimed;
  for (int layer = layer_first; layer < layer_last; ++layer) {
    for (int head = 0; head < layout.num_kv_heads; ++head) {
      for (int32_t b = plan.first_block; b < plan.first_block + plan.num_blocks; ++b) {
        const UnitKey key{session, layer, head, b};
        absl::StatusOr<std::pair<int32_t, bool>> got = cache.Acquire(key, step);
        if (!got.ok()) {
          cache.Unpin(step, static_cast<int64_t>(plan.slots.size()));  // this plan's pins only
          for (const UnitKey& k : claimed) cache.Invalidate(k).IgnoreError();
          return got.status();
        }
        const std::byte* host = store.unit(table->blocks[b], layer, head);
        plan.slots.push_back(got->first);
        if (!got->second) {
          claimed.push_back(key);
          if (b == plan.first_block && partial_first) plan.fetch.push_back({host, got->first});
        }
        plan.flush.push_back({host, got->first});
      }
    }
  }
  return plan;
}

void ExecuteFetchOnHost(const AppendPlan& plan, size_t unit_bytes, std::byte* pool) {
  for (const Transfer& t : plan.fetch) std::memcpy(pool + static_cast<size_t>(t.slot) * unit_bytes, t.src, unit_bytes);
}

void ExecuteFlushOnHost(const AppendPlan& plan, size_t unit_bytes, const std::byte* pool) {
  for (const Transfer& t : plan.flush) {
    std::memcpy(const_cast<std::byte*>(t.src), pool + static_cast<size_t>(t.slot) * unit_bytes, unit_bytes);
  }
}

}  // namespace scout::kvstore
