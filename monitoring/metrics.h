// Prometheus metrics of a Scout server (scout_ prefix, units in the names), served as text by
// the HTTP front end's /metrics.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace scout::monitoring {

// Thread-safe: prometheus-cpp metrics are atomic.
class ServerMetrics {
 private:
  std::shared_ptr<prometheus::Registry> registry_;  // first: the metrics below live in it
  prometheus::Family<prometheus::Histogram>* layer_read_ratio_ = nullptr;
  prometheus::Family<prometheus::Counter>* request_success_ = nullptr;
  prometheus::Family<prometheus::Counter>* accepted_per_pos_ = nullptr;

 public:
  ServerMetrics();
  ServerMetrics(const ServerMetrics&) = delete;
  ServerMetrics& operator=(const ServerMetrics&) = delete;

  prometheus::Counter& requests_ok;         // scout_requests_total{outcome="ok"}
  prometheus::Counter& requests_error;      // {outcome="error"}
  prometheus::Counter& requests_cancelled;  // {outcome="cancelled"}
  prometheus::Counter& prompt_tokens;       // scout_prompt_tokens_total
  prometheus::Counter& generation_tokens;   // scout_generation_tokens_total
  prometheus::Counter& draft_tokens;        // scout_spec_decode_num_draft_tokens_total
  prometheus::Counter& accepted_tokens;     // scout_spec_decode_num_accepted_tokens_total
  // scout_spec_decode_num_accepted_tokens_per_pos_total{position="i"} (vLLM's per-position
  // counter): rounds whose draft token at position i (0-based) was accepted.
  prometheus::Counter& AcceptedAtPosition(int position);
  prometheus::Gauge& requests_running;      // scout_num_requests_running
  prometheus::Gauge& requests_waiting;      // scout_num_requests_waiting
  prometheus::Histogram& time_to_first_token;  // scout_time_to_first_token_seconds
  prometheus::Histogram& inter_token_latency;  // scout_inter_token_latency_seconds
  // A request's life, as vLLM names them: arrival to its last token; waiting before it started;
  // started to its first token (prefill); first token to last (decode). Finished requests only.
  prometheus::Histogram& e2e_request_latency;   // scout_e2e_request_latency_seconds
  prometheus::Histogram& request_queue_time;    // scout_request_queue_time_seconds
  prometheus::Histogram& request_prefill_time;  // scout_request_prefill_time_seconds
  prometheus::Histogram& request_decode_time;   // scout_request_decode_time_seconds
  prometheus::Histogram& request_prompt_tokens;      // scout_request_prompt_tokens (prefilled)
  prometheus::Histogram& request_generation_tokens;  // scout_request_generation_tokens
  // Prompt tokens a session served from its kept KV instead of prefilling (vLLM's prefix-cache hits).
  prometheus::Counter& session_cached_tokens;        // scout_session_cached_tokens_total
  // scout_request_success_total{finished_reason="stop"|"length"|"cancelled"}.
  prometheus::Counter& RequestSuccess(const std::string& finish_reason);
  prometheus::Gauge& kv_cache_usage;        // scout_kv_cache_usage_ratio: KV pool blocks in use / all
  prometheus::Counter& sessions_evicted;    // scout_sessions_evicted_total: idle sessions whose KV was dropped
  prometheus::Histogram& decode_batch_size;  // scout_decode_batch_size: requests per decode pass
  // Prefill passes (at most --max-num-batched-tokens each): prompt tokens through them, and each
  // pass's time; prefill throughput = rate(tokens) / rate(pass seconds sum).
  prometheus::Counter& prefill_tokens;       // scout_prefill_tokens_total
  prometheus::Histogram& prefill_pass_time;  // scout_prefill_pass_seconds
  // Sparse attention (STS) of the target's verification passes, in (layer, KV head, 16-token
  // block) units: read, and what dense attention would have read; sparsity = 1 - read / dense.
  prometheus::Counter& attention_blocks_read;        // scout_attention_blocks_read_total
  prometheus::Counter& attention_blocks_dense;       // scout_attention_blocks_dense_total
  prometheus::Counter& attention_kv_bytes_skipped;   // scout_attention_kv_skipped_bytes_total
  // The sparse draft's own steps (--sparse-draft), in the draft's units: read, and what its dense
  // steps would have read; the draft's sparsity = 1 - read / dense.
  prometheus::Counter& draft_attention_blocks_read;   // scout_draft_attention_blocks_read_total
  prometheus::Counter& draft_attention_blocks_dense;  // scout_draft_attention_blocks_dense_total
  prometheus::Histogram& attention_blocks_read_ratio;  // scout_attention_blocks_read_ratio (per request)
  // scout_attention_layer_blocks_read_ratio{layer="L"}: the same per target layer (per request).
  prometheus::Histogram& LayerBlocksReadRatio(int layer);
  // The host KV tier (--host-kv-gb): every session's KV in host memory, a GPU block cache of
  // (layer, KV head, block) units. With --host-kv-gb, scout_kv_cache_usage_ratio is the host
  // store's (it bounds admission).
  prometheus::Counter& kv_prefetch_bytes;      // scout_kv_prefetch_bytes_total: host -> GPU
  prometheus::Counter& kv_prefetch_seconds;    // scout_kv_prefetch_seconds_total: GPU time of those transfers
  prometheus::Counter& kv_flush_bytes;         // scout_kv_flush_bytes_total: GPU -> host write-back
  prometheus::Counter& kv_block_cache_hits;    // scout_kv_block_cache_hits_total (units)
  prometheus::Counter& kv_block_cache_misses;  // scout_kv_block_cache_misses_total (units)
  prometheus::Gauge& gpu_block_cache_usage;    // scout_gpu_block_cache_usage_ratio

  // Families computed at scrape time from state kept elsewhere (a coordinator's cluster), served
  // after the registry's. The function must be thread-safe and outlive this object's use.
  using Collector = std::function<std::vector<prometheus::MetricFamily>()>;
  void AddCollector(Collector collector);

  // The text exposition format (what Prometheus scrapes).
  std::string Serialize() const;

 private:
  mutable std::mutex collectors_mu_;
  std::vector<Collector> collectors_;
};

}  // namespace scout::monitoring
