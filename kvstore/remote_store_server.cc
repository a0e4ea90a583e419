#include "kvstore/remote_store.h"
#include "kvstore/remote_wire.h"

namespace scout::kvstore {

using namespace remote_wire;  // NOLINT: this file's vocabulary

// --- Server ----------------------------------------------------------------------------------

struct KvStoreServer::Impl {
  UcxWorker ucx;
  ucp_listener_h listener = nullptr;
  int port = 0;
  size_t unit_bytes = 0;
  int64_t capacity = 0;
  std::atomic<int64_t> held{0};
  std::atomic<bool> stop{false};
  std::thread thread;
  std::vector<ucp_ep_h> eps;
  std::vector<ucp_ep_h> failed;  // endpoints whose client went away, not yet closed
  // session -> (layer, head, block) -> bytes. Shared: a reply being sent holds the units it
  // sends (zero copy), so a rewrite (a new buffer) or a release never frees them under it.
  using Unit = std::shared_ptr<std::byte[]>;
  absl::flat_hash_map<int64_t, absl::flat_hash_map<std::tuple<int32_t, int32_t, int32_t>, Unit>> units;

  uint32_t wire_version = kKvWireVersion;
  struct Job {
    ucp_ep_h reply_ep = nullptr;
    bool other_version = false;  // a client of another wire version: refused
    bool v1 = false;             // ... of version 1: answered in its own reply layout
    RequestHeader header;
    std::vector<std::byte> payload;
    bool ready = false;
    bool ok = true;
  };
  std::deque<std::unique_ptr<Job>> jobs;  // arrival order; each runs once its payload is in

  // A reply and what it sends: kept until the send completes. Either contiguous data (an error
  // message) or the units themselves, gathered by UCX from an I/O vector.
  struct Reply {
    ReplyHeader header;
    std::vector<std::byte> data;
    std::vector<Unit> units;
    std::vector<ucp_dt_iov_t> iov;
  };

  static void OnConnection(ucp_conn_request_h request, void* arg) {
    auto* self = static_cast<Impl*>(arg);
    ucp_ep_params_t p{};
    p.field_mask = UCP_EP_PARAM_FIELD_CONN_REQUEST | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER;
    p.conn_request = request;
    p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    // A client went away: its endpoint is closed by the loop once no request of it is pending.
    p.err_handler.cb = [](void* arg, ucp_ep_h ep, ucs_status_t) { static_cast<Impl*>(arg)->failed.push_back(ep); };
    p.err_handler.arg = self;
    ucp_ep_h ep = nullptr;
    if (ucp_ep_create(self->ucx.worker, &p, &ep) == UCS_OK) {
      self->eps.push_back(ep);
    } else {
      ucp_listener_reject(self->listener, request);
    }
  }

  bool Failed(ucp_ep_h ep) const { return std::find(failed.begin(), failed.end(), ep) != failed.end(); }

  // Force-closes failed endpoints that no queued request still answers to.
  void CloseFailed() {
    for (size_t i = 0; i < failed.size();) {
      ucp_ep_h ep = failed[i];
      if (std::any_of(jobs.begin(), jobs.end(), [&](const std::unique_ptr<Job>& j) { return j->reply_ep == ep; })) {
        ++i;
        continue;
      }
      failed.erase(failed.begin() + static_cast<std::ptrdiff_t>(i));
      eps.erase(std::remove(eps.begin(), eps.end(), ep), eps.end());
      ucx.Close(ep, absl::Milliseconds(100), /*failed=*/true);
    }
  }

  static void OnPayload(void* request, ucs_status_t status, size_t, void* user_data) {
    auto* job = static_cast<Job*>(user_data);
    job->ok = status == UCS_OK;
    job->ready = true;
    ucp_request_free(request);
  }

