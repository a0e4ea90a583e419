// The OpenAI-compatible HTTP front end over the serving engine: /v1/completions (streaming as
// server-sent events), /v1/models, /health, /metrics.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "monitoring/metrics.h"
#include "server/http_server.h"
#include "text/chat_template.h"
#include "text/tokenizer.h"
#include "scheduler/completion_service.h"

namespace scout::server {

struct FrontEndOptions {
  // Empty: every client is served (one tenant). Otherwise /v1/*, /tokenize and /detokenize answer 401 without
  // `Authorization: Bearer KEY` for one of these keys, and each key is a tenant: a session
  // belongs to the key that made it, and another key neither lists, continues nor deletes it
  // (the same id under another key is another session). /health, /ready and /metrics stay open.
  std::vector<std::string> api_keys;
  // The model's tokenizer for /tokenize and /detokenize (vLLM's): a copy of its own, used under
  // the handler's lock (the BPE tokenizer is not thread-safe). Null: those routes answer 501.
  std::shared_ptr<const text::Tokenizer> tokenizer;
};

// The version /version reports (the CMake project's).
const char* ScoutVersion();

// The handler for HttpServer. engine, metrics and chat_template must outlive the server.
// /v1/chat/completions renders `messages` (and `tools`) with chat_template, the model folder's
// (text::LoadChatTemplate); without one, with the fixtures' "Role: content" lines. Session ids
// are at most 128 bytes of [A-Za-z0-9._:-] (400 otherwise).
HttpHandler MakeOpenAiHandler(scheduler::CompletionService* engine, monitoring::ServerMetrics* metrics,
                              const std::string& model_name,
                              const text::ModelChatTemplate* chat_template = nullptr,
                              const FrontEndOptions& options = {});

}  // namespace scout::server
