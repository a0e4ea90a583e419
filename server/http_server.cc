#include "server/http_server.h"

#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <optional>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace scout::server {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

// Answers on the connection's socket with blocking writes, from the request's thread: no
// asynchronous operation is pending on a connection while its handler runs.
class BeastResponder final : public HttpResponder {
 public:
  BeastResponder(tcp::socket& socket, bool keep_alive) : socket_(socket), keep_alive_(keep_alive) {}

  void Send(int status, const std::string& content_type, const std::string& body,
            const std::vector<std::pair<std::string, std::string>>& headers) override {
    http::response<http::string_body> res{static_cast<http::status>(status), 11};
    res.set(http::field::server, "scout");
    res.set(http::field::content_type, content_type);
    for (const auto& [k, v] : headers) res.set(k, v);
    res.keep_alive(keep_alive_);
    res.body() = body;
    res.prepare_payload();
    beast::error_code ec;
    http::write(socket_, res, ec);
    ok_ = !ec;
  }

  bool BeginStream(const std::string& content_type) override {
    http::response<http::empty_body> res{http::status::ok, 11};
    res.set(http::field::server, "scout");
    res.set(http::field::content_type, content_type);
    res.set(http::field::cache_control, "no-cache");
    res.chunked(true);
    res.keep_alive(keep_alive_);
    http::response_serializer<http::empty_body> sr{res};
    beast::error_code ec;
    http::write_header(socket_, sr, ec);
    ok_ = !ec;
    return ok_;
  }

  bool Write(const std::string& data) override {
    if (!ok_) return false;
    beast::error_code ec;
    asio::write(socket_, http::make_chunk(asio::buffer(data)), ec);
    ok_ = !ec;
    return ok_;
  }

  void EndStream() override {
    if (!ok_) return;
    beast::error_code ec;
    asio::write(socket_, http::make_chunk_last(), ec);
    ok_ = !ec;
  }

  bool ok() const { return ok_; }

 private:
  tcp::socket& socket_;
  bool keep_alive_;
  bool ok_ = true;
};

std::string ErrorBody(const std::string& message, const std::string& type, int code) {
  return absl::StrCat(R"({"error":{"message":")", message, R"(","type":")", type, R"(","code":)", code, "}}");
}

// 413 for a body over the limit, then the rest of what the client sends is read and dropped (for
// at most a second) so that it sees the answer rather than a reset connection.
void RefuseTooLarge(tcp::socket& socket, size_t limit) {
  BeastResponder responder(socket, /*keep_alive=*/false);
  responder.Send(413, "application/json",
                 ErrorBody(absl::StrCat("request body over the server's limit of ", limit, " bytes (--max-request-bytes)"),
                           "invalid_request_error", 413),
                 {});
  beast::error_code ec;
  socket.shutdown(tcp::socket::shutdown_send, ec);
  const timeval timeout{.tv_sec = 1, .tv_usec = 0};
  ::setsockopt(socket.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
  char sink[1 << 16];
  const absl::Time deadline = absl::Now() + absl::Seconds(1);
  while (absl::Now() < deadline) {
    const size_t n = socket.read_some(asio::buffer(sink), ec);
    if (ec || n == 0) break;
  }
}

// Connections beyond the cap need descriptors too: the soft limit goes up to the hard one.
void RaiseDescriptorLimit() {
  rlimit r{};
  if (::getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur < r.rlim_max) {
    r.rlim_cur = r.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &r);
  }
}

}  // namespace

// Connections are read asynchronously on a small pool of I/O threads (a connection that sends
// half a header and waits costs a socket and a buffer, not a thread, and is closed when its
// timeout passes); a whole request runs its handler on a thread of its own, which answers with
// blocking writes and then hands the connection back to the pool for its next request.
struct HttpServer::Impl {
  HttpServerOptions options;
  HttpHandler handler;
  std::atomic<bool> stopping{false};
  std::atomic<int> connections{0};

  absl::Mutex mu;
  int busy ABSL_GUARDED_BY(mu) = 0;  // requests inside a handler
  // Request threads, by id; a finished one is joined by the next request (or by Stop).
  int64_t next_request ABSL_GUARDED_BY(mu) = 0;
  std::unordered_map<int64_t, std::thread> requests ABSL_GUARDED_BY(mu);
  std::vector<int64_t> finished ABSL_GUARDED_BY(mu);
  // Open connections, to close at Stop.
  struct Connection;
  std::unordered_map<Connection*, std::weak_ptr<Connection>> open ABSL_GUARDED_BY(mu);
  // Declared after what the connections touch: destroying the context destroys the handlers it
  // still holds, and with them their connections.
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::vector<std::thread> io_threads;

  struct Connection : std::enable_shared_from_this<Connection> {
    Connection(Impl& impl, tcp::socket socket) : impl(impl), stream(std::move(socket)) {}
    ~Connection() { impl.connections.fetch_sub(1); }

    void Start() {
      {
        absl::MutexLock lock(&impl.mu);
        impl.open.emplace(this, weak_from_this());
      }
      beast::error_code ec;
      // Streamed tokens are small writes: without this, Nagle's algorithm holds them back.
      stream.socket().set_option(tcp::no_delay(true), ec);
      Read(/*first=*/true);
    }

    void Read(bool first) {
      if (impl.stopping) return Close();
      parser.emplace();
      parser->body_limit(impl.options.max_request_bytes);
      // The first request must arrive within the header timeout; later ones within the idle
      // keep-alive timeout. The whole request (header and body) is read under one deadline.
      stream.expires_after(std::chrono::milliseconds(
          static_cast<int64_t>(1000 * (first ? impl.options.header_timeout_s : impl.options.idle_timeout_s))));
      http::async_read(stream, buffer, *parser,
                       [self = shared_from_this()](beast::error_code ec, size_t) { self->OnRead(ec); });
    }

