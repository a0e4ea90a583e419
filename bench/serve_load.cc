// Load test for `scout serve`: concurrent streaming clients for a bounded time, reporting
// requests/s, tokens/s, time to first token and inter-token latency percentiles, and errors.
//
//   serve_load --port 8000 [--host 127.0.0.1] [--clients 4] [--seconds 20] [--max-tokens 64]
//              [--prompt TEXT] [--session-turns N]
//
// With --session-turns, each client is an agent: its requests are the turns of a session
// (session_id), each turn adding the prompt to a context the server keeps, for N turns; then
// the session is deleted and a new one begins.
#include <utility>  // before Boost 1.74's asio: its awaitable.hpp uses std::exchange

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "nlohmann/json.hpp"

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

struct Stats {
  std::mutex mu;
  std::vector<double> ttft, itl;  // seconds
  int64_t requests = 0, errors = 0, tokens = 0;
};

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

// One streamed completion; each server-sent event with text is one token step.
void OneRequest(const std::string& host, const std::string& port, const std::string& body, Stats& stats) {
  try {
    asio::io_context io;
    tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.connect(resolver.resolve(host, port));
    http::request<http::string_body> req{http::verb::post, "/v1/completions", 11};
    req.set(http::field::host, host);
    req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
    const auto start = Clock::now();
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    http::read_header(stream, buffer, parser);
    if (parser.get().result() != http::status::ok) {
      std::lock_guard<std::mutex> lock(stats.mu);
      ++stats.errors;
      return;
    }
    std::string pending;
    char chunk[4096];
    auto last = start;
    bool first = true;
    std::vector<double> ttft, itl;
    int64_t tokens = 0;
    while (!parser.is_done()) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof(chunk);
      beast::error_code ec;
      http::read_some(stream, buffer, parser, ec);  // read() would wait for the 4 KiB to fill
      if (ec && ec != http::error::need_buffer) throw beast::system_error(ec);
      pending.append(chunk, sizeof(chunk) - parser.get().body().size);
      size_t at;
      while ((at = pending.find("\n\n")) != std::string::npos) {
        const std::string event = pending.substr(0, at);
        pending.erase(0, at + 2);
        if (event.rfind("data: {", 0) != 0) continue;
        const auto j = nlohmann::json::parse(event.substr(6), nullptr, false);
        if (j.is_discarded() || j["choices"][0]["text"].get<std::string>().empty()) continue;
        const auto now = Clock::now();
        (first ? ttft : itl).push_back(std::chrono::duration<double>(now - (first ? start : last)).count());
        first = false;
        last = now;
        ++tokens;
      }
    }
    std::lock_guard<std::mutex> lock(stats.mu);
    ++stats.requests;
    stats.tokens += tokens;
    stats.ttft.insert(stats.ttft.end(), ttft.begin(), ttft.end());
    stats.itl.insert(stats.itl.end(), itl.begin(), itl.end());
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lock(stats.mu);
    ++stats.errors;
  }
}

// DELETE /v1/sessions/ID (a finished agent's KV is freed).
void DeleteSession(const std::string& host, const std::string& port, const std::string& id) {
  try {
    asio::io_context io;
    tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.connect(resolver.resolve(host, port));
    http::request<http::empty_body> req{http::verb::delete_, "/v1/sessions/" + id, 11};
    req.set(http::field::host, host);
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    http::read(stream, buffer, res);
  } catch (const std::exception&) {
  }
}

int main(int argc, char** argv) {
  std::string host = "127.0.0.1", port = "8000", prompt = "import numpy as np\n\n\ndef softmax(x):\n    ";
  int clients = 4, max_tokens = 64, session_turns = 0;
  double seconds = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i], v = argv[i + 1];
    if (f == "--host") host = v;
    else if (f == "--port") port = v;
    else if (f == "--clients") clients = std::stoi(v);
    else if (f == "--seconds") seconds = std::stod(v);
    else if (f == "--max-tokens") max_tokens = std::stoi(v);
    else if (f == "--prompt") prompt = v;
    else if (f == "--session-turns") session_turns = std::stoi(v);
    else { std::fprintf(stderr, "unknown flag %s\n", f.c_str()); return 2; }
  }
  Stats stats;
  const auto end = Clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> threads;
  std::atomic<int> seed{0};
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      for (int64_t n = 0; Clock::now() < end; ++n) {
        nlohmann::json body = {{"prompt", prompt}, {"max_tokens", max_tokens}, {"stream", true},
                               {"ignore_eos", true}, {"temperature", 0.8}, {"seed", seed++}};
        if (session_turns > 0) {
          const std::string id = "agent-" + std::to_string(c) + "-" + std::to_string(n / session_turns);
          body["session_id"] = id;
          OneRequest(host, port, body.dump(), stats);
          if (n % session_turns == session_turns - 1) DeleteSession(host, port, id);
        } else {
          OneRequest(host, port, body.dump(), stats);
        }
      }
    });
  }
  const auto t0 = Clock::now();
  for (std::thread& t : threads) t.join();
  const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("%d clients, %.0f s (%.1f s with the last requests), max_tokens %d, session turns %d\n", clients, seconds,
              wall, max_tokens, session_turns);
  std::printf("requests %lld (%.2f/s), errors %lld, generated tokens %lld (%.1f/s)\n",
              static_cast<long long>(stats.requests), stats.requests / wall, static_cast<long long>(stats.errors),
              static_cast<long long>(stats.tokens), stats.tokens / wall);
  std::printf("time to first token   p50 %8.1f ms  p90 %8.1f ms  p99 %8.1f ms\n", 1e3 * Percentile(stats.ttft, 0.5),
              1e3 * Percentile(stats.ttft, 0.9), 1e3 * Percentile(stats.ttft, 0.99));
  std::printf("inter-token latency   p50 %8.1f ms  p90 %8.1f ms  p99 %8.1f ms\n", 1e3 * Percentile(stats.itl, 0.5),
              1e3 * Percentile(stats.itl, 0.9), 1e3 * Percentile(stats.itl, 0.99));
  return stats.errors == 0 ? 0 : 1;
}
