#include "cluster/worker.h"

#include <algorithm>
#include <cstring>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cluster/channel.h"
#ifdef SCOUT_HAVE_UCX
#include "kvstore/remote_store.h"
#endif

namespace scout::cluster {

std::string ModelFingerprint(const runtime::ModelConfig& c) {
  return absl::StrCat(c.architecture, " vocab=", c.vocab_size, " hidden=", c.hidden_size, " inter=",
                      c.intermediate_size, " layers=", c.num_hidden_layers, " heads=", c.num_attention_heads, "/",
                      c.num_key_value_heads, "x", c.head_dim, " ctx=", c.max_position_embeddings, " window=",
                      c.sliding_window);
}

namespace {

void PutFloats(const std::vector<float>& v, std::string* out) {
  out->assign(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// Every (layer, KV head) unit of blocks [first, first + n) of a store session, in the order
// ModelBackend::ExportKv writes them.
[[maybe_unused]] std::vector<kvstore::UnitKey> UnitKeys(const runtime::ModelConfig& c, uint64_t session, int64_t first,
                                                        int64_t n) {
  std::vector<kvstore::UnitKey> keys;
  keys.reserve(static_cast<size_t>(n * c.num_hidden_layers * c.num_key_value_heads));
  for (int64_t b = first; b < first + n; ++b) {
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      for (int h = 0; h < c.num_key_value_heads; ++h) {
        keys.push_back({.session = static_cast<kvstore::SequenceId>(session), .layer = l, .head = h,
                        .block = static_cast<int32_t>(b)});
      }
    }
  }
  return keys;
}

// Remote tier: a sequence's length on its home, in a unit of its own beside the KV units
// (int64 at its start), written in the same request as the blocks so the two always agree.
[[maybe_unused]] kvstore::UnitKey LengthKey(uint64_t session) {
  return {.session = static_cast<kvstore::SequenceId>(session), .layer = -1, .head = 0, .block = 0};
}

[[maybe_unused]] absl::StatusOr<std::pair<std::string, int>> SplitAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV store address \"", address, "\" is not host:port"));
  }
  return std::make_pair(address.substr(0, colon), port);
}

}  // namespace

WorkerService::WorkerService(std::unique_ptr<runtime::ModelBackend> model, const WorkerOptions& options)
    : model_(std::move(model)), options_(options) {}

WorkerService::~WorkerService() = default;

v1::Register WorkerService::Describe() const {
  v1::Register r;
  r.set_model_fingerprint(ModelFingerprint(model_->config()));
  r.set_samples_on_device(model_->samples_on_device());
#ifdef SCOUT_HAVE_UCX
  r.set_kv_unit_bytes(static_cast<int64_t>(model_->kv_unit_bytes()));
  r.set_writes_partial_blocks(options_.remote_tier && model_->kv_unit_bytes() > 0);
#endif
  return r;
}

v1::Heartbeat WorkerService::Heartbeat() const {
  v1::Heartbeat h;
  const runtime::ModelBackend::KvCacheUsage u = model_->kv_cache_usage();
  h.set_kv_used_blocks(u.used_blocks);
  h.set_kv_total_blocks(u.total_blocks);
  h.set_kv_bytes_written(kv_bytes_written_);
  h.set_kv_bytes_read(kv_bytes_read_);
  h.set_kv_transfer_seconds(kv_seconds_);
  return h;
}

void WorkerService::Reset() {
  for (const auto& [seq, home] : homes_) (void)model_->ReleaseSequence(seq);
  homes_.clear();
  lazy_.clear();
  pending_.clear();
  unpersisted_.clear();
}

absl::StatusOr<kvstore::KvStoreClient*> WorkerService::Client(const std::string& address) {
#ifdef SCOUT_HAVE_UCX
  auto it = clients_.find(address);
  if (it != clients_.end()) return it->second.get();
  absl::StatusOr<std::pair<std::string, int>> hp = SplitAddress(address);
  if (!hp.ok()) return hp.status();
  absl::StatusOr<std::unique_ptr<kvstore::KvStoreClient>> c =
      kvstore::KvStoreClient::Connect(hp->first, hp->second, model_->kv_unit_bytes(), options_.kv_timeout);
  if (!c.ok()) return c.status();
  return (clients_[address] = std::move(*c)).get();
#else
  return absl::UnavailableError("this scout was built without UCX: KV homes are not reachable");
#endif
}