    void OnRead(beast::error_code ec) {
      stream.expires_never();
      if (ec == http::error::body_limit) {
        auto self = shared_from_this();
        impl.RunRequest([self] {
          RefuseTooLarge(self->stream.socket(), self->impl.options.max_request_bytes);
          self->Close();
        });
        return;
      }
      if (ec) return Close();  // closed, timed out, or not HTTP
      auto self = shared_from_this();
      impl.RunRequest([self] { self->Handle(); });
    }

    // On the request's thread.
    void Handle() {
      const auto& req = parser->get();
      HttpRequest r{std::string(req.method_string()), std::string(req.target()), req.body(),
                    std::string(req[http::field::authorization])};
      const bool keep_alive = req.keep_alive();
      BeastResponder responder(stream.socket(), keep_alive);
      impl.handler(r, responder);
      if (!responder.ok() || !keep_alive || impl.stopping) return Close();
      asio::post(stream.get_executor(), [self = shared_from_this()] { self->Read(/*first=*/false); });
    }

    void Close() {
      beast::error_code ec;
      stream.socket().shutdown(tcp::socket::shutdown_both, ec);
      stream.socket().close(ec);
      absl::MutexLock lock(&impl.mu);
      impl.open.erase(this);
    }

    Impl& impl;
    beast::tcp_stream stream;
    beast::flat_buffer buffer;
    std::optional<http::request_parser<http::string_body>> parser;
  };

  void Accept() {
    acceptor.async_accept(asio::make_strand(io), [this](beast::error_code ec, tcp::socket socket) {
      if (stopping) return;
      if (!ec) {
        if (connections.fetch_add(1) >= options.max_connections) {
          connections.fetch_sub(1);
          // Over the cap: 503 written here (a few hundred bytes into a new connection's empty send
          // buffer: no wait, and no thread for a flood of them), and the connection closes.
          BeastResponder responder(socket, /*keep_alive=*/false);
          responder.Send(503, "application/json",
                         ErrorBody(absl::StrCat("the server has its maximum of ", options.max_connections,
                                                " connections open"),
                                   "server_error", 503),
                         {{"Retry-After", "1"}});
          beast::error_code e;
          socket.shutdown(tcp::socket::shutdown_both, e);
        } else {
          std::make_shared<Connection>(*this, std::move(socket))->Start();
        }
      }
      Accept();
    });
  }

  // Runs fn on a thread of its own, counted as busy while it runs; joins threads that finished.
  void RunRequest(std::function<void()> fn) {
    std::vector<std::thread> done;
    {
      absl::MutexLock lock(&mu);
      for (int64_t id : finished) {
        auto it = requests.find(id);
        if (it != requests.end()) {
          done.push_back(std::move(it->second));
          requests.erase(it);
        }
      }
      finished.clear();
      const int64_t id = next_request++;
      ++busy;
      requests.emplace(id, std::thread([this, id, fn = std::move(fn)] {
                         fn();
                         absl::MutexLock l(&mu);
                         --busy;
                         finished.push_back(id);
                       }));
    }
    for (std::thread& t : done) t.join();
  }
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& host, int port, HttpHandler handler,
                                                               const HttpServerOptions& options) {
  RaiseDescriptorLimit();
  std::unique_ptr<HttpServer> server(new HttpServer());
  server->impl_ = std::make_unique<Impl>();
  Impl& impl = *server->impl_;
  impl.handler = std::move(handler);
  impl.options = options;
  beast::error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("bad listen address \"", host, "\": ", ec.message()));
  const tcp::endpoint endpoint{address, static_cast<unsigned short>(port)};
  impl.acceptor.open(endpoint.protocol(), ec);
  if (!ec) impl.acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl.acceptor.bind(endpoint, ec);
  if (!ec) impl.acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port, ": ", ec.message()));
  server->port_ = impl.acceptor.local_endpoint().port();
  impl.Accept();
  for (int i = 0; i < std::max(1, options.io_threads); ++i) impl.io_threads.emplace_back([&impl] { impl.io.run(); });
  return server;
}

void HttpServer::Stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  Impl& impl = *impl_;
  asio::post(impl.io, [&impl] {
    beast::error_code ec;
    impl.acceptor.close(ec);
  });
  std::vector<std::shared_ptr<Impl::Connection>> open;
  {
    // Handlers that are answering finish their response (a draining engine has let their
    // requests complete); idle keep-alive connections are closed.
    absl::MutexLock lock(&impl.mu);
    auto idle = [&impl]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl.mu) { return impl.busy == 0; };
    impl.mu.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(10));
    for (auto& [raw, weak] : impl.open) {
      if (auto c = weak.lock()) open.push_back(std::move(c));
    }
  }
  for (auto& c : open) {
    asio::post(c->stream.get_executor(), [c] {
      beast::error_code ec;
      c->stream.socket().shutdown(tcp::socket::shutdown_both, ec);
      c->stream.socket().close(ec);
    });
  }
  open.clear();
  impl.io.stop();
  for (std::thread& t : impl.io_threads) t.join();
  std::unordered_map<int64_t, std::thread> requests;
  {
    absl::MutexLock lock(&impl.mu);
    requests.swap(impl.requests);
  }
  for (auto& [id, t] : requests) t.join();
}

HttpServer::~HttpServer() { Stop(); }

}  // namespace scout::server
