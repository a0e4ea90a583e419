#include "bench/serve_bench.h"

#include <utility>  // before Boost 1.74's asio: its awaitable.hpp uses std::exchange

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <semaphore>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace scout::bench {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;
using nlohmann::json;

struct Endpoint {
  std::string host;
  std::string port;
};

absl::Status ParseBaseUrl(const std::string& url, Endpoint* out) {
  constexpr absl::string_view kHttp = "http://";
  if (!absl::StartsWith(url, kHttp)) {
    return absl::InvalidArgumentError(absl::StrCat("--base-url must be http://HOST[:PORT], got \"", url, "\""));
  }
  std::string rest = url.substr(kHttp.size());
  if (const size_t slash = rest.find('/'); slash != std::string::npos) rest.resize(slash);
  const size_t colon = rest.rfind(':');
  if (colon == std::string::npos || rest.back() == ']') {
    out->host = rest;
    out->port = "80";
  } else {
    out->host = rest.substr(0, colon);
    out->port = rest.substr(colon + 1);
  }
  if (!out->host.empty() && out->host.front() == '[' && out->host.back() == ']') {
    out->host = out->host.substr(1, out->host.size() - 2);
  }
  if (out->host.empty() || out->port.empty()) return absl::InvalidArgumentError(absl::StrCat("bad --base-url \"", url, "\""));
  return absl::OkStatus();
}

// One HTTP exchange with a body read whole (for /v1/models and DELETE).
absl::StatusOr<std::pair<int, std::string>> Fetch(const Endpoint& ep, http::verb verb, const std::string& target,
                                                  const std::string& api_key, const std::string& body = "") {
  try {
    asio::io_context io;
    tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.expires_after(std::chrono::seconds(60));
    stream.connect(resolver.resolve(ep.host, ep.port));
    http::request<http::string_body> req{verb, target, 11};
    req.set(http::field::host, ep.host);
    if (!api_key.empty()) req.set(http::field::authorization, "Bearer " + api_key);
    if (!body.empty()) req.set(http::field::content_type, "application/json");
    req.body() = body;
    req.prepare_payload();
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response<http::string_body> res;
    http::read(stream, buffer, res);
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    return std::pair<int, std::string>(res.result_int(), res.body());
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrCat(ep.host, ":", ep.port, target, ": ", e.what()));
  }
}

// What one streamed request did.
struct Outcome {
  bool ok = false;
  std::string error;
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
  double start_s = 0;  // since the benchmark began
  double ttft_s = 0, e2el_s = 0;
  std::vector<double> itl_s;  // between consecutive chunks with text
  int session = -1, turn = -1;
};

