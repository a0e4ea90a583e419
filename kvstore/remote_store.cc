#include "kvstore/remote_store.h"
#include "kvstore/remote_wire.h"

namespace scout::kvstore {

using namespace remote_wire;  // NOLINT: this file's vocabulary

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
