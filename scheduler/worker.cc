#include "scheduler/worker.h"

#include <cstring>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "rpc/channel.h"
#ifdef SCOUT_HAVE_UCX
#include "kvstore/remote_store.h"
#endif

namespace scout::scheduler {

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

[[maybe_unused]] absl::StatusOr<std::pair<std::string, int>> SplitAddress(const std::string& address) {
  const size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) || port <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV store address \"", address, "\" is not host:port"));
  }
  return std::make_pair(address.substr(0, colon), port);
}

}  // namespace

WorkerService::WorkerService(std::unique_ptr<runtime::ModelBackend> model, absl::Duration kv_timeout)
    : model_(std::move(model)), kv_timeout_(kv_timeout) {}

WorkerService::~WorkerService() = default;

v1::Register WorkerService::Describe() const {
  v1::Register r;
  r.set_model_fingerprint(ModelFingerprint(model_->config()));
  r.set_samples_on_device(model_->samples_on_device());
#ifdef SCOUT_HAVE_UCX
  r.set_kv_unit_bytes(static_cast<int64_t>(model_->kv_unit_bytes()));
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
      kvstore::KvStoreClient::Connect(hp->first, hp->second, model_->kv_unit_bytes(), kv_timeout_);
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

absl::Status WorkerService::Persist(int64_t seq, const Home& home, int64_t first_block, int64_t num_blocks) {
#ifdef SCOUT_HAVE_UCX
  if (home.address.empty() || num_blocks <= 0) return absl::OkStatus();
  const std::vector<kvstore::UnitKey> keys = UnitKeys(model_->config(), home.store_session, first_block, num_blocks);
  staging_.resize(keys.size() * model_->kv_unit_bytes());
  if (absl::Status s = model_->ExportKv(seq, first_block, num_blocks, staging_.data()); !s.ok()) return s;
  absl::StatusOr<kvstore::KvStoreClient*> client = Client(home.address);
  if (!client.ok()) return client.status();
  const absl::Time t0 = absl::Now();
  absl::Status s = (*client)->Put(keys, staging_.data());
  kv_seconds_ += absl::ToDoubleSeconds(absl::Now() - t0);
  if (!s.ok()) {
    if (absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s)) DropClient(home.address);
    return s;
  }
  kv_bytes_written_ += static_cast<int64_t>(staging_.size());
  return absl::OkStatus();
#else
  return absl::UnavailableError("this scout was built without UCX: KV homes are not reachable");
#endif
}

absl::Status WorkerService::AddSequence(int64_t seq, const v1::KvHome& home) {
  if (absl::Status s = model_->AddSequence(seq); !s.ok()) return s;
  homes_[seq] = Home{.address = home.address(), .store_session = home.store_session()};
  return absl::OkStatus();
}

absl::Status WorkerService::Adopt(const v1::AdoptSequence& adopt) {
#ifdef SCOUT_HAVE_UCX
  const size_t unit = model_->kv_unit_bytes();
  if (unit == 0) return absl::UnimplementedError("this worker's backend cannot import KV");
  const std::vector<kvstore::UnitKey> keys =
      UnitKeys(model_->config(), adopt.home().store_session(), 0, kvstore::BlocksFor(adopt.num_tokens()));
  absl::StatusOr<kvstore::KvStoreClient*> client = Client(adopt.home().address());
  if (!client.ok()) return client.status();
  staging_.resize(keys.size() * unit);
  const absl::Time t0 = absl::Now();
  absl::Status got = (*client)->Get(keys, staging_.data());
  kv_seconds_ += absl::ToDoubleSeconds(absl::Now() - t0);
  if (!got.ok()) {
    if (absl::IsUnavailable(got) || absl::IsDeadlineExceeded(got)) DropClient(adopt.home().address());
    return got;
  }
  kv_bytes_read_ += static_cast<int64_t>(staging_.size());
  if (absl::Status s = model_->AddSequence(adopt.seq()); !s.ok()) return s;
  if (absl::Status s = model_->ImportKv(adopt.seq(), adopt.num_tokens(), staging_.data()); !s.ok()) {
    (void)model_->ReleaseSequence(adopt.seq());
    return s;
  }
  const Home old{.address = adopt.home().address(), .store_session = adopt.home().store_session()};
  Home fresh = old;
  if (adopt.has_new_home()) {
    fresh = Home{.address = adopt.new_home().address(), .store_session = adopt.new_home().store_session()};
    if (absl::Status p = Persist(adopt.seq(), fresh, 0, adopt.num_tokens() / kvstore::kBlockSize); p.ok()) {
      ReleaseHome(old);
    } else {  // the KV is here; the coordinator finds it a home
      fresh.writable = false;
      unpersisted_.push_back(adopt.seq());
      persist_error_ = p;
    }
  }
  homes_[adopt.seq()] = fresh;
  return absl::OkStatus();
#else
  return absl::UnavailableError("this scout was built without UCX: KV homes are not reachable");
#endif
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
    absl::StatusOr<int64_t> len = model_->SequenceLength(in.seq());
    if (!len.ok()) {
      *reply.mutable_status() = rpc::ToProto(len.status());
      return reply;
    }
    before[i] = *len;
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
  *reply.mutable_status() = rpc::ToProto(s);
  if (!s.ok()) return reply;
  for (size_t i = 0; i < n; ++i) PutFloats(masses[i], reply.add_block_mass());
  // Queue the blocks this pass filled: each block goes to its home once, when full. The tokens
  // of a partial last block are not there: after a failover they are run again.
  for (size_t i = 0; i < n; ++i) {
    auto it = homes_.find(batch[i].seq);
    if (it == homes_.end() || it->second.address.empty() || !it->second.writable) continue;
    const int64_t first = before[i] / kvstore::kBlockSize;
    const int64_t last = (before[i] + static_cast<int64_t>(batch[i].tokens.size())) / kvstore::kBlockSize;
    if (last > first) pending_.push_back({.seq = batch[i].seq, .first_block = first, .num_blocks = last - first});
  }
  return reply;
}

