// A small HTTP/1.1 server on Boost.Beast: connections read asynchronously on a few I/O threads
// (with timeouts and a cap on open connections), each whole request handled on a thread of its
// own, keep-alive, responses whole or streamed with chunked transfer encoding (server-sent
// events).
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace scout::server {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query
  std::string body;
  std::string authorization;  // the Authorization header, "" when absent
};

// How a handler answers. Either Send once, or BeginStream, then Write chunks, then EndStream.
class HttpResponder {
 public:
  virtual ~HttpResponder() = default;
  virtual void Send(int status, const std::string& content_type, const std::string& body,
                    const std::vector<std::pair<std::string, std::string>>& headers = {}) = 0;
  virtual bool BeginStream(const std::string& content_type) = 0;
  // False once the client is gone: the handler should stop producing.
  virtual bool Write(const std::string& data) = 0;
  virtual void EndStream() = 0;
};

using HttpHandler = std::function<void(const HttpRequest&, HttpResponder&)>;

struct HttpServerOptions {
  // A request whose body is larger gets 413 with OpenAI's error object, and its connection closes.
  size_t max_request_bytes = size_t{64} << 20;
  // Open connections beyond this get 503 (Retry-After: 1) and are closed.
  int max_connections = 16384;
  // A new connection's first request must arrive (header and body) within header_timeout_s; a
  // kept-alive connection's next one within idle_timeout_s. Otherwise the connection closes.
  double header_timeout_s = 30;
  double idle_timeout_s = 60;
  int io_threads = 2;  // threads reading connections (handlers run on threads of their own)
};

class HttpServer {
 public:
  // Listens on host:port (port 0: any free port; see port()). Unavailable naming the address if
  // it cannot bind.
  static absl::StatusOr<std::unique_ptr<HttpServer>> Start(const std::string& host, int port, HttpHandler handler,
                                                           const HttpServerOptions& options = {});
  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const { return port_; }
  // Stops accepting, lets handlers that are answering finish (up to 10 s), closes the
  // connections and joins every thread.
  void Stop();

 private:
  struct Impl;
  HttpServer() = default;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace scout::server
