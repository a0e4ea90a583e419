#include "cluster/channel.h"

#include <sys/socket.h>

#include <boost/asio.hpp>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"

namespace scout::cluster {

namespace asio = boost::asio;
using asio::ip::tcp;

v1::Status ToProto(const absl::Status& status) {
  v1::Status p;
  p.set_code(static_cast<int32_t>(status.code()));
  p.set_message(std::string(status.message()));
  status.ForEachPayload([&](absl::string_view url, const absl::Cord& payload) {
    (*p.mutable_payloads())[std::string(url)] = std::string(payload);
  });
  return p;
}

absl::Status FromProto(const v1::Status& p) {
  if (p.code() == 0) return absl::OkStatus();
  absl::Status s(static_cast<absl::StatusCode>(p.code()), p.message());
  for (const auto& [url, payload] : p.payloads()) s.SetPayload(url, absl::Cord(payload));
  return s;
}

absl::StatusOr<v1::Envelope> PendingCall::Wait() {
  if (!done_.WaitForNotificationWithDeadline(deadline_)) {
    return absl::DeadlineExceededError(absl::StrCat(what_, ": no reply within the deadline"));
  }
  absl::MutexLock lock(&mu_);
  return result_;
}

struct Channel::Socket {
  asio::io_context io;
  tcp::socket socket{io};
};

Channel::Channel(std::unique_ptr<Socket> socket, std::string peer, Handler on_message, CloseHandler on_close)
    : socket_(std::move(socket)), peer_(std::move(peer)), on_message_(std::move(on_message)),
      on_close_(std::move(on_close)) {}

absl::StatusOr<std::shared_ptr<Channel>> Channel::Connect(const std::string& host, int port, absl::Duration timeout,
                                                          Handler on_message, CloseHandler on_close) {
  auto s = std::make_unique<Socket>();
  const std::string addr = absl::StrCat(host, ":", port);
  boost::system::error_code resolve_error;
  tcp::resolver resolver(s->io);
  auto endpoints = resolver.resolve(host, std::to_string(port), resolve_error);
  if (resolve_error) return absl::UnavailableError(absl::StrCat(addr, ": ", resolve_error.message()));
  boost::system::error_code connect_error = asio::error::timed_out;
  asio::async_connect(s->socket, endpoints,
                      [&](const boost::system::error_code& e, const tcp::endpoint&) { connect_error = e; });
  s->io.run_for(absl::ToChronoMilliseconds(timeout));
  if (connect_error) {
    return absl::UnavailableError(absl::StrCat("cannot connect to ", addr, ": ", connect_error.message()));
  }
  s->io.restart();
  s->socket.set_option(tcp::no_delay(true));
  std::shared_ptr<Channel> c(new Channel(std::move(s), addr, std::move(on_message), std::move(on_close)));
  c->Start();
  return c;
}

void Channel::Start() {
  reader_ = std::thread([self = shared_from_this()] { self->ReadLoop(); });
}

Channel::~Channel() {
  Close();
  if (reader_.joinable()) {
    if (reader_.get_id() == std::this_thread::get_id()) {
      reader_.detach();
    } else {
      reader_.join();
    }
  }
}

void Channel::Close() {
  absl::MutexLock lock(&fd_mu_);
  closed_.store(true);
  // Unblocks the reader's read (and a writer's write); the reader then closes the socket.
  if (socket_->socket.is_open()) ::shutdown(socket_->socket.native_handle(), SHUT_RDWR);
}

absl::Status Channel::Send(v1::Envelope message) {
  message.set_version(kProtocolVersion);
  std::string body;
  if (!message.SerializeToString(&body)) return absl::InternalError("control message did not serialize");
  if (body.size() > kMaxFrameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("control message of ", body.size(), " bytes is over the limit"));
  }
  const uint32_t n = static_cast<uint32_t>(body.size());
  const unsigned char header[4] = {static_cast<unsigned char>(n >> 24), static_cast<unsigned char>(n >> 16),
                                   static_cast<unsigned char>(n >> 8), static_cast<unsigned char>(n)};
  boost::system::error_code e;
  {
    absl::MutexLock lock(&write_mu_);
    if (closed_.load()) return absl::UnavailableError(absl::StrCat("connection to ", peer_, " is closed"));
    const std::array<asio::const_buffer, 2> bufs = {asio::buffer(header, 4), asio::buffer(body)};
    asio::write(socket_->socket, bufs, e);
  }
  if (e) {
    Close();
    return absl::UnavailableError(absl::StrCat("connection to ", peer_, " failed: ", e.message()));
  }
  return absl::OkStatus();
}

