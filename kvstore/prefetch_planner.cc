#include "kvstore/prefetch_planner.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

absl::StatusOr<PrefetchPlan> PlanPrefetch(const Selection& sel, SequenceId session, const HostKvStore& store,
                                          BlockCache& cache, uint64_t step) {
  const KvLayout& layout = store.layout();
  if (sel.num_layers != layout.num_layers || sel.num_kv_heads != layout.num_kv_heads ||
      sel.indptr.size() != static_cast<size_t>(sel.num_layers) * sel.num_kv_heads + 1 ||
      sel.indptr.back() != static_cast<int32_t>(sel.blocks.size())) {
    return absl::InvalidArgumentError(absl::StrCat("selection of ", sel.num_layers, " x ", sel.num_kv_heads,
                                                   " lists does not match the store's ", layout.num_layers, " x ",
                                                   layout.num_kv_heads));
  }
  const BlockTable* table = store.Find(session);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session));
  const int32_t nblocks = static_cast<int32_t>(table->blocks.size());
  for (int list = 0; list < sel.num_layers * sel.num_kv_heads; ++list) {
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
  plan.slots.resize(sel.blocks.size());
  plan.layer_begin.assign(1, 0);
  std::vector<UnitKey> claimed;  // misses: their slots hold nothing valid until the transfer
  for (int layer = 0; layer < sel.num_layers; ++layer) {
    for (int head = 0; head < sel.num_kv_heads; ++head) {
      const int list = layer * sel.num_kv_heads + head;
      for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
        const UnitKey key{session, layer, head, sel.blocks[i]};
        absl::StatusOr<std::pair<int32_t, bool>> got = cache.Acquire(key, step);
        if (!got.ok()) {
          cache.ReleaseStep(step);
          for (const UnitKey& k : claimed) cache.Invalidate(k).IgnoreError();
          return got.status();
        }
        plan.slots[i] = got->first;
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
  return plan;
}

void ExecutePrefetchOnHost(const PrefetchPlan& plan, size_t unit_bytes, std::byte* pool, int layer_first,
                           int layer_last) {
  for (int32_t i = plan.layer_begin[layer_first]; i < plan.layer_begin[layer_last]; ++i) {
    const Transfer& t = plan.transfers[i];
    std::memcpy(pool + static_cast<size_t>(t.slot) * unit_bytes, t.src, unit_bytes);
  }
}

}  // namespace scout::kvstore