void WorkerService::DropClient(const std::string& address) { clients_.erase(address); }

void WorkerService::ReleaseHome(const Home& home) {
#ifdef SCOUT_HAVE_UCX
  if (home.address.empty()) return;
  // Best effort: a node that is gone has forgotten the units anyway.
  if (absl::StatusOr<kvstore::KvStoreClient*> c = Client(home.address); c.ok()) {
    if (!(*c)->Release(static_cast<kvstore::SequenceId>(home.store_session)).ok()) DropClient(home.address);
  }
#endif
}

absl::Status WorkerService::Persist(int64_t seq, const Home& home, int64_t first_block, int64_t num_blocks,
                                    int64_t length, int first_row) {
#ifdef SCOUT_HAVE_UCX
  num_blocks = std::max<int64_t>(num_blocks, 0);
  if (home.address.empty() || (num_blocks == 0 && length < 0)) return absl::OkStatus();
  std::vector<kvstore::UnitKey> keys = UnitKeys(model_->config(), home.store_session, first_block, num_blocks);
  const size_t unit = model_->kv_unit_bytes();
  staging_.resize((keys.size() + (length >= 0 ? 1 : 0)) * unit);
  if (num_blocks > 0) {
    if (absl::Status s = model_->ExportKv(seq, first_block, num_blocks, staging_.data()); !s.ok()) return s;
  }
  absl::StatusOr<kvstore::KvStoreClient*> client = Client(home.address);
  if (!client.ok()) return client.status();
  auto failed = [&](absl::Status s) {
    if (absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s)) DropClient(home.address);
    return s;
  };
  const absl::Time t0 = absl::Now();
  size_t skip = 0;  // units of the first block sent as patches instead
  if (first_row > 0 && num_blocks > 0) {
    // The home holds the first block's rows before first_row: only the rows this pass added go,
    // keys and values (a unit is 16 key rows, then 16 value rows).
    const size_t per_block = static_cast<size_t>(model_->config().num_hidden_layers * model_->config().num_key_value_heads);
    const size_t row = unit / (2 * kvstore::kBlockSize);
    const int64_t end_row = num_blocks > 1 || length < 0 ? kvstore::kBlockSize
                                                         : std::min<int64_t>(kvstore::kBlockSize, length - first_block * kvstore::kBlockSize);
    const size_t rows = static_cast<size_t>(std::max<int64_t>(end_row - first_row, 0));
    std::vector<kvstore::UnitPatch> patches;
    std::vector<std::byte> bytes;
    bytes.reserve(per_block * 2 * rows * row);
    for (size_t u = 0; u < per_block && rows > 0; ++u) {
      for (size_t half : {size_t{0}, size_t{kvstore::kBlockSize}}) {
        const size_t offset = (half + static_cast<size_t>(first_row)) * row;
        patches.push_back({.key = keys[u], .offset = static_cast<uint32_t>(offset), .length = static_cast<uint32_t>(rows * row)});
        const std::byte* from = staging_.data() + u * unit + offset;
        bytes.insert(bytes.end(), from, from + rows * row);
      }
    }
    if (!patches.empty()) {
      if (absl::Status s = (*client)->Patch(patches, bytes.data()); !s.ok()) return failed(s);
      kv_bytes_written_ += static_cast<int64_t>(bytes.size());
    }
    skip = per_block;
  }
  if (length >= 0) {
    std::byte* record = staging_.data() + keys.size() * unit;
    std::memset(record, 0, unit);
    std::memcpy(record, &length, sizeof(length));
    keys.push_back(LengthKey(home.store_session));
  }
  // The rest, and the length record last, in one request after the patches.
  const std::span<const kvstore::UnitKey> rest = std::span<const kvstore::UnitKey>(keys).subspan(skip);
  absl::Status s = rest.empty() ? absl::OkStatus() : (*client)->Put(rest, staging_.data() + skip * unit);
  kv_seconds_ += absl::ToDoubleSeconds(absl::Now() - t0);
  if (!s.ok()) return failed(s);
  kv_bytes_written_ += static_cast<int64_t>(rest.size() * unit);
  return absl::OkStatus();