// Streams one completion: the time of each server-sent event that carries text, and the usage
// from the final chunk (stream_options.include_usage).
Outcome Stream(const Endpoint& ep, const std::string& target, const std::string& api_key, const json& body,
               bool chat, Clock::time_point bench_start) {
  Outcome o;
  const auto start = Clock::now();
  o.start_s = std::chrono::duration<double>(start - bench_start).count();
  try {
    asio::io_context io;
    tcp::resolver resolver(io);
    beast::tcp_stream stream(io);
    stream.connect(resolver.resolve(ep.host, ep.port));
    http::request<http::string_body> req{http::verb::post, target, 11};
    req.set(http::field::host, ep.host);
    req.set(http::field::content_type, "application/json");
    if (!api_key.empty()) req.set(http::field::authorization, "Bearer " + api_key);
    req.body() = body.dump();
    req.prepare_payload();
    http::write(stream, req);
    beast::flat_buffer buffer;
    http::response_parser<http::buffer_body> parser;
    parser.body_limit(std::numeric_limits<uint64_t>::max());
    http::read_header(stream, buffer, parser);
    const int status = parser.get().result_int();
    std::string pending, whole;
    std::optional<Clock::time_point> last;
    bool done = false;
    char chunk[16384];
    while (!parser.is_done()) {
      parser.get().body().data = chunk;
      parser.get().body().size = sizeof(chunk);
      beast::error_code ec;
      http::read_some(stream, buffer, parser, ec);
      if (ec && ec != http::error::need_buffer) throw beast::system_error(ec);
      const size_t got = sizeof(chunk) - parser.get().body().size;
      const auto now = Clock::now();
      if (status != 200) {
        whole.append(chunk, got);
        continue;
      }
      pending.append(chunk, got);
      for (size_t end; (end = pending.find("\n\n")) != std::string::npos;) {
        const std::string event = pending.substr(0, end);
        pending.erase(0, end + 2);
        if (!absl::StartsWith(event, "data: ")) continue;
        const std::string data = event.substr(6);
        if (data == "[DONE]") {
          done = true;
          continue;
        }
        const json j = json::parse(data, nullptr, false);
        if (j.is_discarded()) continue;
        if (j.contains("error")) {
          o.error = j["error"].value("message", data);
          continue;
        }
        if (j.contains("usage") && j["usage"].is_object()) {
          const json& u = j["usage"];
          o.prompt_tokens = u.value("prompt_tokens", int64_t{0});
          o.completion_tokens = u.value("completion_tokens", int64_t{0});
          if (u.contains("prompt_tokens_details") && u["prompt_tokens_details"].is_object()) {
            o.cached_tokens = u["prompt_tokens_details"].value("cached_tokens", int64_t{0});
          }
        }
        if (!j.contains("choices") || !j["choices"].is_array() || j["choices"].empty()) continue;
        const json& c = j["choices"][0];
        std::string text;
        if (chat && c.contains("delta") && c["delta"].contains("content") && c["delta"]["content"].is_string()) {
          text = c["delta"]["content"].get<std::string>();
        } else if (!chat && c.contains("text") && c["text"].is_string()) {
          text = c["text"].get<std::string>();
        }
        if (text.empty()) continue;
        if (!last.has_value()) {
          o.ttft_s = std::chrono::duration<double>(now - start).count();
        } else {
          o.itl_s.push_back(std::chrono::duration<double>(now - *last).count());
        }
        last = now;
      }
    }
    o.e2el_s = std::chrono::duration<double>(Clock::now() - start).count();
    beast::error_code ec;
    stream.socket().shutdown(tcp::socket::shutdown_both, ec);
    if (status != 200) {
      o.error = absl::StrCat("HTTP ", status, ": ", whole.substr(0, 300));
    } else if (!done && o.error.empty()) {
      o.error = "the stream ended without [DONE]";
    }
    o.ok = o.error.empty() && last.has_value();
    if (o.ok && o.completion_tokens == 0) o.completion_tokens = static_cast<int64_t>(o.itl_s.size()) + 1;
    if (o.error.empty() && !last.has_value()) o.error = "no text came back";
  } catch (const std::exception& e) {
    o.error = e.what();
  }
  return o;
}

struct Percentiles {
  double mean = 0, median = 0;
  std::vector<double> at;  // at the options' percentiles
};

// "p99", "p99.9"
std::string PercentileName(double q) { return absl::StrCat("p", q); }

Percentiles Summarize(std::vector<double> v, const std::vector<double>& percentiles) {
  Percentiles p;
  p.at.assign(percentiles.size(), 0.0);
  if (v.empty()) return p;
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  p.mean = sum / static_cast<double>(v.size());
  auto at = [&](double q) {
    const double pos = q * static_cast<double>(v.size() - 1);
    const size_t lo = static_cast<size_t>(pos);
    const size_t hi = std::min(lo + 1, v.size() - 1);
    return v[lo] + (v[hi] - v[lo]) * (pos - static_cast<double>(lo));
  };
  p.median = at(0.5);
  for (size_t i = 0; i < percentiles.size(); ++i) p.at[i] = at(percentiles[i] / 100.0);
  return p;
}

// A request to send: the body without stream fields, and where it belongs.
struct Planned {
  json body;
  int session = -1, turn = -1;
};

absl::StatusOr<std::vector<json>> ReadDataset(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read --dataset-path ", path));
  std::vector<json> rows;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    json j = json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("prompt")) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", n, ": not a JSON object with \"prompt\""));
    }
    rows.push_back(std::move(j));
  }
  if (rows.empty()) return absl::InvalidArgumentError(absl::StrCat(path, " holds no prompts"));
  return rows;
}

