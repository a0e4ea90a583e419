#include "kvstore/remote_store.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <ucp/api/ucp.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace scout::kvstore {
namespace {

constexpr unsigned kRequestAm = 17;  // client -> server
constexpr unsigned kReplyAm = 18;    // server -> client

enum Op : uint32_t { kPut = 1, kGet = 2, kRelease = 3, kPing = 4, kMove = 5, kPatch = 6 };

// Replies up to this size are copied into one buffer; larger ones go zero-copy from the units
// (measured on the 2-core workstation, shared memory: 256 units 3.5 GB/s copied against 0.7 by
// iov; 4096 units 1.0 against 1.2).
constexpr size_t kCopyReplyBytes = size_t{8} << 20;

// Every request and reply begins with this prefix, the same in every wire version: a peer of
// another version is recognised (the magic), told which version this end speaks (a reply of this
// version, which the peer matches to its request by the id at the same offset), and refused.
constexpr uint32_t kWireMagic = 0x564B4353;  // "SCKV" little-endian
struct WirePrefix {
  uint32_t magic = kWireMagic;
  uint32_t version = kKvWireVersion;
  uint64_t id = 0;
};

struct RequestHeader {
  WirePrefix prefix;
  uint32_t op = 0;
  uint32_t count = 0;
  int64_t session = 0;
};

struct ReplyHeader {
  WirePrefix prefix;
  int32_t code = 0;  // absl::StatusCode; the message is the data when not OK
  uint32_t pad = 0;
  uint64_t length = 0;
};

// Version 1, before the prefix (builds up to 40763e2): recognised only to tell such a client,
// in the reply layout it reads, that this node speaks another version.
struct V1RequestHeader {
  uint32_t op = 0;  // 1 (put) to 6 (patch)
  uint32_t count = 0;
  uint64_t id = 0;
  int64_t session = 0;
};
struct V1ReplyHeader {
  uint64_t id = 0;
  int32_t code = 0;
  uint32_t pad = 0;
  uint64_t length = 0;
};

// A unit key on the wire (fixed layout, both ends of one build).
struct WireKey {
  int64_t session = 0;
  int32_t layer = 0, head = 0, block = 0, pad = 0;
};

// A byte range of a stored unit on the wire.
struct WirePatch {
  WireKey key;
  uint32_t offset = 0, length = 0;
};

absl::Status Ucx(ucs_status_t s, absl::string_view what) {
  if (s == UCS_OK) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(what, ": ", ucs_status_string(s)));
}

// A socket address for UCX. Host names resolve through DNS (Asio's resolver: a pod's
// `name.service` in Kubernetes) to their first IPv4 address; IPv4 literals pass through; listen
// also takes "0.0.0.0". IPv6 is refused by name: UCX 1.13's TCP wireup, on the machine this was
// built on, crashed the server (segmentation fault in its error path) when a client reached it
// over ::1, so the store does not offer what it cannot serve safely.
struct SockAddr {
  sockaddr_storage storage{};
  socklen_t length = 0;
  const sockaddr* get() const { return reinterpret_cast<const sockaddr*>(&storage); }
};

int PortOf(const sockaddr_storage& a) {
  return ntohs(a.ss_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port
                                       : reinterpret_cast<const sockaddr_in*>(&a)->sin_port);
}

// InvalidArgument for a port out of range or an empty host; Unavailable when the name does not
// resolve (DNS can be late: a pod's name appears once it runs).
absl::StatusOr<SockAddr> Address(std::string host, int port, bool listen) {
  if (port < 0 || port > 65535 || host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("\"", host, ":", port, "\" is not a host and port"));
  }
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  namespace ip = boost::asio::ip;
  boost::asio::io_context io;
  ip::tcp::resolver resolver(io);
  boost::system::error_code error;
  const auto flags = ip::resolver_base::numeric_service | (listen ? ip::resolver_base::passive : ip::resolver_base::flags());
  if (boost::system::error_code v6; ip::make_address_v6(host, v6), !v6) {
    return absl::InvalidArgumentError(absl::StrCat("\"", host, "\" is an IPv6 address; the KV store is reached over IPv4"));
  }
  const ip::tcp::resolver::results_type found = resolver.resolve(ip::tcp::v4(), host, std::to_string(port), flags, error);
  if (error || found.empty()) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve \"", host, "\" to an IPv4 address: ", error ? error.message() : "none"));
  }
  const ip::tcp::endpoint endpoint = found.begin()->endpoint();
  SockAddr a;
  std::memcpy(&a.storage, endpoint.data(), endpoint.size());
  a.length = static_cast<socklen_t>(endpoint.size());
  return a;
}