#else
  return absl::UnavailableError("this scout was built without UCX: KV homes are not reachable");
#endif
}

absl::Status WorkerService::FetchUnits(int64_t seq, Lazy& lazy, const std::vector<runtime::KvUnitRef>& want) {
#ifdef SCOUT_HAVE_UCX
  if (want.empty()) return absl::OkStatus();
  const Home& h = lazy.source;
  std::vector<kvstore::UnitKey> keys;
  keys.reserve(want.size());
  for (const runtime::KvUnitRef& u : want) {
    keys.push_back({.session = static_cast<kvstore::SequenceId>(h.store_session), .layer = u.layer, .head = u.head,
                    .block = u.block});
  }
  absl::StatusOr<kvstore::KvStoreClient*> client = Client(h.address);
  absl::Status got = client.status();
  const size_t unit = model_->kv_unit_bytes();
  staging_.resize(keys.size() * unit);
  if (got.ok()) {
    const absl::Time t0 = absl::Now();
    got = (*client)->Get(keys, staging_.data());
    kv_seconds_ += absl::ToDoubleSeconds(absl::Now() - t0);
    if (absl::IsUnavailable(got) || absl::IsDeadlineExceeded(got)) DropClient(h.address);
  }
  if (!got.ok()) {
    return absl::Status(got.code(), absl::StrCat("sequence ", seq, ": fetching ", want.size(), " units of its KV from ",
                                                 h.address, ": ", got.message()));
  }
  kv_bytes_read_ += static_cast<int64_t>(staging_.size());
  if (absl::Status s = model_->WriteKvUnits(seq, want, staging_.data()); !s.ok()) return s;
  const int heads = static_cast<int>(model_->config().num_key_value_heads);
  for (const runtime::KvUnitRef& u : want) {
    std::vector<bool>::reference here = lazy.here[static_cast<size_t>(u.layer * heads + u.head)][u.block];
    if (!here) --lazy.missing;
    here = true;
  }
  return absl::OkStatus();
#else
  return absl::UnavailableError("this scout was built without UCX: KV homes are not reachable");
#endif
}

absl::Status WorkerService::FetchForPass(const runtime::SequenceInput& in, int64_t length) {
  auto it = lazy_.find(in.seq);
  if (it == lazy_.end()) return absl::OkStatus();
  Lazy& lazy = it->second;
  const runtime::ModelConfig& c = model_->config();
  const int layers = static_cast<int>(c.num_hidden_layers), heads = static_cast<int>(c.num_key_value_heads);
  // The block the new tokens go into, when it already holds some.
  const int64_t tail = length % kvstore::kBlockSize != 0 ? length / kvstore::kBlockSize : -1;
  if (const kvstore::Selection* sel = in.selection; sel != nullptr) {
    // Off the wire: checked before it is read (the model checks the rest).
    bool ok = sel->num_layers == layers && sel->num_kv_heads == heads &&
              sel->indptr.size() == static_cast<size_t>(layers * heads + 1) && sel->indptr[0] == 0;
    for (size_t i = 1; ok && i < sel->indptr.size(); ++i) ok = sel->indptr[i] >= sel->indptr[i - 1];
    ok = ok && sel->indptr.back() == static_cast<int32_t>(sel->blocks.size());
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat("the selection of sequence ", in.seq,
                                                     " does not match the model's layers and KV heads"));
    }
  }
  std::vector<runtime::KvUnitRef> want;
  for (int l = 0; l < layers; ++l) {
    for (int h = 0; h < heads; ++h) {
      const std::vector<bool>& here = lazy.here[static_cast<size_t>(l * heads + h)];
      auto need = [&](int64_t b) {
        if (b >= 0 && b < lazy.blocks && !here[b]) want.push_back({.layer = l, .head = h, .block = static_cast<int32_t>(b)});
      };
      const size_t before = want.size();
      if (in.selection != nullptr) {
        const int list = l * heads + h;
        for (int32_t i = in.selection->indptr[list]; i < in.selection->indptr[list + 1]; ++i) need(in.selection->blocks[i]);
        need(tail);
      } else {
        for (int64_t b = 0; b < lazy.blocks; ++b) need(b);
      }
      // A list may name the tail block too.
      std::sort(want.begin() + static_cast<ptrdiff_t>(before), want.end(),
                [](const runtime::KvUnitRef& a, const runtime::KvUnitRef& b) { return a.block < b.block; });
      want.erase(std::unique(want.begin() + static_cast<ptrdiff_t>(before), want.end(),
                             [](const runtime::KvUnitRef& a, const runtime::KvUnitRef& b) { return a.block == b.block; }),
                 want.end());
    }
  }
  if (absl::Status s = FetchUnits(in.seq, lazy, want); !s.ok()) return s;
  if (lazy.missing == 0) DoneFetching(in.seq);
  return absl::OkStatus();
}