class Runner {
 public:
  Runner(const ServeBenchOptions& o, Endpoint ep, std::string model, json extra)
      : o_(o), ep_(std::move(ep)), model_(std::move(model)), extra_(std::move(extra)), rng_(o.seed) {}

  // Random token ids of length n (the chat endpoint: their bytes as text).
  json RandomPrompt(int n, bool chat) {
    std::uniform_int_distribution<int> tok(o_.token_min, o_.token_max - 1);
    std::vector<int> ids(static_cast<size_t>(std::max(n, 1)));
    for (int& t : ids) t = tok(rng_);
    if (!chat) return ids;
    std::string text(ids.begin(), ids.end());
    return text;
  }

  json Body(const json& prompt, int max_tokens, const std::string& session_id) const {
    const bool chat = IsChat();
    json b = extra_;
    b["model"] = model_;
    if (chat) {
      b["messages"] = json::array({{{"role", "user"}, {"content", prompt}}});
    } else {
      b["prompt"] = prompt;
    }
    b["max_tokens"] = max_tokens;
    b["stream"] = true;
    b["stream_options"] = {{"include_usage", true}};
    if (o_.ignore_eos) b["ignore_eos"] = true;
    if (!b.contains("temperature")) b["temperature"] = 0;
    if (!session_id.empty()) b["session_id"] = session_id;
    return b;
  }

  bool IsChat() const { return absl::StrContains(o_.endpoint, "chat"); }

  absl::StatusOr<std::vector<Planned>> PlanRequests() {
    std::vector<Planned> plan;
    if (!o_.dataset_path.empty()) {
      absl::StatusOr<std::vector<json>> rows = ReadDataset(o_.dataset_path);
      if (!rows.ok()) return rows.status();
      for (int i = 0; i < o_.num_prompts; ++i) {
        const json& r = (*rows)[static_cast<size_t>(i) % rows->size()];
        plan.push_back({.body = Body(r["prompt"], r.value("max_tokens", o_.random_output_len), "")});
      }
      return plan;
    }
    std::uniform_real_distribution<double> u(1 - o_.random_range_ratio, 1 + o_.random_range_ratio);
    for (int i = 0; i < o_.num_prompts; ++i) {
      const int in = std::max(1, static_cast<int>(std::lround(o_.random_input_len * u(rng_))));
      const int out = std::max(1, static_cast<int>(std::lround(o_.random_output_len * u(rng_))));
      plan.push_back({.body = Body(RandomPrompt(in, IsChat()), out, "")});
    }
    return plan;
  }

