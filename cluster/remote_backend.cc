// RemoteBackend: a ModelBackend whose sequences live on the workers of one role (the passes data
// plane, cluster/coordinator.h).
#include <algorithm>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cluster/coordinator.h"
#include "kvstore/block_table.h"

namespace scout::cluster {

RemoteBackend::RemoteBackend(Coordinator* coordinator, v1::Role role, runtime::ModelConfig config,
                             const RemoteBackendOptions& options)
    : coordinator_(coordinator), role_(role), config_(std::move(config)), options_(options) {}

absl::Status RemoteBackend::Health() const {
  for (const Coordinator::Member& m : coordinator_->Members(role_)) {
    if (coordinator_->Serving(m.key)) return absl::OkStatus();
  }
  return absl::UnavailableError(absl::StrCat("no live ", RoleName(role_), " worker"));
}

std::string RemoteBackend::WorkerOf(SequenceId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return "";
  for (const Coordinator::Member& m : coordinator_->Members(role_)) {
    if (m.key == it->second.worker) return m.info.id();
  }
  return "";
}

absl::StatusOr<v1::BackendReply> RemoteBackend::Call(uint64_t worker, v1::BackendRequest request,
                                                      const std::string& what) {
  std::shared_ptr<Channel> ch = coordinator_->ChannelOf(worker);
  if (ch == nullptr) return absl::UnavailableError(absl::StrCat(what, ": the worker is dead"));
  v1::Envelope e;
  *e.mutable_request() = std::move(request);
  absl::StatusOr<v1::BackendReply> reply =
      TakeReply(worker, ch->Call(std::move(e), coordinator_->options().call_timeout, what));
  if (reply.ok()) HandleUnpersisted(worker, *reply);
  return reply;
}

absl::StatusOr<v1::BackendReply> RemoteBackend::TakeReply(uint64_t worker, absl::StatusOr<v1::Envelope> r) {
  if (!r.ok()) {
    coordinator_->MarkDead(worker, std::string(r.status().message()));
    return r.status();
  }
  usage_[worker] = {.used_blocks = r->reply().kv_used_blocks(), .total_blocks = r->reply().kv_total_blocks()};
  return std::move(*r->mutable_reply());
}

void RemoteBackend::HandleUnpersisted(uint64_t worker, const v1::BackendReply& reply) {
  for (int64_t id : reply.unpersisted()) {
    auto it = seqs_.find(id);
    if (it != seqs_.end() && it->second.worker == worker && it->second.home_store != 0) {
      Rehome(id, it->second, FromProto(reply.persist_error()));
    }
  }
}

uint64_t RemoteBackend::PickHome(const Seq& seq, uint64_t exclude) const {
  // KV store nodes whose unit is this model's, through AssignSession's admission rule.
  const std::vector<Coordinator::Member> workers = coordinator_->Members(role_);
  int64_t unit = 0;
  for (const Coordinator::Member& w : workers) {
    if (w.key == seq.worker) unit = w.info.kv_unit_bytes();
  }
  if (unit <= 0) return 0;
  std::vector<KvStoreInfo> stores;
  std::vector<uint64_t> keys;
  for (const Coordinator::Member& s : coordinator_->Members(v1::ROLE_KVSTORE)) {
    if (!s.alive || s.key == exclude || s.info.kv_unit_bytes() != unit) continue;
    stores.push_back({.id = std::to_string(s.key), .capacity_bytes = s.info.capacity_units() * unit,
                      .used_bytes = s.last.units_held() * unit, .alive = true});
    keys.push_back(s.key);
  }
  if (stores.empty()) return 0;
  Placement one{.target_groups = {{GpuSlot{.worker = "w", .gpu = 0}}}};
  const SessionLoad load{.target_group = 0, .active_sessions = 0};
  const int64_t blocks = kvstore::BlocksFor(static_cast<int64_t>(seq.tokens.size()) + kvstore::kBlockSize);
  absl::StatusOr<SessionAssignment> a = AssignSession(one, {&load, 1}, stores, SessionPlace{},
                                                      blocks * config_.num_hidden_layers * config_.num_key_value_heads * unit);
  if (!a.ok()) return 0;
  uint64_t key = 0;
  (void)absl::SimpleAtoi(a->kv_store, &key);
  return key;
}

v1::KvHome RemoteBackend::HomeOf(SequenceId id, const Seq& seq, std::optional<uint32_t> epoch) const {
  v1::KvHome home;
  if (seq.home_store == 0) return home;
  for (const Coordinator::Member& s : coordinator_->Members(v1::ROLE_KVSTORE)) {
    if (s.key == seq.home_store && s.alive) home.set_address(s.info.kvstore_address());
  }
  // Target and draft sequences share the nodes: the role picks the low bit; the epoch the high
  // ones (sequence ids stay below 2^39).
  home.set_store_session((static_cast<uint64_t>(epoch.value_or(seq.epoch)) << 40) |
                         (static_cast<uint64_t>(id) * 2 + (role_ == v1::ROLE_DRAFT ? 1 : 0)));
  return home;
}

absl::Status RemoteBackend::Place(SequenceId id, Seq& seq) {
  // A sequence placed for the first time: no worker ever held its session (ids are not reused).
  const bool fresh = seq.worker == 0 && seq.epoch == 0 && seq.tokens.empty();
  ClusterCounters count;
  if (seq.worker != 0) count.failovers = 1;
  for (int attempt = 0; attempt < options_.max_attempts; ++attempt) {
    // The live worker holding the fewest sequences (the earliest registered on ties).
    uint64_t worker = 0;
    int64_t fewest = 0;
    bool whole = false;
    for (const Coordinator::Member& w : coordinator_->Members(role_)) {
      if (!coordinator_->Serving(w.key)) continue;
      int64_t n = 0;
      for (const auto& [sid, s] : seqs_) n += s.worker == w.key;
      if (worker == 0 || n < fewest) {
        worker = w.key;
        fewest = n;
        whole = w.info.writes_partial_blocks();
      }
    }
    if (worker == 0) return absl::UnavailableError(absl::StrCat("no live ", RoleName(role_), " worker"));
    seq.worker = worker;
    seq.whole_home = whole;
    if (seq.home_store != 0 && !coordinator_->Alive(seq.home_store)) {
      seq.home_store = 0;
      seq.persisted = 0;
    }
    if (seq.home_store == 0) {
      seq.home_store = PickHome(seq, 0);
      seq.persisted = 0;
    }
    v1::BackendRequest req;
    int64_t have = 0;
    if (seq.persisted > 0) {
      v1::AdoptSequence* adopt = req.mutable_adopt();
      adopt->set_seq(id);
      *adopt->mutable_home() = HomeOf(id, seq);
      *adopt->mutable_new_home() = HomeOf(id, seq, seq.epoch + 1);
      adopt->set_num_tokens(seq.persisted);
      have = seq.persisted;
    } else {
      req.mutable_add()->set_seq(id);
      *req.mutable_add()->mutable_home() = HomeOf(id, seq);
      req.mutable_add()->set_clear_home(!fresh);
    }
    absl::StatusOr<v1::BackendReply> r = Call(worker, std::move(req), absl::StrCat("place sequence ", id));
    if (!r.ok()) continue;  // that worker died too: another
    if (absl::Status s = FromProto(r->status()); !s.ok()) {
      if (seq.persisted == 0) return s;
      // The home could not give the KV back: rebuild from the tokens instead.
      std::fprintf(stderr, "scout: sequence %lld: adopting from its home failed (%s); rebuilding from tokens\n",
                   static_cast<long long>(id), s.ToString().c_str());
      ++seq.epoch;  // the adopter may have moved units to the next session: the rebuild writes past it
      seq.persisted = 0;
      seq.home_store = 0;
      seq.worker = 0;
      continue;
    }
    if (have > 0) {
      ++seq.epoch;  // the adopter took the units under the next session
      if (r->has_adopted_tokens()) have = std::min(have, r->adopted_tokens());
      seq.persisted = have;
    }
    count.adopted_tokens += have;
    // Run the tokens the home did not hold again, in chunks, discarding the logits.
    bool lost_worker = false;
    for (int64_t at = have; at < static_cast<int64_t>(seq.tokens.size());) {
      const int64_t n = std::min<int64_t>(options_.replay_chunk, static_cast<int64_t>(seq.tokens.size()) - at);
      v1::BackendRequest f;
      v1::SequenceInput* in = f.mutable_forward()->add_batch();
      in->set_seq(id);
      in->mutable_tokens()->Add(seq.tokens.begin() + at, seq.tokens.begin() + at + n);
      absl::StatusOr<v1::BackendReply> fr = Call(worker, std::move(f), absl::StrCat("rebuild sequence ", id));
      if (!fr.ok()) {
        lost_worker = true;
        break;
      }
      if (absl::Status s = FromProto(fr->status()); !s.ok()) {
        v1::BackendRequest rel;
        rel.mutable_release()->set_seq(id);
        (void)Call(worker, std::move(rel), absl::StrCat("release sequence ", id));
        seq.worker = 0;
        return absl::Status(s.code(), absl::StrCat("rebuilding sequence ", id, " on a new worker: ", s.message()));
      }
      at += n;
      count.replayed_tokens += n;
      // The worker writes the filled blocks after replying; a failure comes with a later reply.
      if (seq.home_store != 0) {
        seq.persisted = seq.whole_home ? at : at / kvstore::kBlockSize * kvstore::kBlockSize;
      }
    }
    if (lost_worker) continue;
    coordinator_->Count(count);
    return absl::OkStatus();
  }
  seq.worker = 0;
  coordinator_->Count(count);
  return absl::UnavailableError(absl::StrCat("sequence ", id, ": every ", RoleName(role_), " worker tried died"));
}

absl::Status RemoteBackend::AddSequence(SequenceId seq) {
  if (seqs_.contains(seq)) return absl::AlreadyExistsError(absl::StrCat("sequence ", seq, " exists"));
  Seq s;
  if (absl::Status st = Place(seq, s); !st.ok()) return st;
  seqs_[seq] = std::move(s);
  return absl::OkStatus();
}

absl::Status RemoteBackend::ReleaseSequence(SequenceId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  if (coordinator_->Alive(it->second.worker)) {
    v1::BackendRequest req;
    req.mutable_release()->set_seq(seq);
    (void)Call(it->second.worker, std::move(req), absl::StrCat("release sequence ", seq));
  } else if (it->second.home_store != 0 && coordinator_->Alive(it->second.home_store)) {
    // Its worker is gone: another worker of the role frees its units on the node.
    for (const Coordinator::Member& w : coordinator_->Members(role_)) {
      if (!coordinator_->Serving(w.key)) continue;
      v1::BackendRequest req;
      *req.mutable_release_home()->mutable_home() = HomeOf(seq, it->second);
      (void)Call(w.key, std::move(req), absl::StrCat("release the home of sequence ", seq));
      break;
    }
  }
  seqs_.erase(it);
  return absl::OkStatus();
}

absl::Status RemoteBackend::TruncateSequence(SequenceId seq, int64_t num_tokens) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  Seq& s = it->second;
  if (num_tokens < 0) return absl::InvalidArgumentError("negative length");
  if (num_tokens >= static_cast<int64_t>(s.tokens.size())) return absl::OkStatus();
  if (coordinator_->Alive(s.worker)) {
    v1::BackendRequest req;
    req.mutable_truncate()->set_seq(seq);
    req.mutable_truncate()->set_num_tokens(num_tokens);
    absl::StatusOr<v1::BackendReply> r = Call(s.worker, std::move(req), absl::StrCat("truncate sequence ", seq));
    if (r.ok()) {
      if (absl::Status st = FromProto(r->status()); !st.ok()) return st;
    }
    // A worker that died meanwhile: the sequence is placed again, from the shorter log, later.
  }
  s.tokens.resize(num_tokens);
  s.persisted = std::min(s.persisted, num_tokens);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RemoteBackend::SequenceLength(SequenceId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return static_cast<int64_t>(it->second.tokens.size());
}

runtime::ModelBackend::KvCacheUsage RemoteBackend::kv_cache_usage() const {
  KvCacheUsage total;
  for (const Coordinator::Member& m : coordinator_->Members(role_)) {
    if (!m.alive) continue;
    auto it = usage_.find(m.key);
    const KvCacheUsage u = it != usage_.end() ? it->second
                                              : KvCacheUsage{.used_blocks = m.last.kv_used_blocks(),
                                                             .total_blocks = m.last.kv_total_blocks()};
    total.used_blocks += u.used_blocks;
    total.total_blocks += u.total_blocks;
  }
  return total;
}

bool RemoteBackend::samples_on_device() const {
  bool any = false;
  for (const Coordinator::Member& m : coordinator_->Members(role_)) {
    if (!m.alive) continue;
    if (!m.info.samples_on_device()) return false;
    any = true;
  }
  return any;
}

void RemoteBackend::Rehome(SequenceId id, Seq& seq, const absl::Status& why) {
  // A node's liveness is its own heartbeats' business: one worker's failed write (the node full,
  // or a passing network error) only moves this sequence elsewhere.
  const uint64_t failed = seq.home_store;
  seq.home_store = PickHome(seq, failed);
  seq.persisted = 0;
  if (seq.home_store != 0) {
    v1::BackendRequest req;
    req.mutable_rehome()->set_seq(id);
    *req.mutable_rehome()->mutable_home() = HomeOf(id, seq);
    absl::StatusOr<v1::BackendReply> r = Call(seq.worker, std::move(req), absl::StrCat("rehome sequence ", id));
    if (r.ok() && FromProto(r->status()).ok()) {
      seq.persisted = seq.HomeHolds();
      coordinator_->Count({.rehomed = 1});
      return;
    }
    seq.home_store = 0;
  }
  // No home: the worker stops writing (an empty home), and the sequence is rebuilt from its
  // tokens if its worker dies.
  std::fprintf(stderr, "scout: sequence %lld has no KV home (%s)\n", static_cast<long long>(id),
               std::string(why.message()).c_str());
  if (coordinator_->Alive(seq.worker)) {
    v1::BackendRequest req;
    req.mutable_rehome()->set_seq(id);
    req.mutable_rehome()->mutable_home();
    (void)Call(seq.worker, std::move(req), absl::StrCat("stop persisting sequence ", id));
  }
}

v1::Forward RemoteBackend::ForwardOf(std::span<const runtime::SequenceInput> batch, const std::vector<size_t>& entries,
                                     std::span<const kernels::SampleRowParams> rows,
                                     const std::vector<int64_t>& entry_rows, const std::vector<int64_t>& row_start,
                                     bool sampled) const {
  v1::Forward f;
  for (size_t i : entries) {
    const runtime::SequenceInput& in = batch[i];
    v1::SequenceInput* p = f.add_batch();
    p->set_seq(in.seq);
    p->mutable_tokens()->Add(in.tokens.begin(), in.tokens.end());
    p->set_all_logits(in.all_logits);
    p->set_want_block_mass(in.block_mass != nullptr);
    p->set_santa_samples(in.santa_samples);
    p->set_santa_seed(in.santa_seed);
    if (in.selection != nullptr) {
      v1::Selection* sel = p->mutable_selection();
      sel->set_num_layers(in.selection->num_layers);
      sel->set_num_kv_heads(in.selection->num_kv_heads);
      sel->mutable_indptr()->Add(in.selection->indptr.begin(), in.selection->indptr.end());
      sel->mutable_blocks()->Add(in.selection->blocks.begin(), in.selection->blocks.end());
    }
    if (!sampled) continue;
    for (int64_t r = 0; r < entry_rows[i]; ++r) {
      const kernels::SampleRowParams& sp = rows[row_start[i] + r];
      v1::SampleRow* row = f.add_rows();
      row->set_temperature(sp.temperature);
      row->set_top_k(sp.top_k);
      row->set_top_p(sp.top_p);
      row->set_seed(sp.seed);
    }
  }
  return f;
}

absl::Status RemoteBackend::TakeRows(std::span<const runtime::SequenceInput> batch,
                                     const std::vector<const v1::BackendReply*>& replies,
                                     const std::vector<std::vector<size_t>>& entries,
                                     const std::vector<int64_t>& entry_rows, const std::vector<int64_t>& row_start,
                                     int64_t total_rows, std::vector<float>* logits, std::vector<int32_t>* tokens) {
  const bool sampled = tokens != nullptr;
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  if (sampled) {
    tokens->assign(static_cast<size_t>(total_rows), 0);
  } else {
    logits->assign(static_cast<size_t>(total_rows) * vocab, 0.0f);
  }
  for (size_t g = 0; g < replies.size(); ++g) {
    const v1::BackendReply& rep = *replies[g];
    int64_t at = 0;
    for (size_t j = 0; j < entries[g].size(); ++j) {
      const size_t i = entries[g][j];
      const int64_t n = entry_rows[i];
      if (sampled) {
        if (rep.tokens_size() < at + n) return absl::DataLossError("a worker's reply is short of sampled rows");
        std::copy(rep.tokens().begin() + at, rep.tokens().begin() + at + n, tokens->begin() + row_start[i]);
      } else {
        if (rep.logits().size() < (at + n) * vocab * sizeof(float)) {
          return absl::DataLossError("a worker's reply is short of logits");
        }
        std::memcpy(logits->data() + row_start[i] * vocab, rep.logits().data() + at * vocab * sizeof(float),
                    n * vocab * sizeof(float));
      }
      at += n;
      if (batch[i].block_mass != nullptr && static_cast<int>(j) < rep.block_mass_size()) {
        const std::string& m = rep.block_mass(static_cast<int>(j));
        batch[i].block_mass->resize(m.size() / sizeof(float));
        std::memcpy(batch[i].block_mass->data(), m.data(), m.size());
      }
      Seq& s = seqs_[batch[i].seq];
      s.tokens.insert(s.tokens.end(), batch[i].tokens.begin(), batch[i].tokens.end());
    }
    // Workers write whole blocks after replying: counted as home now; a write that failed
    // (this pass's or an earlier one's) is listed in a later reply, and the sequence gets a
    // new home then. A worker that dies before writing leaves its adopter a Get that fails,
    // and the sequence is rebuilt from its tokens instead.
    for (size_t i : entries[g]) {
      Seq& s = seqs_[batch[i].seq];
      s.persisted = s.HomeHolds();
    }
  }
  return absl::OkStatus();
}

absl::Status RemoteBackend::RunPass(std::span<const runtime::SequenceInput> batch,
                                    std::span<const kernels::SampleRowParams> rows, std::vector<float>* logits,
                                    std::vector<int32_t>* tokens) {
  const bool sampled = tokens != nullptr;
  // Rows of each batch entry, and where they start in the reply's row order.
  std::vector<int64_t> entry_rows(batch.size()), row_start(batch.size());
  int64_t total_rows = 0;
  for (size_t i = 0; i < batch.size(); ++i) {
    if (batch[i].quest_budget != nullptr) {
      return absl::UnimplementedError("Quest-style selection in the pass is not supported over the cluster");
    }
    if (!seqs_.contains(batch[i].seq)) return absl::NotFoundError(absl::StrCat("unknown sequence ", batch[i].seq));
    entry_rows[i] = batch[i].all_logits ? static_cast<int64_t>(batch[i].tokens.size()) : 1;
    row_start[i] = total_rows;
    total_rows += entry_rows[i];
  }
  if (sampled && static_cast<int64_t>(rows.size()) != total_rows) {
    return absl::InvalidArgumentError(absl::StrCat(rows.size(), " sample rows for a pass of ", total_rows, " rows"));
  }
  for (int attempt = 0; attempt < options_.max_attempts; ++attempt) {
    if (attempt > 0) coordinator_->Count({.retried_passes = 1});
    // Every sequence on a live worker, and its KV home alive (a dead one is replaced before the
    // worker could die too).
    for (const runtime::SequenceInput& in : batch) {
      Seq& s = seqs_[in.seq];
      if (!coordinator_->Alive(s.worker)) {
        if (absl::Status st = Place(in.seq, s); !st.ok()) {
          // This sequence's own failure: a server can end its request and run the others.
          st.SetPayload(runtime::kFailedSequencePayload, absl::Cord(absl::StrCat(in.seq)));
          return st;
        }
      } else if (s.home_store != 0 && !coordinator_->Alive(s.home_store)) {
        Rehome(in.seq, s, absl::UnavailableError("its KV store node is dead"));
      }
    }
    // One request per worker, in parallel.
    absl::flat_hash_map<uint64_t, std::vector<size_t>> groups;
    std::vector<uint64_t> order;
    for (size_t i = 0; i < batch.size(); ++i) {
      const uint64_t w = seqs_[batch[i].seq].worker;
      if (!groups.contains(w)) order.push_back(w);
      groups[w].push_back(i);
    }
    std::vector<std::shared_ptr<PendingCall>> calls;
    for (uint64_t w : order) {
      v1::Envelope e;
      *e.mutable_request()->mutable_forward() = ForwardOf(batch, groups[w], rows, entry_rows, row_start, sampled);
      std::shared_ptr<Channel> ch = coordinator_->ChannelOf(w);
      if (ch == nullptr) {
        calls.push_back(nullptr);
        continue;
      }
      calls.push_back(ch->CallAsync(std::move(e), coordinator_->options().call_timeout,
                                    absl::StrCat(RoleName(role_), " pass")));
    }
    std::vector<absl::StatusOr<v1::BackendReply>> replies;
    bool worker_died = false;
    absl::Status model_error;
    std::vector<size_t> answered;
    for (size_t g = 0; g < order.size(); ++g) {
      replies.push_back(TakeReply(order[g], calls[g] ? calls[g]->Wait()
                                                      : absl::StatusOr<v1::Envelope>(
                                                            absl::UnavailableError("the worker is dead"))));
      if (!replies.back().ok()) {
        worker_died = true;
        continue;
      }
      answered.push_back(g);
      if (absl::Status s = FromProto(replies.back()->status()); !s.ok() && model_error.ok()) model_error = s;
    }
    // Writes of earlier passes that failed come back with any reply: their sequences move home
    // (after this pass's tokens are in the logs, below, on success).
    auto rehome_failed_writes = [&] {
      for (size_t g : answered) HandleUnpersisted(order[g], *replies[g]);
    };
    if (worker_died || !model_error.ok()) {
      rehome_failed_writes();
      // All or nothing: undo the pass where it ran.
      for (size_t g = 0; g < order.size(); ++g) {
        if (!replies[g].ok() || !FromProto(replies[g]->status()).ok()) continue;
        for (size_t i : groups[order[g]]) {
          v1::BackendRequest t;
          t.mutable_truncate()->set_seq(batch[i].seq);
          t.mutable_truncate()->set_num_tokens(static_cast<int64_t>(seqs_[batch[i].seq].tokens.size()));
          (void)Call(order[g], std::move(t), "undo a pass");
        }
      }
      if (!worker_died) {
        // A sequence whose KV was lost with its node (remote tier: units not fetched yet) is
        // rebuilt from its tokens, and the pass runs again.
        int64_t lost = 0;
        if (absl::optional<absl::Cord> p = model_error.GetPayload(runtime::kFailedSequencePayload);
            p.has_value() && absl::SimpleAtoi(std::string(*p), &lost) && seqs_.contains(lost) &&
            (absl::IsUnavailable(model_error) || absl::IsNotFound(model_error) || absl::IsDeadlineExceeded(model_error))) {
          Seq& s = seqs_[lost];
          std::fprintf(stderr, "scout: sequence %lld: %s; rebuilding it from its tokens\n", static_cast<long long>(lost),
                       std::string(model_error.message()).c_str());
          v1::BackendRequest rel;
          rel.mutable_release()->set_seq(lost);
          (void)Call(s.worker, std::move(rel), absl::StrCat("release sequence ", lost));
          s.worker = 0;
          s.persisted = 0;
          s.home_store = 0;
          ++s.epoch;
          continue;
        }
        return model_error;
      }
      continue;
    }
    // The pass ran everywhere: rows back in batch order.
    std::vector<const v1::BackendReply*> answers;
    std::vector<std::vector<size_t>> entries;
    for (size_t g = 0; g < order.size(); ++g) {
      answers.push_back(&*replies[g]);
      entries.push_back(groups[order[g]]);
    }
    if (absl::Status st = TakeRows(batch, answers, entries, entry_rows, row_start, total_rows, logits, tokens); !st.ok()) {
      return st;
    }
    rehome_failed_writes();
    return absl::OkStatus();
  }
  return absl::UnavailableError(absl::StrCat("no ", RoleName(role_), " worker could run the pass: ",
                                             options_.max_attempts, " tries, each lost a worker"));
}

absl::Status RemoteBackend::Forward(std::span<const runtime::SequenceInput> batch, std::vector<float>* logits) {
  return TimedPass(batch, {}, logits, nullptr);
}

absl::Status RemoteBackend::ForwardSampled(std::span<const runtime::SequenceInput> batch,
                                           std::span<const kernels::SampleRowParams> rows,
                                           std::vector<int32_t>* tokens) {
  return TimedPass(batch, rows, nullptr, tokens);
}

absl::Status RemoteBackend::TimedPass(std::span<const runtime::SequenceInput> batch,
                                      std::span<const kernels::SampleRowParams> rows, std::vector<float>* logits,
                                      std::vector<int32_t>* tokens) {
  const absl::Time t0 = absl::Now();
  absl::Status s = RunPass(batch, rows, logits, tokens);
  const double secs = absl::ToDoubleSeconds(absl::Now() - t0);
  ClusterCounters d;
  if (role_ == v1::ROLE_DRAFT) {
    d.draft_passes = 1;
    d.draft_pass_seconds = secs;
  } else {
    d.target_passes = 1;
    d.target_pass_seconds = secs;
  }
  coordinator_->Count(d);
  return s;
}

}  // namespace scout::cluster
