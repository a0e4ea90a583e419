// `scout bench serve`: load against any OpenAI-compatible server, in the style of `vllm bench
// serve`. Requests arrive at a rate (Poisson) or all at once, at most max_concurrency in flight;
// their prompts are random token ids of random lengths, or read from a JSONL file; or the load is
// agent sessions: conversations on a session_id whose context grows by turn_tokens a turn until
// it reaches session_length (Scout's workload: each turn's prompt is only the new tokens, the
// server keeps the rest). Every request streams; the report gives request and token throughput,
// TTFT, TPOT, ITL and end-to-end latency (mean, median, p99) and goodput under SLOs, and a JSON
// file holds it with every request's figures.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace scout::bench {

struct ServeBenchOptions {
  std::string base_url = "http://127.0.0.1:8000";  // http only
  std::string endpoint = "/v1/completions";        // or /v1/chat/completions
  std::string model;                               // empty: the server's first /v1/models entry
  std::string api_key;                             // sent as Authorization: Bearer
  int num_prompts = 100;
  double request_rate = std::numeric_limits<double>::infinity();  // requests/s; inf: all at once
  // Arrival gaps are gamma-distributed with this shape and the rate's mean, as vllm bench serve's
  // --burstiness: 1 is Poisson, below 1 burstier, above 1 more even.
  double burstiness = 1.0;
  // Percentiles reported beside the mean and median of every latency (vllm's --metric-percentiles).
  std::vector<double> percentiles = {99};
  int max_concurrency = 0;                                        // 0: unbounded
  uint64_t seed = 0;
  // Random prompts: input lengths uniform in [len * (1 - ratio), len * (1 + ratio)], token ids
  // drawn from [token_min, token_max) (printable bytes by default: ordinary tokens of byte-level
  // and BPE vocabularies alike). The chat endpoint gets the same bytes as text.
  int random_input_len = 1024;
  int random_output_len = 128;
  double random_range_ratio = 0.0;
  int token_min = 32;
  int token_max = 127;
  // JSONL dataset: one object a line with "prompt" (string or token ids) and optional
  // "max_tokens"; used in order, cycled to num_prompts.
  std::string dataset_path;
  // Agent sessions (sessions > 0 replaces the requests above): each session sends turns of
  // turn_tokens random tokens and session_output_len generated ones on its own session_id, one
  // turn at a time, until its context reaches session_length; then it deletes the session.
  int sessions = 0;
  int turn_tokens = 1024;
  int64_t session_length = 32768;
  int session_output_len = 64;
  bool ignore_eos = true;
  // Extra JSON fields merged into every request body (e.g. {"sparsity": "sts"}).
  std::string extra_body;
  // Goodput SLOs in milliseconds (0: not set): a request counts as good when it meets every one set.
  double slo_ttft_ms = 0, slo_tpot_ms = 0, slo_e2el_ms = 0;
  std::string label;
  std::string result_json;  // write the report and every request's figures here
};

// Runs the benchmark and prints the report. InvalidArgument for bad options; Unavailable when the
// server cannot be reached at all. Requests that fail are counted and reported, not errors.
absl::Status RunServeBench(const ServeBenchOptions& options);

}  // namespace scout::bench