  // Requests arrive at the rate (gamma gaps of the burstiness' shape; exponential at 1), each on
  // a thread of its own, at most max_concurrency at a time.
  std::vector<Outcome> RunRequests(const std::vector<Planned>& plan) {
    std::vector<Outcome> out(plan.size());
    std::counting_semaphore<> slots(o_.max_concurrency > 0 ? o_.max_concurrency : 1 << 20);
    const double rate = std::isinf(o_.request_rate) ? 1.0 : o_.request_rate;
    std::gamma_distribution<double> gap(o_.burstiness, 1.0 / (rate * o_.burstiness));
    std::vector<std::thread> threads;
    start_ = Clock::now();
    double at = 0;
    for (size_t i = 0; i < plan.size(); ++i) {
      if (!std::isinf(o_.request_rate)) {
        std::this_thread::sleep_until(start_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(at)));
        at += gap(rng_);
      }
      slots.acquire();
      threads.emplace_back([&, i] {
        out[i] = Stream(ep_, o_.endpoint, o_.api_key, plan[i].body, IsChat(), start_);
        slots.release();
      });
    }
    for (std::thread& t : threads) t.join();
    return out;
  }

  // Each session on a thread: turns until its context reaches session_length, then DELETE.
  std::vector<Outcome> RunSessions() {
    std::vector<std::vector<Outcome>> per(o_.sessions);
    std::vector<std::vector<json>> prompts(o_.sessions);
    // Prompts drawn up front, so that the draws do not depend on the threads' order.
    const int64_t per_turn = o_.turn_tokens + o_.session_output_len;
    const int64_t turns = std::max<int64_t>(1, (o_.session_length + per_turn - 1) / per_turn);
    for (int s = 0; s < o_.sessions; ++s) {
      for (int64_t t = 0; t < turns; ++t) prompts[s].push_back(RandomPrompt(o_.turn_tokens, IsChat()));
    }
    std::vector<std::thread> threads;
    start_ = Clock::now();
    for (int s = 0; s < o_.sessions; ++s) {
      threads.emplace_back([&, s] {
        const std::string id = absl::StrCat("bench-", o_.seed, "-", s);
        for (int64_t t = 0; t < turns; ++t) {
          Outcome oc = Stream(ep_, o_.endpoint, o_.api_key, Body(prompts[s][t], o_.session_output_len, id), IsChat(),
                              start_);
          oc.session = s;
          oc.turn = static_cast<int>(t);
          const bool ok = oc.ok;
          per[s].push_back(std::move(oc));
          if (!ok) break;  // the session's context is not what the next turn assumes
        }
        Fetch(ep_, http::verb::delete_, "/v1/sessions/" + id, o_.api_key).IgnoreError();
      });
    }
    for (std::thread& t : threads) t.join();
    std::vector<Outcome> out;
    for (auto& v : per) out.insert(out.end(), v.begin(), v.end());
    return out;
  }

 private:
  const ServeBenchOptions& o_;
  Endpoint ep_;
  std::string model_;
  json extra_;
  std::mt19937_64 rng_;
  Clock::time_point start_;
};