// A UCP context and one worker (single-threaded use).
struct UcxWorker {
  ucp_context_h context = nullptr;
  ucp_worker_h worker = nullptr;
  absl::Status Init() {
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_AM;
    ucp_config_t* config = nullptr;
    if (absl::Status s = Ucx(ucp_config_read(nullptr, nullptr, &config), "UCX config"); !s.ok()) return s;
    const ucs_status_t st = ucp_init(&p, config, &context);
    ucp_config_release(config);
    if (absl::Status s = Ucx(st, "UCX init"); !s.ok()) return s;
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    return Ucx(ucp_worker_create(context, &wp, &worker), "UCX worker");
  }
  ~UcxWorker() {
    if (worker != nullptr) ucp_worker_destroy(worker);
    if (context != nullptr) ucp_cleanup(context);
  }
  absl::Status SetHandler(unsigned id, ucp_am_recv_callback_t cb, void* arg) {
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    hp.id = id;
    hp.cb = cb;
    hp.arg = arg;
    return Ucx(ucp_worker_set_am_recv_handler(worker, &hp), "UCX active-message handler");
  }
  // Progresses until the request completes or the deadline passes; then it is cancelled, and
  // if even that does not end it within a short grace (a close waiting on a peer that never
  // answers), it is left to complete on its own (UCX frees it then).
  ucs_status_t Wait(ucs_status_ptr_t req, absl::Time deadline) {
    if (req == nullptr) return UCS_OK;
    if (UCS_PTR_IS_ERR(req)) return UCS_PTR_STATUS(req);
    ucs_status_t st;
    bool cancelled = false;
    while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS) {
      ucp_worker_progress(worker);
      const absl::Time now = absl::Now();
      if (!cancelled && now > deadline) {
        ucp_request_cancel(worker, req);
        cancelled = true;
      } else if (cancelled && now > deadline + absl::Milliseconds(100)) {
        ucp_request_free(req);
        return UCS_ERR_TIMED_OUT;
      }
    }
    ucp_request_free(req);
    return cancelled && st != UCS_OK ? UCS_ERR_TIMED_OUT : st;
  }

  // Closes an endpoint: flushing what it has queued (for at most `grace`), or by force if it
  // failed (UCX wants a failed endpoint closed so). An endpoint is closed once either way.
  void Close(ucp_ep_h ep, absl::Duration grace, bool failed = false) {
    ucp_request_param_t p{};
    if (failed) {
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
    }
    Wait(ucp_ep_close_nbx(ep, &p), absl::Now() + grace);
  }
};

}  // namespace

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

// --- Client ----------------------------------------------------------------------------------

struct KvStoreClient::Impl {
  UcxWorker ucx;
  ucp_ep_h ep = nullptr;
  std::string peer;
  size_t unit_bytes = 0;
  absl::Duration timeout;
  uint64_t next_id = 1;
  uint32_t wire_version = kKvWireVersion;
  bool broken = false;
  ucs_status_t broken_status = UCS_OK;

  // The reply being waited for.
  struct Pending {
    uint64_t id = 0;
    bool done = false;
    absl::Status status;
    std::byte* out = nullptr;
    size_t out_length = 0;
  };
  Pending* pending = nullptr;

  static void OnData(void* request, ucs_status_t status, size_t, void* user_data) {
    auto* p = static_cast<Pending*>(user_data);
    if (status != UCS_OK) p->status = Ucx(status, "KV store reply data");
    p->done = true;
    ucp_request_free(request);
  }

