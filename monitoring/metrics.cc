#include "monitoring/metrics.h"

#include "prometheus/text_serializer.h"

namespace scout::monitoring {
namespace {

prometheus::Family<prometheus::Counter>& Requests(prometheus::Registry& r) {
  return prometheus::BuildCounter().Name("scout_requests_total").Help("Completion requests by outcome").Register(r);
}

prometheus::Counter& NewCounter(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildCounter().Name(name).Help(help).Register(r).Add({});
}

prometheus::Gauge& NewGauge(prometheus::Registry& r, const char* name, const char* help) {
  return prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
}

prometheus::Histogram& NewHistogram(prometheus::Registry& r, const char* name, const char* help,
                                    prometheus::Histogram::BucketBoundaries buckets) {
  return prometheus::BuildHistogram().Name(name).Help(help).Register(r).Add({}, std::move(buckets));
}

}  // namespace

ServerMetrics::ServerMetrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_ok(Requests(*registry_).Add({{"outcome", "ok"}})),
      requests_error(Requests(*registry_).Add({{"outcome", "error"}})),
      requests_cancelled(Requests(*registry_).Add({{"outcome", "cancelled"}})),
      prompt_tokens(NewCounter(*registry_, "scout_prompt_tokens_total", "Prompt tokens processed")),
      generation_tokens(NewCounter(*registry_, "scout_generation_tokens_total", "Tokens generated")),
      draft_tokens(NewCounter(*registry_, "scout_spec_decode_num_draft_tokens_total", "Draft tokens proposed")),
      accepted_tokens(NewCounter(*registry_, "scout_spec_decode_num_accepted_tokens_total", "Draft tokens accepted")),
      requests_running(NewGauge(*registry_, "scout_num_requests_running", "Requests generating now")),
      requests_waiting(NewGauge(*registry_, "scout_num_requests_waiting", "Requests queued")),
      // Long prompts prefill for minutes: buckets reach 10 minutes.
      time_to_first_token(NewHistogram(*registry_, "scout_time_to_first_token_seconds", "Time to first token",
                                       {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600})),
      inter_token_latency(NewHistogram(*registry_, "scout_inter_token_latency_seconds", "Time between tokens",
                                       {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5})),
      e2e_request_latency(NewHistogram(*registry_, "scout_e2e_request_latency_seconds",
                                       "Request arrival to its last token",
                                       {0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800})),
      request_queue_time(NewHistogram(*registry_, "scout_request_queue_time_seconds",
                                      "Time a request waited before it started",
                                      {0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300})),
      request_prefill_time(NewHistogram(*registry_, "scout_request_prefill_time_seconds",
                                        "Request start to its first token (prefill)",
                                        {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600})),
      request_decode_time(NewHistogram(*registry_, "scout_request_decode_time_seconds",
                                       "A request's first token to its last (decode)",
                                       {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600})),
      request_prompt_tokens(NewHistogram(*registry_, "scout_request_prompt_tokens", "Prompt tokens prefilled per request",
                                         {16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576})),
      request_generation_tokens(NewHistogram(*registry_, "scout_request_generation_tokens", "Tokens generated per request",
                                             {1, 4, 16, 64, 256, 1024, 4096, 16384})),
      session_cached_tokens(NewCounter(*registry_, "scout_session_cached_tokens_total",
                                       "Prompt tokens served from a session's kept KV instead of prefilled")),
      kv_cache_usage(NewGauge(*registry_, "scout_kv_cache_usage_ratio", "Fraction of the KV pool's blocks in use")),
      sessions_evicted(NewCounter(*registry_, "scout_sessions_evicted_total",
                                  "Idle agent sessions whose KV was dropped (idle timeout or KV pressure)")),
      decode_batch_size(NewHistogram(*registry_, "scout_decode_batch_size", "Requests carried by one decode pass",
                                     {1, 2, 4, 8, 16, 32, 64, 128, 256})),
      prefill_tokens(NewCounter(*registry_, "scout_prefill_tokens_total", "Prompt tokens prefilled (in passes of their own or riding on decode steps)")),
      prefill_pass_time(NewHistogram(*registry_, "scout_prefill_pass_seconds",
                                     "Time of one prefill pass of its own (at most --max-num-batched-tokens tokens)",
                                     {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10})),
      attention_blocks_read(NewCounter(*registry_, "scout_attention_blocks_read_total",
                                       "KV units (layer, KV head, block) the target's sparse attention read")),
      attention_blocks_dense(NewCounter(*registry_, "scout_attention_blocks_dense_total",
                                        "KV units dense attention would have read in the same passes")),
      attention_kv_bytes_skipped(NewCounter(*registry_, "scout_attention_kv_skipped_bytes_total",
                                            "KV bytes the target's attention did not read thanks to sparsity")),
      draft_attention_blocks_read(NewCounter(*registry_, "scout_draft_attention_blocks_read_total",
                                             "KV units (layer, KV head, block) the draft's attention read in its steps")),
      draft_attention_blocks_dense(NewCounter(*registry_, "scout_draft_attention_blocks_dense_total",
                                              "KV units the draft's steps would have read attending densely")),
      attention_blocks_read_ratio(NewHistogram(*registry_, "scout_attention_blocks_read_ratio",
                                               "Share of the context's KV blocks a request's verification read",
                                               {0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1})),
      kv_prefetch_bytes(NewCounter(*registry_, "scout_kv_prefetch_bytes_total",
                                   "KV bytes moved host -> GPU by the host KV tier's prefetch")),
      kv_prefetch_seconds(NewCounter(*registry_, "scout_kv_prefetch_seconds_total",
                                     "GPU time of the host KV tier's transfers (bandwidth: bytes rate / this rate)")),
      kv_flush_bytes(NewCounter(*registry_, "scout_kv_flush_bytes_total",
                                "New tokens' KV bytes written back GPU -> host by the host KV tier")),
      kv_block_cache_hits(NewCounter(*registry_, "scout_kv_block_cache_hits_total",
                                     "Selected KV units the GPU block cache already held (host KV tier)")),
      kv_block_cache_misses(NewCounter(*registry_, "scout_kv_block_cache_misses_total",
                                       "Selected KV units fetched from host memory (host KV tier)")),
      gpu_block_cache_usage(NewGauge(*registry_, "scout_gpu_block_cache_usage_ratio",
                                     "Fraction of the GPU block cache's units holding KV (host KV tier)")) {
  layer_read_ratio_ = &prometheus::BuildHistogram()
                           .Name("scout_attention_layer_blocks_read_ratio")
                           .Help("Share of the context's KV blocks a request's verification read, per target layer")
                           .Register(*registry_);
  request_success_ = &prometheus::BuildCounter()
                          .Name("scout_request_success_total")
                          .Help("Requests finished without error, by why they ended")
                          .Register(*registry_);
  accepted_per_pos_ = &prometheus::BuildCounter()
                           .Name("scout_spec_decode_num_accepted_tokens_per_pos_total")
                           .Help("Speculative rounds whose draft token at this position was accepted")
                           .Register(*registry_);
}

prometheus::Histogram& ServerMetrics::LayerBlocksReadRatio(int layer) {
  // Family::Add returns the existing histogram for labels it has seen.
  return layer_read_ratio_->Add({{"layer", std::to_string(layer)}},
                                prometheus::Histogram::BucketBoundaries{0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1});
}

void ServerMetrics::AddCollector(Collector collector) {
  std::lock_guard<std::mutex> lock(collectors_mu_);
  collectors_.push_back(std::move(collector));
}

std::string ServerMetrics::Serialize() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  std::lock_guard<std::mutex> lock(collectors_mu_);
  for (const Collector& c : collectors_) {
    std::vector<prometheus::MetricFamily> more = c();
    families.insert(families.end(), std::make_move_iterator(more.begin()), std::make_move_iterator(more.end()));
  }
  return prometheus::TextSerializer().Serialize(families);
}

prometheus::Counter& ServerMetrics::AcceptedAtPosition(int position) {
  return accepted_per_pos_->Add({{"position", std::to_string(position)}});
}

prometheus::Counter& ServerMetrics::RequestSuccess(const std::string& finish_reason) {
  return request_success_->Add({{"finished_reason", finish_reason}});
}

}  // namespace scout::monitoring
