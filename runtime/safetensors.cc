#include "runtime/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "kernels/bf16.h"
#include "nlohmann/json.hpp"
#include "runtime/model_config.h"

namespace scout::runtime {
namespace {

using nlohmann::json;

bool ParseDType(const std::string& s, DType* t) {
  static const std::pair<const char*, DType> kNames[] = {
      {"F64", DType::kF64}, {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16},
      {"I64", DType::kI64}, {"I32", DType::kI32}, {"I16", DType::kI16}, {"I8", DType::kI8},
      {"U8", DType::kU8},   {"BOOL", DType::kBool}};
  for (auto& [name, type] : kNames) {
    if (s == name) {
      *t = type;
      return true;
    }
  }
  return false;
}

absl::Status Corrupt(const std::filesystem::path& p, absl::string_view msg) {
  return absl::DataLossError(absl::StrCat(p.string(), ": ", msg));
}

}  // namespace

size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF64: case DType::kI64: return 8;
    case DType::kF32: case DType::kI32: return 4;
    case DType::kF16: case DType::kBF16: case DType::kI16: return 2;
    case DType::kI8: case DType::kU8: case DType::kBool: return 1;
  }
  return 0;
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF64: return "F64";
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI64: return "I64";
    case DType::kI32: return "I32";
    case DType::kI16: return "I16";
    case DType::kI8: return "I8";
    case DType::kU8: return "U8";
    case DType::kBool: return "BOOL";
  }
  return "?";
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::filesystem::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path.string(), ": no such file"));
    return absl::InternalError(absl::StrCat(path.string(), ": cannot open: ", std::strerror(err)));
  }
  struct stat st{};
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return absl::InternalError(absl::StrCat(path.string(), ": stat failed: ", std::strerror(err)));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return Corrupt(path, absl::StrCat("truncated: ", size, " bytes, shorter than the 8-byte header length"));
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat(path.string(), ": mmap failed: ", std::strerror(map_err)));
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = map;
  f->map_size_ = size;
  const auto* bytes = static_cast<const std::byte*>(map);

  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);
  if constexpr (std::endian::native != std::endian::little) header_len = __builtin_bswap64(header_len);
  if (header_len > size - 8) {
    return Corrupt(path, absl::StrCat("truncated: header claims ", header_len, " bytes but the file has ", size - 8,
                                      " after the length"));
  }
  json header = json::parse(reinterpret_cast<const char*>(bytes + 8),
                            reinterpret_cast<const char*>(bytes + 8 + header_len), nullptr, false);
  if (header.is_discarded() || !header.is_object()) return Corrupt(path, "header is not a JSON object");
  const std::byte* data = bytes + 8 + header_len;
  const size_t data_size = size - 8 - header_len;
  for (auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    if (!entry.is_object()) return Corrupt(path, absl::StrCat("tensor \"", name, "\": entry is not an object"));
    auto dt = entry.find("dtype");
    auto shape = entry.find("shape");
    auto offs = entry.find("data_offsets");
    if (dt == entry.end() || !dt->is_string() || shape == entry.end() || !shape->is_array() ||
        offs == entry.end() || !offs->is_array() || offs->size() != 2) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\": needs dtype, shape and two data_offsets"));
    }
    TensorView v;
    v.file = path.string();
    if (!ParseDType(dt->get<std::string>(), &v.dtype)) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\": unsupported dtype ", dt->get<std::string>()));
    }
    for (const json& d : *shape) {
      if (!d.is_number_unsigned()) return Corrupt(path, absl::StrCat("tensor \"", name, "\": bad shape"));
      v.shape.push_back(d.get<int64_t>());
    }
    if (!(*offs)[0].is_number_unsigned() || !(*offs)[1].is_number_unsigned()) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\": bad data_offsets"));
    }
    uint64_t begin = (*offs)[0].get<uint64_t>(), end = (*offs)[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return Corrupt(path, absl::StrCat("truncated or corrupt: tensor \"", name, "\" spans bytes [", begin, ", ", end,
                                        ") but the data section has ", data_size));
    }
    if (end - begin != static_cast<uint64_t>(v.numel()) * DTypeSize(v.dtype)) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\": ", end - begin, " bytes do not match shape and dtype ",
                                        DTypeName(v.dtype)));
    }
    v.data = data + begin;
    v.nbytes = end - begin;
    f->tensors_.emplace(name, std::move(v));
  }
  return f;
}

