// scout calibrate: chooses, for every target (layer, KV head), the draft attention heads whose
// block scores best cover the target's own attention on calibration text.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "eval/fidelity.h"  // WalkRounds, and the runtime names the module uses
#include "runtime/backend.h"
#include "runtime/sts.h"

namespace scout::eval {

struct CalibrateOptions {
  int64_t context_tokens = 2048;
  int64_t calib_tokens = 1024;
  int num_speculative_tokens = 4;
  double budget_fraction = 0.1;  // the budget at which coverage is measured
  int max_heads_per_unit = 3;    // heads are added greedily while coverage improves
  int sink_blocks = 1;
  int window_blocks = 4;
};

struct CalibrationReport {
  HeadMap map;
  std::vector<double> unit_recall;     // per target unit: captured target mass with its heads
  std::vector<double> default_recall;  // the same with DefaultHeadMap, for comparison
};

// Teacher-forces ids through both models (WalkRounds) and, per target unit, greedily builds the
// set of draft heads whose selection (the STS rule at budget_fraction) captures the most of the
// target's attention mass, averaged over rounds. Errors as WalkRounds.
absl::StatusOr<CalibrationReport> CalibrateHeadMap(ModelBackend& target, ModelBackend& draft,
                                                   std::span<const int32_t> ids, const CalibrateOptions& options);

}  // namespace scout::eval