absl::Status Check(const ServeBenchOptions& o) {
  if (o.endpoint != "/v1/completions" && o.endpoint != "/v1/chat/completions") {
    return absl::InvalidArgumentError("--endpoint must be /v1/completions or /v1/chat/completions");
  }
  if (o.sessions < 0 || o.num_prompts < 1 || o.max_concurrency < 0) {
    return absl::InvalidArgumentError("--num-prompts must be >= 1, --sessions and --max-concurrency >= 0");
  }
  if (!(o.request_rate > 0)) return absl::InvalidArgumentError("--request-rate must be > 0 (inf: all at once)");
  if (!(o.burstiness > 0)) return absl::InvalidArgumentError("--burstiness must be > 0 (1: Poisson arrivals)");
  for (double q : o.percentiles) {
    if (!(q > 0 && q < 100)) return absl::InvalidArgumentError(absl::StrCat("--metric-percentiles: in (0, 100), got ", q));
  }
  if (o.random_input_len < 1 || o.random_output_len < 1 || o.random_range_ratio < 0 || o.random_range_ratio >= 1) {
    return absl::InvalidArgumentError("--random-input-len and --random-output-len >= 1, --random-range-ratio in [0, 1)");
  }
  if (o.token_min < 0 || o.token_max <= o.token_min) return absl::InvalidArgumentError("token range is empty");
  if (o.sessions > 0 && (o.turn_tokens < 1 || o.session_output_len < 1 || o.session_length < 1)) {
    return absl::InvalidArgumentError("--turn-tokens, --session-output-len and --session-length must be >= 1");
  }
  if (o.sessions > 0 && o.endpoint != "/v1/completions") {
    return absl::InvalidArgumentError("agent sessions use /v1/completions (each turn's prompt is its new tokens)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status RunServeBench(const ServeBenchOptions& o) {
  if (absl::Status s = Check(o); !s.ok()) return s;
  Endpoint ep;
  if (absl::Status s = ParseBaseUrl(o.base_url, &ep); !s.ok()) return s;
  json extra = json::object();
  if (!o.extra_body.empty()) {
    extra = json::parse(o.extra_body, nullptr, false);
    if (extra.is_discarded() || !extra.is_object()) return absl::InvalidArgumentError("--extra-body must be a JSON object");
  }
  std::string model = o.model;
  if (model.empty()) {
    absl::StatusOr<std::pair<int, std::string>> models = Fetch(ep, http::verb::get, "/v1/models", o.api_key);
    if (!models.ok()) return models.status();
    const json j = json::parse(models->second, nullptr, false);
    if (models->first != 200 || j.is_discarded() || !j.contains("data") || j["data"].empty()) {
      return absl::UnavailableError(absl::StrCat("GET /v1/models: HTTP ", models->first, ": ", models->second.substr(0, 200)));
    }
    model = j["data"][0].value("id", "");
  }
  Runner runner(o, ep, model, extra);
  std::vector<Outcome> outcomes;
  const auto t0 = Clock::now();
  if (o.sessions > 0) {
    outcomes = runner.RunSessions();
  } else {
    absl::StatusOr<std::vector<Planned>> plan = runner.PlanRequests();
    if (!plan.ok()) return plan.status();
    outcomes = runner.RunRequests(*plan);
  }
  const double duration = std::chrono::duration<double>(Clock::now() - t0).count();

  int64_t ok = 0, failed = 0, input = 0, output = 0, cached = 0, good = 0;
  std::vector<double> ttft, tpot, itl, e2el;
  std::string first_error;
  for (const Outcome& oc : outcomes) {
    if (!oc.ok) {
      ++failed;
      if (first_error.empty()) first_error = oc.error;
      continue;
    }
    ++ok;
    input += oc.prompt_tokens;
    output += oc.completion_tokens;
    cached += oc.cached_tokens;
    ttft.push_back(oc.ttft_s * 1e3);
    e2el.push_back(oc.e2el_s * 1e3);
    const double t = oc.completion_tokens > 1 ? (oc.e2el_s - oc.ttft_s) * 1e3 / static_cast<double>(oc.completion_tokens - 1) : 0;
    if (oc.completion_tokens > 1) tpot.push_back(t);
    for (double x : oc.itl_s) itl.push_back(x * 1e3);
    const bool meets = (o.slo_ttft_ms <= 0 || oc.ttft_s * 1e3 <= o.slo_ttft_ms) &&
                       (o.slo_tpot_ms <= 0 || t <= o.slo_tpot_ms) && (o.slo_e2el_ms <= 0 || oc.e2el_s * 1e3 <= o.slo_e2el_ms);
    if (meets) ++good;
  }
  const std::vector<double>& qs = o.percentiles;
  const Percentiles p_ttft = Summarize(ttft, qs), p_tpot = Summarize(tpot, qs), p_itl = Summarize(itl, qs),
                    p_e2el = Summarize(e2el, qs);
  const bool slo = o.slo_ttft_ms > 0 || o.slo_tpot_ms > 0 || o.slo_e2el_ms > 0;

  std::printf("============ Serving Benchmark Result%s%s ============\n", o.label.empty() ? "" : ": ", o.label.c_str());
  std::printf("%-40s %s\n", "Server, model:", absl::StrCat(o.base_url, ", ", model).c_str());
  if (o.sessions > 0) {
    std::printf("%-40s %d sessions to %lld tokens, %d tokens + %d generated a turn\n", "Load:", o.sessions,
                static_cast<long long>(o.session_length), o.turn_tokens, o.session_output_len);
  } else {
    std::printf("%-40s %d requests, rate %s/s, max concurrency %s\n", "Load:", o.num_prompts,
                std::isinf(o.request_rate) ? "inf" : absl::StrCat(o.request_rate).c_str(),
                o.max_concurrency > 0 ? absl::StrCat(o.max_concurrency).c_str() : "none");
  }
  std::printf("%-40s %lld\n", "Successful requests:", static_cast<long long>(ok));
  std::printf("%-40s %lld%s%s\n", "Failed requests:", static_cast<long long>(failed),
              first_error.empty() ? "" : "  first: ", first_error.substr(0, 200).c_str());
  std::printf("%-40s %.2f\n", "Benchmark duration (s):", duration);
  std::printf("%-40s %lld\n", "Total input tokens:", static_cast<long long>(input));
  std::printf("%-40s %lld\n", "Input tokens served from kept KV:", static_cast<long long>(cached));
  std::printf("%-40s %lld\n", "Total generated tokens:", static_cast<long long>(output));
  std::printf("%-40s %.2f\n", "Request throughput (req/s):", static_cast<double>(ok) / duration);
  if (slo) std::printf("%-40s %.2f\n", "Request goodput (req/s):", static_cast<double>(good) / duration);
  std::printf("%-40s %.2f\n", "Output token throughput (tok/s):", static_cast<double>(output) / duration);
  std::printf("%-40s %.2f\n", "Total token throughput (tok/s):", static_cast<double>(input + output) / duration);
  for (const auto& [name, p] : {std::pair{"TTFT", p_ttft}, std::pair{"TPOT", p_tpot}, std::pair{"ITL", p_itl},
                                std::pair{"E2EL", p_e2el}}) {
    std::string label = absl::StrCat(name, " mean / median"), values = absl::StrFormat("%.2f / %.2f", p.mean, p.median);
    for (size_t i = 0; i < qs.size(); ++i) {
      absl::StrAppend(&label, " / ", PercentileName(qs[i]));
      absl::StrAppend(&values, absl::StrFormat(" / %.2f", p.at[i]));
    }
    std::printf("%-40s %s\n", absl::StrCat(label, " (ms):").c_str(), values.c_str());
  }
  std::printf("==================================================\n");
  if (!o.result_json.empty()) {
    auto pj = [&qs](const Percentiles& p) {
      json j = {{"mean_ms", p.mean}, {"median_ms", p.median}};
      for (size_t i = 0; i < qs.size(); ++i) j[PercentileName(qs[i]) + "_ms"] = p.at[i];
      return j;
    };
    json requests = json::array();
    for (const Outcome& oc : outcomes) {
      json r = {{"ok", oc.ok}, {"start_s", oc.start_s}, {"prompt_tokens", oc.prompt_tokens},
                {"completion_tokens", oc.completion_tokens}, {"cached_tokens", oc.cached_tokens},
                {"ttft_ms", oc.ttft_s * 1e3}, {"e2el_ms", oc.e2el_s * 1e3}};
      if (!oc.error.empty()) r["error"] = oc.error;
      if (oc.session >= 0) {
        r["session"] = oc.session;
        r["turn"] = oc.turn;
      }
      requests.push_back(std::move(r));
    }
    json report = {{"label", o.label}, {"base_url", o.base_url}, {"model", model}, {"endpoint", o.endpoint},
                   {"sessions", o.sessions}, {"num_prompts", o.sessions > 0 ? static_cast<int>(outcomes.size()) : o.num_prompts},
                   {"request_rate", std::isinf(o.request_rate) ? json("inf") : json(o.request_rate)},
                   {"burstiness", o.burstiness},
                   {"max_concurrency", o.max_concurrency}, {"duration_s", duration}, {"completed", ok},
                   {"failed", failed}, {"total_input_tokens", input}, {"cached_input_tokens", cached},
                   {"total_output_tokens", output}, {"request_throughput", static_cast<double>(ok) / duration},
                   {"output_throughput", static_cast<double>(output) / duration},
                   {"total_token_throughput", static_cast<double>(input + output) / duration},
                   {"ttft", pj(p_ttft)}, {"tpot", pj(p_tpot)}, {"itl", pj(p_itl)}, {"e2el", pj(p_e2el)},
                   {"requests", requests}};
    if (slo) {
      report["goodput"] = static_cast<double>(good) / duration;
      report["slo_ms"] = {{"ttft", o.slo_ttft_ms}, {"tpot", o.slo_tpot_ms}, {"e2el", o.slo_e2el_ms}};
    }
    std::ofstream f(o.result_json);
    f << report.dump(1) << "\n";
    if (!f) return absl::InternalError(absl::StrCat("cannot write ", o.result_json));
  }
  if (ok == 0) return absl::UnavailableError(absl::StrCat("no request succeeded; first error: ", first_error));
  return absl::OkStatus();
}

}  // namespace scout::bench