absl::Status WorkerService::FetchAll(int64_t seq) {
  auto it = lazy_.find(seq);
  if (it == lazy_.end()) return absl::OkStatus();
  Lazy& lazy = it->second;
  const int heads = static_cast<int>(model_->config().num_key_value_heads);
  std::vector<runtime::KvUnitRef> want;
  for (size_t list = 0; list < lazy.here.size(); ++list) {
    for (int64_t b = 0; b < lazy.blocks; ++b) {
      if (!lazy.here[list][b]) {
        want.push_back({.layer = static_cast<int32_t>(list / heads), .head = static_cast<int32_t>(list % heads),
                        .block = static_cast<int32_t>(b)});
      }
    }
  }
  if (absl::Status s = FetchUnits(seq, lazy, want); !s.ok()) return s;
  DoneFetching(seq);
  return absl::OkStatus();
}

absl::Status WorkerService::Truncate(int64_t seq, int64_t num_tokens) {
  absl::StatusOr<int64_t> len = model_->SequenceLength(seq);
  if (!len.ok()) return len.status();
  if (absl::Status s = model_->TruncateSequence(seq, num_tokens); !s.ok()) return s;
  if (num_tokens >= *len) return absl::OkStatus();
  if (auto it = lazy_.find(seq); it != lazy_.end()) {
    Lazy& lazy = it->second;
    lazy.blocks = std::min<int64_t>(lazy.blocks, kvstore::BlocksFor(num_tokens));
    lazy.missing = 0;
    for (std::vector<bool>& here : lazy.here) {
      here.resize(static_cast<size_t>(lazy.blocks));
      lazy.missing += std::count(here.begin(), here.end(), false);
    }
    if (lazy.missing == 0) DoneFetching(seq);
  }
  // The home's record comes down (what it holds past the new length is stale now). Written
  // after the reply, before the next request: the coordinator, which heard of the truncation,
  // asks an adopter for no more meanwhile.
  auto home = homes_.find(seq);
  if (home != homes_.end() && !home->second.address.empty() && home->second.writable) {
    pending_.push_back({.seq = seq, .first_block = 0, .num_blocks = 0, .length = RecordFor(num_tokens)});
  }
  return absl::OkStatus();
}

int64_t WorkerService::RecordFor(int64_t length) const {
  return options_.remote_tier ? length : length / kvstore::kBlockSize * kvstore::kBlockSize;
}

absl::Status WorkerService::AddSequence(int64_t seq, const v1::KvHome& home, bool clear_home) {
  if (absl::Status s = model_->AddSequence(seq); !s.ok()) return s;
  // What an earlier worker of the sequence wrote there must not be taken for this one's KV.
  if (clear_home) ReleaseHome({.address = home.address(), .store_session = home.store_session()});
  homes_[seq] = Home{.address = home.address(), .store_session = home.store_session()};
  return absl::OkStatus();
}

