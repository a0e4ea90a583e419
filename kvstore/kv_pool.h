// Storage of a paged KV cache in host memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/statusor.h"
#include "kvstore/block_allocator.h"

namespace scout::kvstore {

struct KvPoolShape {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int32_t num_blocks = 0;
};

// Layout: [layer][block][kv_head][K then V][kBlockSize][head_dim], float32. One (layer, block,
// head) unit (its keys then its values) is contiguous: it is what a Selection names and what the
// prefetcher moves. Memory is zero-initialised. Not thread-safe for concurrent writes to the same
// block; distinct blocks may be written concurrently.
class KvPool {
 public:
  // InvalidArgument for a non-positive dimension, ResourceExhausted if the memory cannot be had.
  static absl::StatusOr<std::unique_ptr<KvPool>> Create(const KvPoolShape& shape);
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  const KvPoolShape& shape() const { return shape_; }
  // Floats between consecutive blocks of one layer: num_kv_heads * 2 * kBlockSize * head_dim.
  int64_t block_stride() const { return block_stride_; }
  // Start of one layer: [num_blocks][num_kv_heads][2][kBlockSize][head_dim].
  float* layer(int layer) { return data_.get() + layer * layer_stride_; }
  const float* layer(int layer) const { return data_.get() + layer * layer_stride_; }
  // Keys [kBlockSize][head_dim] of one block of one head; the values follow them.
  float* keys(int layer, int32_t block, int head) {
    return this->layer(layer) + block * block_stride_ + int64_t{head} * 2 * kBlockSize * shape_.head_dim;
  }
  const float* keys(int layer, int32_t block, int head) const {
    return const_cast<KvPool*>(this)->keys(layer, block, head);
  }
  float* values(int layer, int32_t block, int head) {
    return keys(layer, block, head) + int64_t{kBlockSize} * shape_.head_dim;
  }
  size_t bytes() const { return static_cast<size_t>(layer_stride_) * shape_.num_layers * sizeof(float); }

 private:
  KvPool(const KvPoolShape& shape, std::unique_ptr<float[]> data);

  KvPoolShape shape_;
  int64_t block_stride_;
  int64_t layer_stride_;
  std::unique_ptr<float[]> data_;
};

}  // namespace scout::kvstore
