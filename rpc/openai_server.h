// The OpenAI-compatible HTTP front end over the serving engine: /v1/completions (streaming as
// server-sent events), /v1/models, /health, /metrics.
#pragma once

#include <string>

#include "monitoring/metrics.h"
#include "rpc/http_server.h"
#include "runtime/chat_template.h"
#include "scheduler/engine.h"

namespace scout::rpc {

// The handler for HttpServer. engine, metrics and chat_template must outlive the server.
// /v1/chat/completions renders `messages` (and `tools`) with chat_template, the model folder's
// (runtime::LoadChatTemplate); without one, with the fixtures' "Role: content" lines.
HttpHandler MakeOpenAiHandler(scheduler::Engine* engine, monitoring::ServerMetrics* metrics,
                              const std::string& model_name,
                              const runtime::ModelChatTemplate* chat_template = nullptr);

}  // namespace scout::rpc
