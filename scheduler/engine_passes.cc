// The engine's plain decode path: prefill passes, decode steps with prompt chunks riding on
// them, sampling the rows, and what a failed pass does (policy::OnFailedPass).
#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "kvstore/block_table.h"
#include "scheduler/engine.h"
#include "scheduler/engine_request.h"
#include "scheduler/policy.h"

namespace scout::scheduler {

void Engine::PrefillPass(const std::vector<Request*>& prefilling, int64_t budget) {
  const auto pass_start = Clock::now();
  if (budget <= 0) budget = options_.max_num_batched_tokens;
  int64_t tokens = 0;
  if (draft_ != nullptr) {
    std::vector<round::SpeculativeStream*> streams;
    std::vector<Request*> owners;
    for (Request* r : prefilling) {
      if (r->spec != nullptr) {
        streams.push_back(r->spec.get());
        owners.push_back(r);
      }
    }
    std::vector<int64_t> before(streams.size());
    for (size_t i = 0; i < streams.size(); ++i) before[i] = streams[i]->prefilled_tokens();
    const std::vector<absl::Status> status =
        round::PrefillStep(*model_, *draft_, streams, budget);
    for (size_t i = 0; i < owners.size(); ++i) {
      tokens += streams[i]->prefilled_tokens() - before[i];
      if (!status[i].ok()) {
        FinishSpeculative(*owners[i], status[i]);
      } else if (streams[i]->prefilled()) {
        owners[i]->prefilling = false;
      }
    }
  } else {
    // Each request's prompt runs to its end; the row of its last prompt token gives its first
    // token.
    std::vector<Request*> who;
    std::vector<int64_t> n;
    int64_t room = std::max<int64_t>(1, budget);
    for (Request* r : prefilling) {
      if (room <= 0) break;
      const int64_t left = static_cast<int64_t>(r->ids.size()) - r->prefilled;
      if (left <= 0) continue;
      who.push_back(r);
      n.push_back(std::min(room, left));
      room -= n.back();
    }
    ChunkOutputs out;
    if (RunChunks({}, who, n, &out).ok()) {
      for (size_t j = 0; j < who.size(); ++j) tokens += TakeChunk(*who[j], n[j], out, j);
    } else {  // all or nothing failed: again one by one, so the error is the request's own
      for (size_t j = 0; j < who.size(); ++j) {
        if (absl::Status s = RunChunks({}, {&who[j], 1}, {&n[j], 1}, &out); !s.ok()) {
          Finish(*who[j], s);
          continue;
        }
        tokens += TakeChunk(*who[j], n[j], out, 0);
      }
    }
    for (Request* r : prefilling) {  // nothing to prefill: an empty prompt
      if (r->started && r->prefilling && r->ids.empty()) {
        Finish(*r, absl::InvalidArgumentError("nothing to prefill: the prompt is empty"));
      }
    }
  }
  if (tokens > 0) {
    metrics_->prefill_tokens.Increment(static_cast<double>(tokens));
    metrics_->prefill_pass_time.Observe(std::chrono::duration<double>(Clock::now() - pass_start).count());
  }
  UpdateKvMetrics();
}

void Engine::NameTokens(std::optional<runtime::TokenLogprobs>& lp) const {
  if (!lp.has_value()) return;
  lp->chosen.bytes = tokenizer_->Decode({&lp->chosen.token, 1}).value_or("");
  for (runtime::TokenLogprob& t : lp->top) t.bytes = tokenizer_->Decode({&t.token, 1}).value_or("");
}

kernels::SampleRowParams Engine::SampleRow(const Request& r) const {
  // Device sampling draws from a seed per (request seed, position): reproducible per request
  // whatever the batch around it, and whichever pass (prefill or decode step) samples it.
  const runtime::SamplingParams& sp = r.req.sampling;
  return {.temperature = sp.temperature, .top_k = sp.top_k, .top_p = sp.top_p,
          .seed = sp.seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(r.result.completion_tokens)};
}

absl::Status Engine::RunChunks(std::span<Request* const> decoding, std::span<Request* const> chunked,
                               std::span<const int64_t> chunk_tokens, ChunkOutputs* out) {
  std::vector<runtime::SequenceInput> batch;
  std::vector<kernels::SampleRowParams> rows;
  for (Request* r : decoding) {
    batch.push_back({.seq = r->seq, .tokens = std::span<const int32_t>(&r->last_token, 1)});
    rows.push_back(SampleRow(*r));
  }
  for (size_t j = 0; j < chunked.size(); ++j) {
    const Request& r = *chunked[j];
    batch.push_back({.seq = r.seq, .tokens = std::span<const int32_t>(r.ids).subspan(r.prefilled, chunk_tokens[j])});
    rows.push_back(SampleRow(r));
  }
  out->first_chunk_row = decoding.size();
  if (batch.empty()) return absl::OkStatus();
  return model_->samples_on_device() ? model_->ForwardSampled(batch, rows, &out->sampled)
                                     : model_->Forward(batch, &out->logits);
}

int32_t Engine::TokenOfRow(Request& r, const ChunkOutputs& out, size_t row) {
  if (model_->samples_on_device()) return out.sampled[row];
  const int64_t vocab = config_.vocab_size;
  return r.sampler.Sample(std::span<const float>(out.logits).subspan(row * vocab, vocab));
}

bool Engine::TakeToken(Request& r, const ChunkOutputs& out, size_t row) {
  const bool penalized = r.req.penalties.any();
  int32_t token = penalized ? -1 : TokenOfRow(r, out, row);
  std::optional<runtime::TokenLogprobs> lp;
  if (r.req.logprobs.has_value() || penalized) {
    const int64_t vocab = config_.vocab_size;
    std::span<const float> logits;
    std::vector<float> fetched;
    if (model_->samples_on_device()) {
      const int64_t rows[] = {static_cast<int64_t>(row)};
      if (absl::Status s = model_->LastLogitRows(rows, &fetched); !s.ok()) {
        Finish(r, s);
        return false;
      }
    } else if (penalized) {
      fetched.assign(out.logits.begin() + row * vocab, out.logits.begin() + (row + 1) * vocab);
    }
    logits = fetched.empty() ? std::span<const float>(out.logits).subspan(row * vocab, vocab) : fetched;
    std::vector<float> raw;  // logprobs are of the model's distribution after temperature, before penalties
    if (penalized && r.req.logprobs.has_value()) {
      raw.assign(logits.begin(), logits.end());
      logits = raw;
    }
    if (penalized) {
      // The request's own sampler draws from the penalised row, on the host: its draws depend on
      // its seed and its tokens alone, whatever the batch.
      std::vector<std::pair<int32_t, int32_t>> counts(r.generated_counts.begin(), r.generated_counts.end());
      std::vector<int32_t> seen;  // the prompt's and the output's tokens, once each
      if (r.req.penalties.repetition != 1.0f) {
        seen = r.ids;
        for (const auto& [t, c] : r.generated_counts) seen.push_back(t);
        std::sort(seen.begin(), seen.end());
        seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
      }
      runtime::ApplyPenalties(r.req.penalties, counts, seen, fetched);
      token = r.sampler.Sample(fetched);
      ++r.generated_counts[token];
    }
    if (r.req.logprobs.has_value()) lp = runtime::LogprobsOf(logits, token, *r.req.logprobs, r.req.sampling.temperature);
  }
  NameTokens(lp);
  if (OnToken(r, token, std::move(lp))) return true;
  Finish(r, absl::OkStatus());
  return false;
}

int64_t Engine::TakeChunk(Request& r, int64_t n, const ChunkOutputs& out, size_t chunk) {
  r.prefilled += n;
  if (r.prefilled < static_cast<int64_t>(r.ids.size())) return n;
  r.prefilling = false;
  TakeToken(r, out, out.first_chunk_row + chunk);
  return n;
}

void Engine::DecodeStep(std::vector<Request*>& running, const std::vector<Request*>& prefilling) {
  if (draft_ != nullptr) return SpeculativeStep(running);
  // Requests cancelled by their callers leave before the pass.
  for (Request* r : running) {
    if (r->cancelled) Finish(*r, absl::OkStatus());
  }
  running.erase(std::remove_if(running.begin(), running.end(), [](Request* r) { return !r->started; }), running.end());
  // Prompt chunks that ride on this step, sized by the pacer.
  std::vector<Request*> chunked;
  std::vector<int64_t> chunk_tokens;
  double work = 0;
  if (!prefilling.empty() && !running.empty()) {
    std::vector<PrefillPacer::Prompt> prompts;
    for (Request* r : prefilling) {
      prompts.push_back({.start = r->earlier + r->prefilled, .left = static_cast<int64_t>(r->ids.size()) - r->prefilled});
    }
    // The decoders' tokens count against the bound, but prompts always move a little.
    const std::vector<int64_t> plan = pacer_.Plan(
        prompts, std::max<int64_t>(options_.max_num_batched_tokens - static_cast<int64_t>(running.size()),
                                   PrefillPacer::kMinChunk));
    for (size_t i = 0; i < plan.size(); ++i) {
      if (plan[i] <= 0) continue;
      chunked.push_back(prefilling[i]);
      chunk_tokens.push_back(plan[i]);
      work += pacer_.Work(prompts[i].start, plan[i]);
    }
  }
  ChunkOutputs out;
  bool mixed = !chunked.empty(), mixed_failed = false;
  double seconds = 0;
  auto pass = [&]() -> absl::Status {
    const auto t0 = Clock::now();
    absl::Status s = RunChunks(running, mixed ? std::span<Request* const>(chunked) : std::span<Request* const>(),
                               chunk_tokens, &out);
    if (!s.ok() && mixed) {
      // The chunks go back to a pass of their own (where an error is each prompt's own); the
      // decoders' step runs without them.
      mixed = false;
      mixed_failed = true;
      s = RunChunks(running, {}, {}, &out);
    }
    seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return s;
  };
  const bool stepped = RunBatchedPass(running, pass, [this](Request& r, absl::Status s) { Finish(r, s); });
  if (stepped && !mixed_failed) {
    if (mixed) {
      pacer_.ObserveMixedStep(work, seconds);
    } else {
      pacer_.ObserveDecodeStep(seconds);
    }
  }
  if (stepped) {
    for (size_t i = 0; i < running.size(); ++i) {
      TakeToken(*running[i], out, i);
    }
  }
  if (mixed && stepped) {
    int64_t tokens = 0;
    for (size_t j = 0; j < chunked.size(); ++j) tokens += TakeChunk(*chunked[j], chunk_tokens[j], out, j);
    metrics_->prefill_tokens.Increment(static_cast<double>(tokens));
  } else if (mixed_failed) {
    PrefillPass(prefilling);  // the chunks did not run with the step
  }
}

bool Engine::RunBatchedPass(std::vector<Request*>& running, absl::FunctionRef<absl::Status()> pass,
                            absl::FunctionRef<void(Request&, absl::Status)> finish) {
  while (!running.empty()) {
    const absl::Status s = pass();
    if (s.ok()) break;
    auto of = [&](int64_t id) {
      return std::find_if(running.begin(), running.end(), [id](Request* r) { return r->seq == id; });
    };
    const policy::PassFailure f =
        policy::OnFailedPass(s, running.size(), [&](int64_t id) { return of(id) != running.end(); });
    switch (f.action) {
      case policy::PassFailure::kEndOne: {  // its KV was lost with a KV store node
        auto it = of(f.sequence);
        finish(**it, s);
        running.erase(it);
        break;
      }
      case policy::PassFailure::kSitOutNewest:  // runs again once the others leave room
        running.pop_back();
        break;
      case policy::PassFailure::kEndNewest:  // the KV pool is full: the others keep running
        finish(*running.back(), s);
        running.pop_back();
        break;
      case policy::PassFailure::kEndAll:
        for (Request* r : running) finish(*r, s);
        running.clear();
        break;
    }
  }
  if (running.empty()) return false;
  {
    absl::MutexLock lock(&mu_);
    ++stats_.decode_steps;
    stats_.max_batch = std::max(stats_.max_batch, static_cast<int>(running.size()));
  }
  metrics_->decode_batch_size.Observe(static_cast<double>(running.size()));
  UpdateKvMetrics();
  return true;
}

}  // namespace scout::scheduler