absl::StatusOr<int64_t> WorkerService::Adopt(const v1::AdoptSequence& adopt) {
#ifdef SCOUT_HAVE_UCX
  const size_t unit = model_->kv_unit_bytes();
  if (unit == 0) return absl::UnimplementedError("this worker's backend cannot import KV");
  const int64_t seq = adopt.seq();
  const Home old{.address = adopt.home().address(), .store_session = adopt.home().store_session()};
  Home fresh = old;
  if (adopt.has_new_home()) {
    if (adopt.new_home().address() != old.address) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", seq, " is adopted onto ", adopt.new_home().address(),
                                                     ", not the node that holds it (", old.address, ")"));
    }
    fresh.store_session = adopt.new_home().store_session();
  }
  absl::StatusOr<kvstore::KvStoreClient*> client = Client(old.address);
  if (!client.ok()) return client.status();
  auto failed = [&](absl::Status s, bool release) {
    if (absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s)) {
      DropClient(old.address);
    } else if (release) {
      (void)(*client)->Release(static_cast<kvstore::SequenceId>(fresh.store_session));  // nobody reads it now
    }
    return s;
  };
  if (fresh.store_session != old.store_session) {
    absl::Status s = (*client)->Move(static_cast<kvstore::SequenceId>(old.store_session),
                                     static_cast<kvstore::SequenceId>(fresh.store_session));
    if (!s.ok()) return failed(s, false);
  }
  // What the home may be trusted for: its length record (written in the same request as a
  // pass's blocks, lowered by truncations), and never more than the coordinator's count of the
  // sequence. No record: nothing was written.
  int64_t usable = 0;
  {
    const kvstore::UnitKey key = LengthKey(fresh.store_session);
    staging_.resize(unit);
    absl::Status got = (*client)->Get({&key, 1}, staging_.data());
    if (got.ok()) {
      int64_t recorded = 0;
      std::memcpy(&recorded, staging_.data(), sizeof(recorded));
      usable = std::clamp<int64_t>(recorded, 0, adopt.num_tokens());
    } else if (!absl::IsNotFound(got)) {
      return failed(got, true);
    }
  }
  // The record now says what this worker takes, before it writes anything: rows past it, an
  // earlier owner's, are never trusted again even if this worker's next write is lost.
  if (absl::Status s = Persist(seq, fresh, 0, 0, usable); !s.ok()) return failed(s, true);
  if (absl::Status s = model_->AddSequence(seq); !s.ok()) return failed(s, true);
  const int64_t blocks = kvstore::BlocksFor(usable);
  absl::Status s;
  if (options_.remote_tier) {
    // Nothing moves now: each pass fetches what it reads.
    s = model_->ImportKv(seq, usable, nullptr);
    if (s.ok() && blocks > 0) {
      const runtime::ModelConfig& c = model_->config();
      const size_t lists = static_cast<size_t>(c.num_hidden_layers * c.num_key_value_heads);
      lazy_[seq] = Lazy{.source = fresh,
                        .blocks = blocks,
                        .here = std::vector<std::vector<bool>>(lists, std::vector<bool>(static_cast<size_t>(blocks))),
                        .missing = blocks * static_cast<int64_t>(lists)};
    }
  } else {
    const std::vector<kvstore::UnitKey> keys = UnitKeys(model_->config(), fresh.store_session, 0, blocks);
    staging_.resize(keys.size() * unit);
    const absl::Time t0 = absl::Now();
    s = (*client)->Get(keys, staging_.data());
    kv_seconds_ += absl::ToDoubleSeconds(absl::Now() - t0);
    if (s.ok()) {
      kv_bytes_read_ += static_cast<int64_t>(staging_.size());
      s = model_->ImportKv(seq, usable, staging_.data());
    }
  }
  if (!s.ok()) {
    (void)model_->ReleaseSequence(seq);
    return failed(s, true);
  }
  homes_[seq] = fresh;
  return usable;
#else
  return absl::UnavailableError("this scout was built without UCX: KV homes are not reachable");
#endif
}

absl::Status WorkerService::MoveHome(int64_t seq, const Home& home) {
  absl::StatusOr<int64_t> len = model_->SequenceLength(seq);
  if (!len.ok()) return len.status();
  if (!home.address.empty()) {
    // Units still only on the node they were adopted from come here first (that fails if the
    // node is gone; the coordinator then tells the sequence it has no home).
    if (absl::Status s = FetchAll(seq); !s.ok()) return s;
    const int64_t blocks = options_.remote_tier ? kvstore::BlocksFor(*len) : *len / kvstore::kBlockSize;
    if (absl::Status s = Persist(seq, home, 0, blocks, RecordFor(*len)); !s.ok()) return s;
  }
  auto old = homes_.find(seq);
  if (old != homes_.end() && !old->second.address.empty() && old->second.address != home.address &&
      !IsSource(seq, old->second)) {
    ReleaseHome(old->second);  // a node that only refused writes still holds the units
  }
  homes_[seq] = home;
  return absl::OkStatus();
}

