#include "kvstore/kv_pool.h"

#include <new>

#include "absl/strings/str_cat.h"

namespace scout::kvstore {

KvPool::KvPool(const KvPoolShape& shape, std::unique_ptr<float[]> data)
    : shape_(shape),
      block_stride_(int64_t{shape.num_kv_heads} * 2 * kBlockSize * shape.head_dim),
      layer_stride_(block_stride_ * shape.num_blocks),
      data_(std::move(data)) {}

absl::StatusOr<std::unique_ptr<KvPool>> KvPool::Create(const KvPoolShape& shape) {
  if (shape.num_layers <= 0 || shape.num_kv_heads <= 0 || shape.head_dim <= 0 || shape.num_blocks <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV pool shape must be positive: layers=", shape.num_layers, " kv_heads=", shape.num_kv_heads,
        " head_dim=", shape.head_dim, " blocks=", shape.num_blocks));
  }
  int64_t floats = int64_t{shape.num_layers} * shape.num_blocks * shape.num_kv_heads * 2 * kBlockSize *
                   shape.head_dim;
  std::unique_ptr<float[]> data(new (std::nothrow) float[floats]());
  if (data == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot allocate KV pool of ", floats * sizeof(float), " bytes"));
  }
  return std::unique_ptr<KvPool>(new KvPool(shape, std::move(data)));
}

}  // namespace scout::kvstore
