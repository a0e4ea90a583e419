#include "kvstore/remote_tier.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

std::vector<bool>& RemoteTier::Present(SequenceId session, int layer, int head) {
  const KvLayout& l = local_->layout();
  std::vector<std::vector<bool>>& lists = present_[session];
  if (lists.empty()) lists.resize(static_cast<size_t>(l.num_layers) * l.num_kv_heads);
  return lists[static_cast<size_t>(layer) * l.num_kv_heads + head];
}

absl::StatusOr<int64_t> RemoteTier::Fetch(const Selection& sel, SequenceId session) {
  const KvLayout& l = local_->layout();
  const BlockTable* table = local_->Find(session);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session, " in the local store"));
  if (sel.num_layers != l.num_layers || sel.num_kv_heads != l.num_kv_heads ||
      sel.indptr.size() != static_cast<size_t>(l.num_layers) * l.num_kv_heads + 1) {
    return absl::InvalidArgumentError("selection does not match the local store's layout");
  }
  const int32_t nblocks = static_cast<int32_t>(table->blocks.size());
  std::vector<UnitKey> missing;
  for (int layer = 0; layer < l.num_layers; ++layer) {
    for (int head = 0; head < l.num_kv_heads; ++head) {
      const int list = layer * l.num_kv_heads + head;
      std::vector<bool>& present = Present(session, layer, head);
      for (int32_t i = sel.indptr[list]; i < sel.indptr[list + 1]; ++i) {
        const int32_t b = sel.blocks[i];
        if (b < 0 || b >= nblocks) {
          return absl::InvalidArgumentError(absl::StrCat("selection names block ", b, " of session ", session,
                                                         ", which has ", nblocks, " in the local store"));
        }
        if (static_cast<size_t>(b) < present.size() && present[b]) continue;
        missing.push_back({session, layer, head, b});
      }
    }
  }
  if (missing.empty()) return 0;
  const size_t unit = l.unit_bytes();
  staging_.resize(missing.size() * unit);
  if (absl::Status s = remote_->Get(missing, staging_.data()); !s.ok()) return s;
  for (size_t i = 0; i < missing.size(); ++i) {
    const UnitKey& k = missing[i];
    std::memcpy(local_->unit(table->blocks[k.block], k.layer, k.head), staging_.data() + i * unit, unit);
    std::vector<bool>& present = Present(session, k.layer, k.head);
    if (present.size() <= static_cast<size_t>(k.block)) present.resize(k.block + 1, false);
    present[k.block] = true;
  }
  units_fetched_ += static_cast<int64_t>(missing.size());
  return static_cast<int64_t>(missing.size());
}

absl::Status RemoteTier::WriteBack(SequenceId session, int32_t first_block, int32_t num_blocks) {
  const KvLayout& l = local_->layout();
  const BlockTable* table = local_->Find(session);
  if (table == nullptr) return absl::NotFoundError(absl::StrCat("unknown session ", session, " in the local store"));
  if (first_block < 0 || num_blocks < 0 || first_block + num_blocks > static_cast<int32_t>(table->blocks.size())) {
    return absl::InvalidArgumentError(absl::StrCat("blocks [", first_block, ", ", first_block + num_blocks,
                                                   ") of a session of ", table->blocks.size()));
  }
  const size_t unit = l.unit_bytes();
  std::vector<UnitKey> keys;
  staging_.resize(static_cast<size_t>(num_blocks) * l.num_layers * l.num_kv_heads * unit);
  for (int layer = 0; layer < l.num_layers; ++layer) {
    for (int head = 0; head < l.num_kv_heads; ++head) {
      for (int32_t b = first_block; b < first_block + num_blocks; ++b) {
        std::memcpy(staging_.data() + keys.size() * unit, local_->unit(table->blocks[b], layer, head), unit);
        keys.push_back({session, layer, head, b});
      }
    }
  }
  if (keys.empty()) return absl::OkStatus();
  if (absl::Status s = remote_->Put(keys, staging_.data()); !s.ok()) return s;
  for (const UnitKey& k : keys) {
    std::vector<bool>& present = Present(session, k.layer, k.head);
    if (present.size() <= static_cast<size_t>(k.block)) present.resize(k.block + 1, false);
    present[k.block] = true;
  }
  return absl::OkStatus();
}

}  // namespace scout::kvstore