  static ucs_status_t OnReply(void* arg, const void* header, size_t header_length, void* data, size_t length,
                              const ucp_am_recv_param_t* param) {
    auto* self = static_cast<Impl*>(arg);
    WirePrefix prefix;
    if (header_length < sizeof(prefix)) return UCS_OK;
    std::memcpy(&prefix, header, sizeof(prefix));
    Pending* p = self->pending;
    if (prefix.magic != kWireMagic || p == nullptr || prefix.id != p->id) return UCS_OK;  // not ours, or late
    const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
    if (prefix.version != self->wire_version || header_length != sizeof(ReplyHeader)) {
      std::string said;  // the server's own words, when it sent them eagerly
      if (!rndv && length > 0 && length < 4096) said.assign(static_cast<const char*>(data), length);
      p->status = absl::FailedPreconditionError(absl::StrCat(
          "KV store ", self->peer, " speaks KV wire version ", prefix.version, " and this client version ",
          self->wire_version, ": run one Scout version across the cluster", said.empty() ? "" : " (it says: ", said,
          said.empty() ? "" : ")"));
      p->done = true;
      return UCS_OK;
    }
    ReplyHeader h;
    std::memcpy(&h, header, sizeof(h));
    if (h.code != 0) {
      std::string msg(length, '\0');
      if (!rndv && length > 0) std::memcpy(msg.data(), data, length);
      p->status = absl::Status(static_cast<absl::StatusCode>(h.code), msg);
      p->done = true;
      return UCS_OK;
    }
    if (length != p->out_length) {
      p->status = absl::InternalError(absl::StrCat("KV store replied ", length, " bytes, ", p->out_length, " expected"));
      p->done = true;
      return UCS_OK;
    }
    if (length == 0) {
      p->done = true;
    } else if (rndv) {  // straight into the caller's buffer
      ucp_request_param_t rp{};
      rp.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
      rp.cb.recv_am = OnData;
      rp.user_data = p;
      ucs_status_ptr_t r = ucp_am_recv_data_nbx(self->ucx.worker, data, p->out, length, &rp);
      if (r == nullptr) {
        p->done = true;
      } else if (UCS_PTR_IS_ERR(r)) {
        p->status = Ucx(UCS_PTR_STATUS(r), "KV store reply data");
        p->done = true;
      }
    } else {
      std::memcpy(p->out, data, length);
      p->done = true;
    }
    return UCS_OK;
  }

  // The request in flight: header, payload and reply state live here, not on the caller's stack,
  // so that UCX never touches freed memory if a call gives up on a silent server.
  RequestHeader request_header;
  std::vector<std::byte> request_payload;
  Pending call;

  absl::Status Call(uint32_t op, uint32_t count, int64_t session, std::vector<std::byte> payload, std::byte* out,
                    size_t out_length) {
    if (broken) return absl::UnavailableError(absl::StrCat("KV store ", peer, " is unreachable: ", ucs_status_string(broken_status)));
    call = Pending{.id = next_id++, .out = out, .out_length = out_length};
    Pending& p = call;
    pending = &p;
    request_header = {.prefix = {.version = wire_version, .id = p.id}, .op = op, .count = count, .session = session};
    request_payload = std::move(payload);
    ucp_request_param_t rp{};
    rp.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    rp.flags = UCP_AM_SEND_FLAG_REPLY;
    const absl::Time deadline = absl::Now() + timeout;
    const ucs_status_t sent =
        ucx.Wait(ucp_am_send_nbx(ep, kRequestAm, &request_header, sizeof(RequestHeader), request_payload.data(),
                                 request_payload.size(), &rp),
                 deadline);
    while (sent == UCS_OK && !p.done && !broken && absl::Now() < deadline) ucp_worker_progress(ucx.worker);
    pending = nullptr;
    if (sent != UCS_OK || !p.done) {
      // The connection is unusable now (and a late reply must not land in `out`): close it.
      if (!broken) {
        broken = true;
        broken_status = sent != UCS_OK ? sent : UCS_ERR_TIMED_OUT;
      }
      if (ep != nullptr) {
        ucx.Close(ep, absl::Milliseconds(100), /*failed=*/true);
        ep = nullptr;
      }
      if (sent == UCS_ERR_TIMED_OUT || broken_status == UCS_ERR_TIMED_OUT) {
        return absl::DeadlineExceededError(absl::StrCat("KV store ", peer, " did not answer within ",
                                                        absl::FormatDuration(timeout)));
      }
      return absl::UnavailableError(absl::StrCat("KV store ", peer, " is unreachable: ", ucs_status_string(broken_status)));
    }
    return p.status;
  }

  ~Impl() {
    if (ep != nullptr) ucx.Close(ep, absl::Milliseconds(500), broken);
  }
};