void WorkerService::Flush() {
  std::vector<PersistJob> jobs;
  jobs.swap(pending_);
  for (const PersistJob& j : jobs) {
    auto it = homes_.find(j.seq);
    if (it == homes_.end() || it->second.address.empty() || !it->second.writable) continue;  // released, or failed
    if (absl::Status p = Persist(j.seq, it->second, j.first_block, j.num_blocks); !p.ok()) {
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
      s = AddSequence(request.add().seq(), request.add().home());
      break;
    case v1::BackendRequest::kRelease: {
      const int64_t seq = request.release().seq();
      s = model_->ReleaseSequence(seq);
      if (auto it = homes_.find(seq); it != homes_.end()) ReleaseHome(it->second);
      homes_.erase(seq);
      break;
    }
    case v1::BackendRequest::kTruncate:
      s = model_->TruncateSequence(request.truncate().seq(), request.truncate().num_tokens());
      break;
    case v1::BackendRequest::kForward:
      reply = Forward(request.forward());
      break;
    case v1::BackendRequest::kAdopt:
      s = Adopt(request.adopt());
      break;
    case v1::BackendRequest::kRehome: {
      const int64_t seq = request.rehome().seq();
      Home home{.address = request.rehome().home().address(), .store_session = request.rehome().home().store_session()};
      absl::StatusOr<int64_t> len = model_->SequenceLength(seq);
      s = len.status();
      if (s.ok()) s = Persist(seq, home, 0, *len / kvstore::kBlockSize);
      if (s.ok()) {
        auto old = homes_.find(seq);
        if (old != homes_.end() && !old->second.address.empty() && old->second.address != home.address) {
          ReleaseHome(old->second);  // a node that only refused writes still holds the units
        }
        homes_[seq] = home;
      }
      break;
    }
    case v1::BackendRequest::kReleaseHome:
      ReleaseHome({.address = request.release_home().home().address(),
                   .store_session = request.release_home().home().store_session()});
      break;
    default:
      s = absl::InvalidArgumentError("empty or unknown backend request");
  }
  if (request.op_case() != v1::BackendRequest::kForward) *reply.mutable_status() = rpc::ToProto(s);
  if (!unpersisted_.empty()) {
    reply.mutable_unpersisted()->Add(unpersisted_.begin(), unpersisted_.end());
    *reply.mutable_persist_error() = rpc::ToProto(persist_error_);
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
    absl::StatusOr<std::shared_ptr<rpc::Channel>> ch = rpc::Channel::Connect(
        options.coordinator_host, options.coordinator_port, options.connect_timeout,
        [&serve, &serve_mu, &after_reply](rpc::Channel& c, v1::Envelope m) {
          if (m.body_case() != v1::Envelope::kRequest) return;
          v1::Envelope out;
          out.set_call_id(m.call_id());
          if (!serve) {
            *out.mutable_reply()->mutable_status() =
                rpc::ToProto(absl::UnimplementedError("this cluster member serves no model"));
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
    if (ack.ok()) refused = rpc::FromProto(ack->register_reply().status());
    if (!ack.ok() || !refused.ok()) {
      (*ch)->Close();
      if (!refused.ok()) return refused;
      stop->WaitForNotificationWithTimeout(options.reconnect_interval);
      continue;
    }
    std::fprintf(stderr, "scout: registered with the coordinator at %s:%d as %s\n", options.coordinator_host.c_str(),
                 options.coordinator_port, options.registration.id().c_str());
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

}  // namespace scout::scheduler
