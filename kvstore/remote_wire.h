// The KV store's wire over UCX, shared by its server (remote_store_server.cc) and client
// (remote_store.cc): active-message ids, the versioned headers, and the UCX worker and address
// helpers. Not for other folders.
#pragma once

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

namespace scout::kvstore::remote_wire {

constexpr unsigned kRequestAm = 17;  // client -> server
constexpr unsigned kReplyAm = 18;    // server -> client

enum Op : uint32_t { kPut = 1, kGet = 2, kRelease = 3, kPing = 4, kMove = 5, kPatch = 6 };

// Replies up to this size are copied into one buffer (faster over shared memory for small
// replies); larger ones go zero-copy from the units (docs/BENCHMARKS.md, the remote KV store).
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

inline absl::Status Ucx(ucs_status_t s, absl::string_view what) {
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

inline int PortOf(const sockaddr_storage& a) {
  return ntohs(a.ss_family == AF_INET6 ? reinterpret_cast<const sockaddr_in6*>(&a)->sin6_port
                                       : reinterpret_cast<const sockaddr_in*>(&a)->sin_port);
}

// InvalidArgument for a port out of range or an empty host; Unavailable when the name does not
// resolve (DNS can be late: a pod's name appears once it runs).
inline absl::StatusOr<SockAddr> Address(std::string host, int port, bool listen) {
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

}  // namespace scout::kvstore::remote_wire