KvStoreClient::KvStoreClient(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KvStoreClient::~KvStoreClient() = default;

absl::StatusOr<std::unique_ptr<KvStoreClient>> KvStoreClient::Connect(const std::string& host, int port,
                                                                      size_t unit_bytes, absl::Duration timeout,
                                                                      uint32_t wire_version) {
  if (unit_bytes == 0) return absl::InvalidArgumentError("unit_bytes must be > 0");
  absl::StatusOr<SockAddr> addr = Address(host, port, /*listen=*/false);
  if (!addr.ok()) {
    return absl::Status(addr.status().code(), absl::StrCat("KV store node ", host, ":", port, ": ", addr.status().message()));
  }
  auto impl = std::make_unique<Impl>();
  impl->peer = absl::StrCat(host, ":", port);
  impl->unit_bytes = unit_bytes;
  impl->timeout = timeout;
  impl->wire_version = wire_version;
  if (absl::Status s = impl->ucx.Init(); !s.ok()) return s;
  if (absl::Status s = impl->ucx.SetHandler(kReplyAm, &Impl::OnReply, impl.get()); !s.ok()) return s;
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_FLAGS | UCP_EP_PARAM_FIELD_SOCK_ADDR | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.flags = UCP_EP_PARAMS_FLAGS_CLIENT_SERVER;
  p.sockaddr.addr = addr->get();
  p.sockaddr.addrlen = addr->length;
  p.err_mode = UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t status) {
    auto* self = static_cast<Impl*>(arg);
    self->broken = true;
    self->broken_status = status;
  };
  p.err_handler.arg = impl.get();
  if (absl::Status s = Ucx(ucp_ep_create(impl->ucx.worker, &p, &impl->ep), absl::StrCat("connecting to KV store ", impl->peer));
      !s.ok()) {
    return s;
  }
  // The connection is made lazily: a ping proves it.
  if (absl::Status s = impl->Call(kPing, 0, 0, {}, nullptr, 0); !s.ok()) return s;
  return std::unique_ptr<KvStoreClient>(new KvStoreClient(std::move(impl)));
}

absl::Status KvStoreClient::Put(std::span<const UnitKey> keys, const std::byte* data) {
  const size_t n = keys.size(), ub = impl_->unit_bytes;
  std::vector<std::byte> payload(n * (sizeof(WireKey) + ub));
  auto* wire = reinterpret_cast<WireKey*>(payload.data());
  for (size_t i = 0; i < n; ++i) wire[i] = {.session = keys[i].session, .layer = keys[i].layer, .head = keys[i].head, .block = keys[i].block};
  if (n > 0) std::memcpy(payload.data() + n * sizeof(WireKey), data, n * ub);
  return impl_->Call(kPut, static_cast<uint32_t>(n), 0, std::move(payload), nullptr, 0);
}

absl::Status KvStoreClient::Patch(std::span<const UnitPatch> patches, const std::byte* data) {
  size_t total = 0;
  for (const UnitPatch& p : patches) total += p.length;
  const size_t n = patches.size();
  std::vector<std::byte> payload(n * sizeof(WirePatch) + total);
  auto* wire = reinterpret_cast<WirePatch*>(payload.data());
  for (size_t i = 0; i < n; ++i) {
    const UnitKey& k = patches[i].key;
    wire[i] = {.key = {.session = k.session, .layer = k.layer, .head = k.head, .block = k.block},
               .offset = patches[i].offset,
               .length = patches[i].length};
  }
  if (total > 0) std::memcpy(payload.data() + n * sizeof(WirePatch), data, total);
  return impl_->Call(kPatch, static_cast<uint32_t>(n), 0, std::move(payload), nullptr, 0);
}

absl::Status KvStoreClient::Get(std::span<const UnitKey> keys, std::byte* out) {
  const size_t n = keys.size();
  std::vector<std::byte> payload(n * sizeof(WireKey));
  auto* wire = reinterpret_cast<WireKey*>(payload.data());
  for (size_t i = 0; i < n; ++i) wire[i] = {.session = keys[i].session, .layer = keys[i].layer, .head = keys[i].head, .block = keys[i].block};
  return impl_->Call(kGet, static_cast<uint32_t>(n), 0, std::move(payload), out, n * impl_->unit_bytes);
}

absl::Status KvStoreClient::Release(SequenceId session) {
  return impl_->Call(kRelease, 0, session, {}, nullptr, 0);
}

absl::Status KvStoreClient::Move(SequenceId from, SequenceId to) {
  std::vector<std::byte> payload(sizeof(int64_t));
  const int64_t target = static_cast<int64_t>(to);
  std::memcpy(payload.data(), &target, sizeof(target));
  return impl_->Call(kMove, 0, static_cast<int64_t>(from), std::move(payload), nullptr, 0);
}

}  // namespace scout::kvstore