  static ucs_status_t OnRequest(void* arg, const void* header, size_t header_length, void* data, size_t length,
                                const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    WirePrefix prefix;
    if (header_length < sizeof(prefix) || (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) == 0) {
      return UCS_OK;  // not ours: dropped
    }
    std::memcpy(&prefix, header, sizeof(prefix));
    if (prefix.magic != kWireMagic) {
      V1RequestHeader v1;
      if (header_length != sizeof(v1)) return UCS_OK;  // not ours: dropped
      std::memcpy(&v1, header, sizeof(v1));
      if (v1.op < kPut || v1.op > kPatch) return UCS_OK;
      auto job = std::make_unique<Job>();
      job->header.prefix = {.magic = 0, .version = 1, .id = v1.id};
      job->other_version = true;
      job->v1 = true;
      job->reply_ep = param->reply_ep;
      job->ready = true;
      self->jobs.push_back(std::move(job));
      return UCS_OK;
    }
    auto job = std::make_unique<Job>();
    if (prefix.version != self->wire_version || header_length != sizeof(RequestHeader)) {
      // Another version: answered with an error naming both, its payload left unread.
      job->header.prefix = prefix;
      job->other_version = true;
      job->reply_ep = param->reply_ep;
      job->ready = true;
      self->jobs.push_back(std::move(job));
      return UCS_OK;
    }
    std::memcpy(&job->header, header, sizeof(RequestHeader));
    job->reply_ep = param->reply_ep;
    job->payload.resize(length);
    if ((param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      p.cb.recv_am = OnPayload;
      p.user_data = job.get();
      ucs_status_ptr_t r = ucp_am_recv_data_nbx(self->ucx.worker, data, job->payload.data(), length, &p);
      if (r == nullptr) {
        job->ready = true;
      } else if (UCS_PTR_IS_ERR(r)) {
        job->ready = true;
        job->ok = false;
      }
    } else {
      if (length > 0) std::memcpy(job->payload.data(), data, length);
      job->ready = true;
    }
    self->jobs.push_back(std::move(job));
    return UCS_OK;
  }

  // A version-1 client's refusal, in the reply layout it reads.
  void SendV1(ucp_ep_h ep, uint64_t id, const absl::Status& status) {
    struct V1Reply {
      V1ReplyHeader header;
      std::string message;
    };
    auto* reply = new V1Reply{.header = {.id = id, .code = static_cast<int32_t>(status.code())},
                              .message = std::string(status.message())};
    reply->header.length = reply->message.size();
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = [](void* request, ucs_status_t, void* user_data) {
      delete static_cast<V1Reply*>(user_data);
      ucp_request_free(request);
    };
    p.user_data = reply;
    ucs_status_ptr_t r = ucp_am_send_nbx(ep, kReplyAm, &reply->header, sizeof(V1ReplyHeader), reply->message.data(),
                                         reply->message.size(), &p);
    if (r == nullptr || UCS_PTR_IS_ERR(r)) delete reply;
  }

  void Send(ucp_ep_h ep, uint64_t id, const absl::Status& status, std::vector<Unit> out) {
    auto* reply = new Reply{.header = {.prefix = {.version = wire_version, .id = id},
                                       .code = static_cast<int32_t>(status.code())},
                            .units = std::move(out)};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    const void* buffer = nullptr;
    size_t count = 0;
    if (!status.ok()) {
      const std::string msg(status.message());
      reply->data.assign(reinterpret_cast<const std::byte*>(msg.data()), reinterpret_cast<const std::byte*>(msg.data()) + msg.size());
      reply->header.length = reply->data.size();
      buffer = reply->data.data();
      count = reply->data.size();
    } else if (!reply->units.empty() && reply->units.size() * unit_bytes <= kCopyReplyBytes) {
      // Small replies: one contiguous copy goes faster over shared memory than many iov pieces.
      reply->data.resize(reply->units.size() * unit_bytes);
      for (size_t i = 0; i < reply->units.size(); ++i) {
        std::memcpy(reply->data.data() + i * unit_bytes, reply->units[i].get(), unit_bytes);
      }
      reply->units.clear();
      reply->header.length = reply->data.size();
      buffer = reply->data.data();
      count = reply->data.size();
    } else if (!reply->units.empty()) {
      for (const Unit& u : reply->units) reply->iov.push_back({.buffer = u.get(), .length = unit_bytes});
      reply->header.length = reply->units.size() * unit_bytes;
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
      p.datatype = ucp_dt_make_iov();
      buffer = reply->iov.data();
      count = reply->iov.size();
    }
    p.cb.send = [](void* request, ucs_status_t, void* user_data) {
      delete static_cast<Reply*>(user_data);
      ucp_request_free(request);
    };
    p.user_data = reply;
    ucs_status_ptr_t r = ucp_am_send_nbx(ep, kReplyAm, &reply->header, sizeof(ReplyHeader), buffer, count, &p);
    if (r == nullptr || UCS_PTR_IS_ERR(r)) delete reply;  // done at once, or the client is gone
  }

  absl::StatusOr<std::vector<Unit>> Process(const Job& job) {
    const RequestHeader& h = job.header;
    const size_t n = h.count;
    if (!job.ok) return absl::DataLossError("request payload was not received");
    switch (h.op) {
      case kPing:
        return std::vector<Unit>();
      case kRelease: {
        auto it = units.find(h.session);
        if (it != units.end()) {
          held -= static_cast<int64_t>(it->second.size());
          units.erase(it);
        }
        return std::vector<Unit>();
      }
      case kMove: {  // the payload is the new session id
        int64_t to = 0;
        if (job.payload.size() != sizeof(to)) return absl::InvalidArgumentError("move carries no target session");
        std::memcpy(&to, job.payload.data(), sizeof(to));
        if (to == h.session) return std::vector<Unit>();
        if (auto old = units.find(to); old != units.end()) {
          held -= static_cast<int64_t>(old->second.size());
          units.erase(old);
        }
        if (auto it = units.find(h.session); it != units.end()) {
          auto moved = std::move(it->second);
          units.erase(it);
          units[to] = std::move(moved);
        }
        return std::vector<Unit>();
      }
      case kPut: {
        if (job.payload.size() != n * (sizeof(WireKey) + unit_bytes)) {
          return absl::InvalidArgumentError(absl::StrCat("put of ", n, " units carries ", job.payload.size(), " bytes"));
        }
        const auto* keys = reinterpret_cast<const WireKey*>(job.payload.data());
        const std::byte* bytes = job.payload.data() + n * sizeof(WireKey);
        int64_t fresh = 0;
        for (size_t i = 0; i < n; ++i) {
          auto s = units.find(keys[i].session);
          fresh += s == units.end() || !s->second.contains({keys[i].layer, keys[i].head, keys[i].block});
        }
        if (held + fresh > capacity) {
          return absl::ResourceExhaustedError(absl::StrCat("KV store full: ", held.load(), " of ", capacity,
                                                           " units held, this write adds ", fresh));
        }
        for (size_t i = 0; i < n; ++i) {
          Unit& slot = units[keys[i].session][{keys[i].layer, keys[i].head, keys[i].block}];
          if (slot == nullptr) ++held;
          // Always a new buffer: a reply in flight may still be sending the old one.
          slot = Unit(new std::byte[unit_bytes]);
          std::memcpy(slot.get(), bytes + i * unit_bytes, unit_bytes);
        }
        return std::vector<Unit>();
      }
      case kPatch: {
        if (job.payload.size() < n * sizeof(WirePatch)) {
          return absl::InvalidArgumentError(absl::StrCat("patch of ", n, " ranges carries ", job.payload.size(), " bytes"));
        }
        const auto* patches = reinterpret_cast<const WirePatch*>(job.payload.data());
        size_t total = 0;
        for (size_t i = 0; i < n; ++i) {
          const WirePatch& pt = patches[i];
          if (static_cast<size_t>(pt.offset) + pt.length > unit_bytes) {
            return absl::InvalidArgumentError(absl::StrCat("patch past the end of a ", unit_bytes, "-byte unit"));
          }
          auto s = units.find(pt.key.session);
          if (s == units.end() || !s->second.contains({pt.key.layer, pt.key.head, pt.key.block})) {
            return absl::NotFoundError(absl::StrCat("the KV store holds no unit (session ", pt.key.session, ", layer ",
                                                    pt.key.layer, ", head ", pt.key.head, ", block ", pt.key.block,
                                                    ") to patch"));
          }
          total += pt.length;
        }
        if (job.payload.size() != n * sizeof(WirePatch) + total) {
          return absl::InvalidArgumentError(absl::StrCat("patch of ", n, " ranges carries ", job.payload.size(), " bytes"));
        }
        // Copy on write (a reply in flight may still be sending the old buffer), once per unit.
        absl::flat_hash_set<const std::byte*> copied;
        const std::byte* bytes = job.payload.data() + n * sizeof(WirePatch);
        for (size_t i = 0; i < n; ++i) {
          const WirePatch& pt = patches[i];
          Unit& slot = units[pt.key.session][{pt.key.layer, pt.key.head, pt.key.block}];
          if (!copied.contains(slot.get())) {
            Unit fresh(new std::byte[unit_bytes]);
            std::memcpy(fresh.get(), slot.get(), unit_bytes);
            slot = std::move(fresh);
            copied.insert(slot.get());
          }
          std::memcpy(slot.get() + pt.offset, bytes, pt.length);
          bytes += pt.length;
        }
        return std::vector<Unit>();
      }
      case kGet: {
        if (job.payload.size() != n * sizeof(WireKey)) {
          return absl::InvalidArgumentError(absl::StrCat("get of ", n, " units carries ", job.payload.size(), " bytes"));
        }
        const auto* keys = reinterpret_cast<const WireKey*>(job.payload.data());
        std::vector<Unit> out(n);
        for (size_t i = 0; i < n; ++i) {
          if (auto s = units.find(keys[i].session); s != units.end()) {
            if (auto u = s->second.find({keys[i].layer, keys[i].head, keys[i].block}); u != s->second.end()) {
              out[i] = u->second;
            }
          }
          if (out[i] == nullptr) {
            return absl::NotFoundError(absl::StrCat("the KV store holds no unit (session ", keys[i].session, ", layer ",
                                                    keys[i].layer, ", head ", keys[i].head, ", block ", keys[i].block, ")"));
          }
        }
        return out;
      }
      default:
        return absl::InvalidArgumentError(absl::StrCat("unknown KV store operation ", h.op));
    }
  }

  void Loop() {
    int idle = 0;
    while (!stop) {
      const unsigned events = ucp_worker_progress(ucx.worker);
      bool worked = events > 0;
      while (!jobs.empty() && jobs.front()->ready) {
        std::unique_ptr<Job> job = std::move(jobs.front());
        jobs.pop_front();
        worked = true;
        if (Failed(job->reply_ep)) continue;  // nobody to answer
        absl::StatusOr<std::vector<Unit>> out =
            job->other_version
                ? absl::FailedPreconditionError(absl::StrCat(
                      "this KV store speaks KV wire version ", wire_version, " and the client version ",
                      job->header.prefix.version, ": run one Scout version across the cluster"))
                : Process(*job);
        if (job->v1) {
          SendV1(job->reply_ep, job->header.prefix.id, out.status());
          continue;
        }
        Send(job->reply_ep, job->header.prefix.id, out.status(), out.ok() ? std::move(*out) : std::vector<Unit>());
      }
      if (!failed.empty()) CloseFailed();
      idle = worked ? 0 : idle + 1;
      if (idle > 1000) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  ~Impl() {
    stop = true;
    if (thread.joinable()) thread.join();
    // No new connections while closing; then clients see theirs fail, as if the node died.
    if (listener != nullptr) ucp_listener_destroy(listener);
    std::vector<ucp_ep_h> closing;
    closing.swap(eps);
    for (ucp_ep_h ep : closing) ucx.Close(ep, absl::Milliseconds(200), /*failed=*/true);
    // Receives still in flight end (in error) with their endpoints; let them before the jobs go.
    const absl::Time deadline = absl::Now() + absl::Milliseconds(200);
    while (absl::Now() < deadline &&
           std::any_of(jobs.begin(), jobs.end(), [](const std::unique_ptr<Job>& j) { return !j->ready; })) {
      ucp_worker_progress(ucx.worker);
    }
    jobs.clear();
  }
};

KvStoreServer::KvStoreServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvStoreServer::~KvStoreServer() = default;
int KvStoreServer::port() const { return impl_->port; }
int64_t KvStoreServer::units_held() const { return impl_->held; }

absl::StatusOr<std::unique_ptr<KvStoreServer>> KvStoreServer::Start(const std::string& host, int port,
                                                                    size_t unit_bytes, int64_t capacity_units,
                                                                    uint32_t wire_version) {
  if (unit_bytes == 0 || capacity_units < 0) return absl::InvalidArgumentError("unit_bytes > 0, capacity_units >= 0");
  absl::StatusOr<SockAddr> addr = Address(host, port, /*listen=*/true);
  if (!addr.ok()) return addr.status();
  auto impl = std::make_unique<Impl>();
  impl->unit_bytes = unit_bytes;
  impl->capacity = capacity_units;
  impl->wire_version = wire_version;
  if (absl::Status s = impl->ucx.Init(); !s.ok()) return s;
  if (absl::Status s = impl->ucx.SetHandler(kRequestAm, &Impl::OnRequest, impl.get()); !s.ok()) return s;
  ucp_listener_params_t lp{};
  lp.field_mask = UCP_LISTENER_PARAM_FIELD_SOCK_ADDR | UCP_LISTENER_PARAM_FIELD_CONN_HANDLER;
  lp.sockaddr.addr = addr->get();
  lp.sockaddr.addrlen = addr->length;
  lp.conn_handler.cb = &Impl::OnConnection;
  lp.conn_handler.arg = impl.get();
  if (absl::Status s = Ucx(ucp_listener_create(impl->ucx.worker, &lp, &impl->listener),
                           absl::StrCat("KV store listening on ", host, ":", port));
      !s.ok()) {
    return s;
  }
  ucp_listener_attr_t attr{};
  attr.field_mask = UCP_LISTENER_ATTR_FIELD_SOCKADDR;
  if (absl::Status s = Ucx(ucp_listener_query(impl->listener, &attr), "listener query"); !s.ok()) return s;
  impl->port = PortOf(attr.sockaddr);
  Impl* raw = impl.get();
  impl->thread = std::thread([raw] { raw->Loop(); });
  return std::unique_ptr<KvStoreServer>(new KvStoreServer(std::move(impl)));
}

}  // namespace scout::kvstore
