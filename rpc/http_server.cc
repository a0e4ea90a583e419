#include "rpc/http_server.h"

#include <sys/socket.h>
#include <sys/time.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"

namespace scout::rpc {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

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

}  // namespace

// 413 for a body over the limit, then the rest of what the client sends is read and dropped (for
// at most a second) so that it sees the answer rather than a reset connection.
static void RefuseTooLarge(tcp::socket& socket, size_t limit) {
  BeastResponder responder(socket, /*keep_alive=*/false);
  const std::string msg = absl::StrCat("request body over the server's limit of ", limit,
                                       " bytes (--max-request-bytes)");
  responder.Send(413, "application/json",
                 absl::StrCat(R"({"error":{"message":")", msg, R"(","type":"invalid_request_error","code":413}})"), {});
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

struct HttpServer::Impl {
  HttpServerOptions options;
  asio::io_context io;
  tcp::acceptor acceptor{io};
  HttpHandler handler;
  std::thread accept_thread;
  absl::Mutex mu;
  std::vector<std::thread> connections ABSL_GUARDED_BY(mu);
  std::vector<tcp::socket*> open ABSL_GUARDED_BY(mu);
  int busy ABSL_GUARDED_BY(mu) = 0;  // connections inside a handler
  std::atomic<bool> stopping{false};

  void Serve(tcp::socket socket) {
    beast::error_code nodelay_ec;
    // Streamed tokens are small writes: without this, Nagle's algorithm holds them back.
    socket.set_option(tcp::no_delay(true), nodelay_ec);
    {
      absl::MutexLock lock(&mu);
      open.push_back(&socket);
    }
    beast::flat_buffer buffer;
    while (!stopping) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(options.max_request_bytes);
      beast::error_code ec;
      http::read(socket, buffer, parser, ec);
      if (ec == http::error::body_limit) {
        RefuseTooLarge(socket, options.max_request_bytes);
        break;
      }
      if (ec) break;
      const auto& req = parser.get();
      HttpRequest r{std::string(req.method_string()), std::string(req.target()), req.body(),
                    std::string(req[http::field::authorization])};
      BeastResponder responder(socket, req.keep_alive());
      {
        absl::MutexLock lock(&mu);
        ++busy;
      }
      handler(r, responder);
      {
        absl::MutexLock lock(&mu);
        --busy;
      }
      if (!responder.ok() || !req.keep_alive()) break;
    }
    beast::error_code ec;
    socket.shutdown(tcp::socket::shutdown_both, ec);
    absl::MutexLock lock(&mu);
    open.erase(std::find(open.begin(), open.end(), &socket));
  }
};

absl::StatusOr<std::unique_ptr<HttpServer>> HttpServer::Start(const std::string& host, int port, HttpHandler handler,
                                                               const HttpServerOptions& options) {
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
  impl.accept_thread = std::thread([&impl] {
    while (!impl.stopping) {
      beast::error_code aec;
      tcp::socket socket{impl.io};
      impl.acceptor.accept(socket, aec);
      if (aec) {
        if (impl.stopping) break;
        continue;
      }
      absl::MutexLock lock(&impl.mu);
      impl.connections.emplace_back([&impl, s = std::move(socket)]() mutable { impl.Serve(std::move(s)); });
    }
  });
  return server;
}

void HttpServer::Stop() {
  if (!impl_ || impl_->stopping.exchange(true)) return;
  beast::error_code ec;
  // A blocking accept does not wake when the acceptor closes: connect once to release it.
  {
    tcp::socket poke{impl_->io};
    tcp::endpoint self = impl_->acceptor.local_endpoint(ec);
    if (!ec && self.address().is_unspecified()) self.address(asio::ip::make_address("127.0.0.1"));
    if (!ec) poke.connect(self, ec);
  }
  if (impl_->accept_thread.joinable()) impl_->accept_thread.join();
  impl_->acceptor.close(ec);
  std::vector<std::thread> threads;
  {
    // Handlers that are answering finish their response (a draining engine has let their
    // requests complete); idle keep-alive connections are woken by shutting their sockets.
    absl::MutexLock lock(&impl_->mu);
    Impl* impl = impl_.get();
    auto idle = [impl]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(impl->mu) { return impl->busy == 0; };
    impl_->mu.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(10));
    for (tcp::socket* s : impl_->open) s->shutdown(tcp::socket::shutdown_both, ec);
    threads.swap(impl_->connections);
  }
  for (std::thread& t : threads) t.join();
}

HttpServer::~HttpServer() { Stop(); }

}  // namespace scout::rpc