bool WorkerService::IsSource(int64_t seq, const Home& home) const {
  auto it = lazy_.find(seq);
  return it != lazy_.end() && it->second.source.address == home.address &&
         it->second.source.store_session == home.store_session;
}

bool WorkerService::IsHome(int64_t seq, const Home& home) const {
  auto it = homes_.find(seq);
  return it != homes_.end() && it->second.address == home.address && it->second.store_session == home.store_session;
}

void WorkerService::DoneFetching(int64_t seq) {
  auto it = lazy_.find(seq);
  if (it == lazy_.end()) return;
  const Home source = it->second.source;
  lazy_.erase(it);
  if (!IsHome(seq, source)) ReleaseHome(source);  // no longer its home, and nothing more to read there
}

v1::BackendReply WorkerService::Forward(const v1::Forward& forward) {
  v1::BackendReply reply;
  const size_t n = static_cast<size_t>(forward.batch_size());
  std::vector<runtime::SequenceInput> batch(n);
  std::vector<kvstore::Selection> selections(n);
  std::vector<std::vector<float>> masses(n);
  std::vector<int64_t> before(n, 0);
  for (size_t i = 0; i < n; ++i) {
    const v1::SequenceInput& in = forward.batch(static_cast<int>(i));
    runtime::SequenceInput& b = batch[i];
    b.seq = in.seq();
    b.tokens = std::span<const int32_t>(in.tokens().data(), static_cast<size_t>(in.tokens_size()));
    b.all_logits = in.all_logits();
    if (in.has_selection()) {
      kvstore::Selection& sel = selections[i];
      sel.num_layers = in.selection().num_layers();
      sel.num_kv_heads = in.selection().num_kv_heads();
      sel.indptr.assign(in.selection().indptr().begin(), in.selection().indptr().end());
      sel.blocks.assign(in.selection().blocks().begin(), in.selection().blocks().end());
      b.selection = &sel;
    }
    if (in.want_block_mass()) b.block_mass = &masses[i];
    b.santa_samples = in.santa_samples();
    b.santa_seed = in.santa_seed();
    absl::StatusOr<int64_t> len = model_->SequenceLength(in.seq());
    if (!len.ok()) {
      *reply.mutable_status() = ToProto(len.status());
      return reply;
    }
    before[i] = *len;
    if (!lazy_.empty()) {
      if (absl::Status f = FetchForPass(b, *len); !f.ok()) {
        f.SetPayload(runtime::kFailedSequencePayload, absl::Cord(absl::StrCat(b.seq)));
        *reply.mutable_status() = ToProto(f);
        return reply;
      }
    }
  }
  absl::Status s;
  if (forward.rows_size() > 0) {
    std::vector<kernels::SampleRowParams> rows;
    for (const v1::SampleRow& r : forward.rows()) {
      rows.push_back({.temperature = r.temperature(), .top_k = r.top_k(), .top_p = r.top_p(), .seed = r.seed()});
    }
    std::vector<int32_t> tokens;
    s = model_->ForwardSampled(batch, rows, &tokens);
    if (s.ok()) reply.mutable_tokens()->Add(tokens.begin(), tokens.end());
  } else {
    std::vector<float> logits;
    s = model_->Forward(batch, &logits);
    if (s.ok()) PutFloats(logits, reply.mutable_logits());
  }
  *reply.mutable_status() = ToProto(s);
  if (!s.ok()) return reply;
  for (size_t i = 0; i < n; ++i) PutFloats(masses[i], reply.add_block_mass());
  // Queue the blocks this pass filled: each block goes to its home once, when full, and the
  // tokens of a partial last block run again after a failover. The remote tier writes the
  // partial block too, with the length, so nothing runs again.
  for (size_t i = 0; i < n; ++i) {
    auto it = homes_.find(batch[i].seq);
    if (it == homes_.end() || it->second.address.empty() || !it->second.writable) continue;
    const int64_t first = before[i] / kvstore::kBlockSize;
    const int64_t after = before[i] + static_cast<int64_t>(batch[i].tokens.size());
    if (options_.remote_tier) {
      pending_.push_back({.seq = batch[i].seq, .first_block = first,
                          .num_blocks = kvstore::BlocksFor(after) - first, .length = after,
                          .first_row = static_cast<int>(before[i] % kvstore::kBlockSize)});
      continue;
    }
    const int64_t last = after / kvstore::kBlockSize;
    if (last > first) {
      pending_.push_back({.seq = batch[i].seq, .first_block = first, .num_blocks = last - first,
                          .length = last * kvstore::kBlockSize});
    }
  }
  return reply;
}