std::shared_ptr<PendingCall> Channel::CallAsync(v1::Envelope request, absl::Duration timeout, std::string what) {
  auto call = std::make_shared<PendingCall>();
  call->deadline_ = absl::Now() + timeout;
  call->what_ = absl::StrCat(what, " (", peer_, ")");
  uint64_t id = 0;
  {
    absl::MutexLock lock(&calls_mu_);
    id = next_call_++;
    calls_[id] = call;
  }
  request.set_call_id(id);
  request.set_deadline_ms(static_cast<uint32_t>(std::max<int64_t>(1, absl::ToInt64Milliseconds(timeout))));
  if (absl::Status s = Send(std::move(request)); !s.ok()) {
    bool mine = false;  // else the reader's FailPending has completed it already
    {
      absl::MutexLock lock(&calls_mu_);
      mine = calls_.erase(id) == 1;
    }
    if (mine) {
      {
        absl::MutexLock l(&call->mu_);
        call->result_ = absl::Status(s.code(), absl::StrCat(call->what_, ": ", s.message()));
      }
      call->done_.Notify();
    }
  }
  return call;
}

void Channel::FailPending(const absl::Status& why) {
  absl::flat_hash_map<uint64_t, std::shared_ptr<PendingCall>> calls;
  {
    absl::MutexLock lock(&calls_mu_);
    calls.swap(calls_);
  }
  for (auto& [id, call] : calls) {
    {
      absl::MutexLock l(&call->mu_);
      call->result_ = absl::UnavailableError(absl::StrCat(call->what_, ": ", why.message()));
    }
    call->done_.Notify();
  }
}

void Channel::ReadLoop() {
  absl::Status why = absl::OkStatus();
  std::vector<char> body;
  while (true) {
    unsigned char header[4];
    boost::system::error_code e;
    asio::read(socket_->socket, asio::buffer(header, 4), e);
    if (e) {
      why = absl::UnavailableError(absl::StrCat(
          "connection to ", peer_, closed_.load() ? " closed" : absl::StrCat(" lost: ", e.message())));
      break;
    }
    const uint32_t n = (uint32_t{header[0]} << 24) | (uint32_t{header[1]} << 16) | (uint32_t{header[2]} << 8) | header[3];
    if (n > kMaxFrameBytes) {
      why = absl::DataLossError(absl::StrCat("frame of ", n, " bytes from ", peer_, " is over the limit"));
      break;
    }
    body.resize(n);
    asio::read(socket_->socket, asio::buffer(body), e);
    if (e) {
      why = absl::UnavailableError(absl::StrCat("connection to ", peer_, " lost mid-message: ", e.message()));
      break;
    }
    v1::Envelope message;
    if (!message.ParseFromArray(body.data(), static_cast<int>(n))) {
      why = absl::DataLossError(absl::StrCat("malformed control message from ", peer_));
      break;
    }
    if (message.version() != kProtocolVersion) {
      why = absl::FailedPreconditionError(absl::StrCat("protocol version ", message.version(), " from ", peer_,
                                                       "; this side speaks ", kProtocolVersion));
      if (message.body_case() == v1::Envelope::kRegister) {
        // Say why before hanging up, so the member stops retrying.
        v1::Envelope refusal;
        refusal.set_call_id(message.call_id());
        *refusal.mutable_register_reply()->mutable_status() = ToProto(why);
        (void)Send(std::move(refusal));
      }
      break;
    }
    if (message.body_case() == v1::Envelope::kReply || message.body_case() == v1::Envelope::kRegisterReply) {
      std::shared_ptr<PendingCall> call;
      {
        absl::MutexLock lock(&calls_mu_);
        auto it = calls_.find(message.call_id());
        if (it != calls_.end()) {
          call = std::move(it->second);
          calls_.erase(it);
        }
      }
      if (call != nullptr) {  // else: a reply past its caller's deadline
        {
          absl::MutexLock l(&call->mu_);
          call->result_ = std::move(message);
        }
        call->done_.Notify();
      }
      continue;
    }
    if (on_message_) on_message_(*this, std::move(message));
  }
  Close();  // writers blocked on a dead peer return now
  {
    absl::MutexLock wlock(&write_mu_);
    absl::MutexLock lock(&fd_mu_);
    boost::system::error_code ignored;
    socket_->socket.close(ignored);
  }
  FailPending(why);
  if (on_close_) on_close_(why);
  // Break the cycle handler -> channel: the handlers may hold the channel.
  on_message_ = nullptr;
  on_close_ = nullptr;
}