const TensorView* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<TensorStore> TensorStore::OpenDir(const std::filesystem::path& dir) {
  TensorStore store;
  store.dir_ = dir;
  const std::filesystem::path single = dir / "model.safetensors";
  const std::filesystem::path index = dir / "model.safetensors.index.json";
  std::vector<std::filesystem::path> shards;
  std::error_code ec;
  if (std::filesystem::exists(index, ec)) {
    absl::StatusOr<std::string> text = ReadFile(index);
    if (!text.ok()) return text.status();
    json j = json::parse(*text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      return absl::DataLossError(absl::StrCat(index.string(), ": not a safetensors index (needs \"weight_map\")"));
    }
    for (auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) return absl::DataLossError(absl::StrCat(index.string(), ": bad entry for ", name));
      std::filesystem::path p = dir / file.get<std::string>();
      if (std::find(shards.begin(), shards.end(), p) == shards.end()) shards.push_back(p);
    }
  } else if (std::filesystem::exists(single, ec)) {
    shards.push_back(single);
  } else {
    return absl::NotFoundError(absl::StrCat(dir.string(), ": no model.safetensors or model.safetensors.index.json"));
  }
  for (const auto& p : shards) {
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(p);
    if (!f.ok()) return f.status();
    for (const auto& [name, view] : (*f)->tensors()) store.index_[name] = &view;
    store.files_.push_back(std::move(*f));
  }
  return store;
}

absl::StatusOr<const TensorView*> TensorStore::Get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return absl::NotFoundError(absl::StrCat(dir_.string(), ": tensor \"", name, "\" not found in the checkpoint"));
  return it->second;
}

std::vector<std::string> TensorStore::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, v] : index_) names.push_back(name);
  std::sort(names.begin(), names.end());
  return names;
}

float Bf16ToFloat(uint16_t v) { return kernels::Bf16ToFloat(v); }

uint16_t FloatToBf16(float f) { return kernels::FloatToBf16(f); }

float Fp16ToFloat(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  return std::bit_cast<float>(bits);
}

absl::Status ToFloat32(const TensorView& t, std::span<float> out) {
  const int64_t n = t.numel();
  if (static_cast<int64_t>(out.size()) != n) {
    return absl::InvalidArgumentError(absl::StrCat("ToFloat32: ", n, " elements into a buffer of ", out.size()));
  }
  switch (t.dtype) {
    case DType::kF32:
      std::memcpy(out.data(), t.data, n * 4);
      return absl::OkStatus();
    case DType::kF64:
      for (int64_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, t.data + i * 8, 8);
        out[i] = static_cast<float>(d);
      }
      return absl::OkStatus();
    case DType::kBF16:
    case DType::kF16: {
      const bool bf = t.dtype == DType::kBF16;
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, t.data + i * 2, 2);
        out[i] = bf ? Bf16ToFloat(h) : Fp16ToFloat(h);
      }
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(absl::StrCat(t.file, ": tensor of dtype ", DTypeName(t.dtype),
                                                     " is not floating point"));
  }
}

absl::Status WriteSafetensors(const std::filesystem::path& path, const std::map<std::string, TensorData>& tensors) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    header[name] = {{"dtype", DTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + t.data.size()}}};
    offset += t.data.size();
  }
  std::string text = header.dump();
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');  // keep tensor data 8-byte aligned
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat(path.string(), ": cannot create"));
  uint64_t len = text.size();
  out.write(reinterpret_cast<const char*>(&len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors) out.write(reinterpret_cast<const char*>(t.data.data()), static_cast<std::streamsize>(t.data.size()));
  if (!out) return absl::InternalError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

}  // namespace scout::runtime
