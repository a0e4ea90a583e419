#include "runtime/safetensors.h"

#include <cstring>
#include <fstream>

#include "gtest/gtest.h"
#include "runtime/test_model.h"

namespace scout::runtime {
namespace {

using testing::FreshDir;

TensorData F32(std::vector<int64_t> shape, std::vector<float> v) {
  TensorData t{.dtype = DType::kF32, .shape = shape, .data = std::vector<std::byte>(v.size() * 4)};
  std::memcpy(t.data.data(), v.data(), v.size() * 4);
  return t;
}

TEST(SafetensorsTest, RoundTripsAndConverts) {
  std::filesystem::path dir = FreshDir("rt");
  TensorData bf{.dtype = DType::kBF16, .shape = {3}, .data = std::vector<std::byte>(6)};
  uint16_t b[3] = {FloatToBf16(1.5f), FloatToBf16(-2.0f), FloatToBf16(3.1415926f)};
  std::memcpy(bf.data.data(), b, 6);
  TensorData hf{.dtype = DType::kF16, .shape = {3}, .data = std::vector<std::byte>(6)};
  uint16_t h[3] = {0x3c00 /*1*/, 0xc000 /*-2*/, 0x0001 /*2^-24*/};
  std::memcpy(hf.data.data(), h, 6);
  ASSERT_TRUE(WriteSafetensors(dir / "model.safetensors",
                               {{"a", F32({2, 2}, {1, 2, 3, 4})}, {"b", bf}, {"h", hf}}).ok());
  absl::StatusOr<TensorStore> store = TensorStore::OpenDir(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  const TensorView* a = *store->Get("a");
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 2}));
  std::vector<float> out(4);
  ASSERT_TRUE(ToFloat32(*a, out).ok());
  EXPECT_EQ(out, (std::vector<float>{1, 2, 3, 4}));
  out.resize(3);
  ASSERT_TRUE(ToFloat32(**store->Get("b"), out).ok());
  EXPECT_EQ(out[0], 1.5f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_NEAR(out[2], 3.1415926f, 0.01f);
  ASSERT_TRUE(ToFloat32(**store->Get("h"), out).ok());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], std::ldexp(1.0f, -24));
  EXPECT_EQ(store->Get("missing").status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, TruncatedFileIsDataLossNamingTheFile) {
  std::filesystem::path dir = FreshDir("trunc");
  std::filesystem::path p = dir / "model.safetensors";
  ASSERT_TRUE(WriteSafetensors(p, {{"w", F32({64}, std::vector<float>(64, 1.0f))}}).ok());
  std::filesystem::resize_file(p, std::filesystem::file_size(p) - 10);
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(p);
  ASSERT_EQ(f.status().code(), absl::StatusCode::kDataLoss) << f.status();
  EXPECT_NE(f.status().message().find(p.string()), std::string::npos);
  EXPECT_NE(f.status().message().find("truncated"), std::string::npos);
  // Cut inside the header, and shorter than the length prefix.
  std::filesystem::resize_file(p, 20);
  EXPECT_EQ(SafetensorsFile::Open(p).status().code(), absl::StatusCode::kDataLoss);
  std::filesystem::resize_file(p, 3);
  EXPECT_EQ(SafetensorsFile::Open(p).status().code(), absl::StatusCode::kDataLoss);
}

TEST(SafetensorsTest, CorruptHeaderIsDataLoss) {
  std::filesystem::path p = FreshDir("corrupt") / "x.safetensors";
  std::string header = R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}})";
  uint64_t len = header.size();
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(&len), 8);
  out << header << std::string(16, '\0');
  out.close();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(p);
  EXPECT_EQ(f.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(f.status().message().find("do not match"), std::string::npos) << f.status();
}

TEST(SafetensorsTest, MissingFilesAreNotFound) {
  std::filesystem::path dir = FreshDir("empty");
  absl::StatusOr<TensorStore> s = TensorStore::OpenDir(dir);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("model.safetensors"), std::string::npos);
  // An index naming a shard that is not there.
  std::ofstream(dir / "model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors"}})";
  s = TensorStore::OpenDir(dir);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("model-00001-of-00002.safetensors"), std::string::npos) << s.status();
}

TEST(SafetensorsTest, ShardedCheckpointLoadsEveryTensor) {
  std::filesystem::path dir = FreshDir("sharded");
  testing::WriteRandomModel(dir, testing::TinyConfig(), 7, /*shards=*/3);
  absl::StatusOr<TensorStore> s = TensorStore::OpenDir(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->Names().size(), 1u + 2 * 9 + 2);
}

}  // namespace
}  // namespace scout::runtime
