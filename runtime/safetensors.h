// Memory-mapped safetensors checkpoints: one file, or shards listed by model.safetensors.index.json.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace scout::runtime {

enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

size_t DTypeSize(DType t);
const char* DTypeName(DType t);  // safetensors spelling: "F32", "BF16", ...

// A tensor inside a mapped file. Valid while its file stays open.
struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::byte* data = nullptr;
  size_t nbytes = 0;
  std::string file;  // the file it came from, for error messages

  int64_t numel() const;
};

// One .safetensors file, mapped read-only. The header is validated on Open: every tensor's
// offsets lie inside the file and match its dtype and shape.
class SafetensorsFile {
 public:
  // NotFound if the file is missing; DataLoss for a truncated file or a corrupt header, naming
  // the file and the tensor.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::filesystem::path& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const TensorView* Find(const std::string& name) const;
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  SafetensorsFile() = default;

  std::filesystem::path path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, TensorView> tensors_;
};

// All tensors of a Hugging Face model folder: model.safetensors, or the shards that
// model.safetensors.index.json names (each shard opened once).
class TensorStore {
 public:
  // NotFound if the folder has neither file (naming both); errors of any shard pass through.
  static absl::StatusOr<TensorStore> OpenDir(const std::filesystem::path& dir);

  // NotFound naming the tensor and where it was looked for.
  absl::StatusOr<const TensorView*> Get(const std::string& name) const;
  bool Contains(const std::string& name) const { return index_.contains(name); }
  std::vector<std::string> Names() const;

 private:
  std::filesystem::path dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  absl::flat_hash_map<std::string, const TensorView*> index_;
};

// Converts any floating-point tensor to float32. InvalidArgument for integer dtypes or if
// out.size() != numel.
absl::Status ToFloat32(const TensorView& t, std::span<float> out);

float Bf16ToFloat(uint16_t v);
float Fp16ToFloat(uint16_t v);
uint16_t FloatToBf16(float f);  // round to nearest even

// A tensor to write; data holds the raw little-endian bytes.
struct TensorData {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<std::byte> data;
};

// Writes a safetensors file (for tests and tools). Internal on I/O errors.
absl::Status WriteSafetensors(const std::filesystem::path& path, const std::map<std::string, TensorData>& tensors);

}  // namespace scout::runtime
