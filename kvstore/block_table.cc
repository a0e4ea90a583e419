#include "kvstore/block_table.h"

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

absl::Status BlockTableManager::AddSequence(SequenceId id) {
  if (!tables_.try_emplace(id).second) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " already exists"));
  }
  return absl::OkStatus();
}

absl::StatusOr<BlockTable*> BlockTableManager::Get(SequenceId id) {
  auto it = tables_.find(id);
  if (it == tables_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  return &it->second;
}

const BlockTable* BlockTableManager::Find(SequenceId id) const {
  auto it = tables_.find(id);
  return it == tables_.end() ? nullptr : &it->second;
}

absl::StatusOr<int64_t> BlockTableManager::BlocksNeeded(SequenceId id, int64_t num_tokens) const {
  const BlockTable* t = Find(id);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  int64_t need = BlocksFor(num_tokens) - static_cast<int64_t>(t->blocks.size());
  return need > 0 ? need : 0;
}

absl::Status BlockTableManager::Grow(SequenceId id, int64_t num_tokens) {
  absl::StatusOr<BlockTable*> t = Get(id);
  if (!t.ok()) return t.status();
  BlockTable& table = **t;
  if (num_tokens < table.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("Grow of sequence ", id, " to ", num_tokens,
                                                   " tokens would shrink it from ", table.num_tokens));
  }
  int64_t need = BlocksFor(num_tokens) - static_cast<int64_t>(table.blocks.size());
  if (need > 0) {
    absl::Status s = allocator_.AllocateMany(need, &table.blocks);
    if (!s.ok()) {
      return absl::ResourceExhaustedError(absl::StrCat("sequence ", id, " cannot grow to ",
                                                       num_tokens, " tokens: ", s.message()));
    }
  }
  table.num_tokens = num_tokens;
  return absl::OkStatus();
}

absl::Status BlockTableManager::Truncate(SequenceId id, int64_t num_tokens) {
  absl::StatusOr<BlockTable*> t = Get(id);
  if (!t.ok()) return t.status();
  BlockTable& table = **t;
  if (num_tokens < 0 || num_tokens > table.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("cannot truncate sequence ", id, " of ",
                                                   table.num_tokens, " tokens to ", num_tokens));
  }
  while (static_cast<int64_t>(table.blocks.size()) > BlocksFor(num_tokens)) {
    absl::Status s = allocator_.Free(table.blocks.back());
    if (!s.ok()) return s;
    table.blocks.pop_back();
  }
  table.num_tokens = num_tokens;
  return absl::OkStatus();
}

absl::Status BlockTableManager::Release(SequenceId id) {
  auto it = tables_.find(id);
  if (it == tables_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  for (int32_t b : it->second.blocks) {
    absl::Status s = allocator_.Free(b);
    if (!s.ok()) return s;
  }
  tables_.erase(it);
  return absl::OkStatus();
}

}  // namespace scout::kvstore
