// The OpenAI-compatible HTTP front end over the serving engine: /v1/completions (streaming as
// server-sent events), /v1/models, /health, /metrics.
#pragma once

#include <string>

#include "monitoring/metrics.h"
#include "rpc/http_server.h"
#include "scheduler/engine.h"

namespace scout::rpc {

// The handler for HttpServer. engine and metrics must outlive the server.
HttpHandler MakeOpenAiHandler(scheduler::Engine* engine, monitoring::ServerMetrics* metrics,
                              const std::string& model_name);

}  // namespace scout::rpc