void WorkerService::Flush() {
  std::vector<PersistJob> jobs;
  jobs.swap(pending_);
  for (const PersistJob& j : jobs) {
    auto it = homes_.find(j.seq);
    if (it == homes_.end() || it->second.address.empty() || !it->second.writable) continue;  // released, or failed
    if (absl::Status p = Persist(j.seq, it->second, j.first_block, j.num_blocks, j.length, j.first_row); !p.ok()) {
      unpersisted_.push_back(j.seq);
      persist_error_ = p;
      it->second.writable = false;  // no more writes there until the coordinator names a new home
    }
  }
}

v1::BackendReply WorkerService::Handle(const v1::BackendRequest& request) {
  Flush();  // a caller without after_reply: nothing is left queued
  v1::BackendReply reply;
  absl::Status s;
  switch (request.op_case()) {
    case v1::BackendRequest::kAdd:
      s = AddSequence(request.add().seq(), request.add().home(), request.add().clear_home());
      break;
    case v1::BackendRequest::kRelease: {
      const int64_t seq = request.release().seq();
      s = model_->ReleaseSequence(seq);
      if (auto it = lazy_.find(seq); it != lazy_.end() && !IsHome(seq, it->second.source)) ReleaseHome(it->second.source);
      if (auto it = homes_.find(seq); it != homes_.end()) ReleaseHome(it->second);
      homes_.erase(seq);
      lazy_.erase(seq);
      break;
    }
    case v1::BackendRequest::kTruncate:
      s = Truncate(request.truncate().seq(), request.truncate().num_tokens());
      break;
    case v1::BackendRequest::kForward:
      reply = Forward(request.forward());
      break;
    case v1::BackendRequest::kAdopt: {
      absl::StatusOr<int64_t> took = Adopt(request.adopt());
      s = took.status();
      if (took.ok()) reply.set_adopted_tokens(*took);
      break;
    }
    case v1::BackendRequest::kRehome:
      s = MoveHome(request.rehome().seq(), {.address = request.rehome().home().address(),
                                            .store_session = request.rehome().home().store_session()});
      break;
    case v1::BackendRequest::kReleaseHome:
      ReleaseHome({.address = request.release_home().home().address(),
                   .store_session = request.release_home().home().store_session()});
      break;
    default:
      s = absl::InvalidArgumentError("empty or unknown backend request");
  }
  if (request.op_case() != v1::BackendRequest::kForward) *reply.mutable_status() = ToProto(s);
  if (!unpersisted_.empty()) {
    reply.mutable_unpersisted()->Add(unpersisted_.begin(), unpersisted_.end());
    *reply.mutable_persist_error() = ToProto(persist_error_);
    unpersisted_.clear();
  }
  const runtime::ModelBackend::KvCacheUsage u = model_->kv_cache_usage();
  reply.set_kv_used_blocks(u.used_blocks);
  reply.set_kv_total_blocks(u.total_blocks);
  return reply;
}