struct Listener::Acceptor {
  asio::io_context io;
  tcp::acceptor acceptor{io};
};

Listener::Listener(std::unique_ptr<Acceptor> acceptor, MakeHandlers make, OnChannel on_channel)
    : acceptor_(std::move(acceptor)), port_(acceptor_->acceptor.local_endpoint().port()), make_(std::move(make)),
      on_channel_(std::move(on_channel)) {}

absl::StatusOr<std::unique_ptr<Listener>> Listener::Start(const std::string& host, int port, MakeHandlers make,
                                                          OnChannel on_channel) {
  auto a = std::make_unique<Acceptor>();
  boost::system::error_code e;
  // An address literal (IPv4 or IPv6, "::" for every interface), or a name resolved through DNS
  // to its first address (a pod's own name in Kubernetes, "localhost").
  tcp::endpoint endpoint;
  const asio::ip::address literal = asio::ip::make_address(host, e);
  if (!e) {
    endpoint = tcp::endpoint(literal, static_cast<uint16_t>(port));
  } else {
    tcp::resolver resolver(a->io);
    auto found = resolver.resolve(host, std::to_string(port), tcp::resolver::passive, e);
    if (e || found.empty()) {
      return absl::UnavailableError(absl::StrCat("cannot resolve the listen address \"", host, "\": ", e.message()));
    }
    endpoint = found.begin()->endpoint();
  }
  a->acceptor.open(endpoint.protocol(), e);
  if (!e) a->acceptor.set_option(tcp::acceptor::reuse_address(true), e);
  if (!e) a->acceptor.bind(endpoint, e);
  if (!e) a->acceptor.listen(asio::socket_base::max_listen_connections, e);
  if (e) return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port, ": ", e.message()));
  std::unique_ptr<Listener> l(new Listener(std::move(a), std::move(make), std::move(on_channel)));
  l->thread_ = std::thread([p = l.get()] { p->AcceptLoop(); });
  return l;
}

Listener::~Listener() {
  stop_.store(true);
  ::shutdown(acceptor_->acceptor.native_handle(), SHUT_RDWR);
  if (thread_.joinable()) thread_.join();
}

void Listener::AcceptLoop() {
  while (!stop_.load()) {
    auto s = std::make_unique<Channel::Socket>();
    boost::system::error_code e;
    acceptor_->acceptor.accept(s->socket, e);
    if (stop_.load()) return;
    if (e) continue;
    s->socket.set_option(tcp::no_delay(true), e);
    const tcp::endpoint remote = s->socket.remote_endpoint(e);
    const std::string peer = e ? "unknown peer" : absl::StrCat(remote.address().to_string(), ":", remote.port());
    auto [on_message, on_close] = make_(peer);
    std::shared_ptr<Channel> c(new Channel(std::move(s), peer, std::move(on_message), std::move(on_close)));
    c->Start();
    on_channel_(std::move(c));
  }
}

}  // namespace scout::cluster