absl::Status RunClusterMember(const MemberOptions& options,
                              std::function<v1::BackendReply(const v1::BackendRequest&)> serve,
                              std::function<v1::Heartbeat()> beat, std::function<void()> lost,
                              absl::Notification* stop, std::function<void()> after_reply) {
  absl::Mutex serve_mu;  // requests run one at a time, heartbeats read the service beside them
  bool announced_wait = false;
  while (!stop->HasBeenNotified()) {
    auto closed = std::make_shared<absl::Notification>();
    absl::StatusOr<std::shared_ptr<Channel>> ch = Channel::Connect(
        options.coordinator_host, options.coordinator_port, options.connect_timeout,
        [&serve, &serve_mu, &after_reply, &options](Channel& c, v1::Envelope m) {
          if (m.body_case() == v1::Envelope::kAssignment) {  // the placement changed
            if (options.on_assignment) options.on_assignment(m.assignment());
            return;
          }
          if (m.body_case() != v1::Envelope::kRequest) {
            if (options.on_message) (void)options.on_message(c, m);
            return;
          }
          v1::Envelope out;
          out.set_call_id(m.call_id());
          if (!serve) {
            *out.mutable_reply()->mutable_status() =
                ToProto(absl::UnimplementedError("this cluster member serves no model"));
            (void)c.Send(std::move(out));
            return;
          }
          absl::MutexLock lock(&serve_mu);
          *out.mutable_reply() = serve(m.request());
          // A reply that cannot be sent: the coordinator takes this worker for dead and moves its
          // sequences, so nothing more may be written to their homes.
          if (c.Send(std::move(out)).ok() && after_reply) after_reply();
        },
        [closed](const absl::Status&) { closed->Notify(); });
    if (!ch.ok()) {
      if (!announced_wait) {
        std::fprintf(stderr, "scout: waiting for the coordinator: %s\n", std::string(ch.status().message()).c_str());
        announced_wait = true;
      }
      stop->WaitForNotificationWithTimeout(options.reconnect_interval);
      continue;
    }
    v1::Envelope reg;
    *reg.mutable_register_() = options.registration;
    absl::StatusOr<v1::Envelope> ack = (*ch)->Call(std::move(reg), absl::Seconds(30), "register");
    absl::Status refused;
    if (ack.ok()) refused = FromProto(ack->register_reply().status());
    if (!ack.ok() || !refused.ok()) {
      (*ch)->Close();
      if (!refused.ok()) return refused;
      stop->WaitForNotificationWithTimeout(options.reconnect_interval);
      continue;
    }
    std::fprintf(stderr, "scout: registered with the coordinator at %s:%d as %s\n", options.coordinator_host.c_str(),
                 options.coordinator_port, options.registration.id().c_str());
    const v1::Assignment& assignment = ack->register_reply().assignment();
    if (assignment.placed() && options.registration.role() == v1::ROLE_TARGET &&
        assignment.tensor_parallel_size() != options.registration.num_gpus()) {
      // The coordinator refuses this itself; a coordinator of an older build may not.
      (*ch)->Close();
      return absl::FailedPreconditionError(absl::StrCat(
          "the coordinator's placement makes target groups of ", assignment.tensor_parallel_size(),
          " GPUs; this worker runs on ", options.registration.num_gpus(), " (--tensor-parallel-size)"));
    }
    if (options.on_assignment) options.on_assignment(assignment);
    announced_wait = false;
    const absl::Duration interval = absl::Milliseconds(std::max<uint32_t>(10, ack->register_reply().heartbeat_interval_ms()));
    v1::Heartbeat last;
    while (!stop->HasBeenNotified() && !closed->HasBeenNotified()) {
      // A request may run for longer than the heartbeat timeout (a long prefill): the heartbeat
      // never waits for it, and repeats the last figures while it runs.
      if (beat && serve_mu.TryLock()) {
        last = beat();
        serve_mu.Unlock();
      }
      v1::Envelope hb;
      *hb.mutable_heartbeat() = last;
      if (!(*ch)->Send(std::move(hb)).ok()) break;
      closed->WaitForNotificationWithTimeout(interval);
    }
    (*ch)->Close();
    closed->WaitForNotification();
    if (lost) {
      absl::MutexLock lock(&serve_mu);
      lost();
    }
    if (!stop->HasBeenNotified()) {
      std::fprintf(stderr, "scout: lost the coordinator; reconnecting\n");
      stop->WaitForNotificationWithTimeout(options.reconnect_interval);
    }
  }
  return absl::OkStatus();
}

}  // namespace scout::cluster
