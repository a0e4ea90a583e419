// Helpers shared by the kernel tests and benchmarks (host side only).
#pragma once

#include <cmath>
#include <cstddef>
#include <span>
#include <vector>

namespace scout::kernels::testing {

// Relative L2 distance ||a - ref|| / ||ref|| in double precision.
template <typename A, typename B>
double RelL2(std::span<const A> a, std::span<const B> ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = double(a[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return std::sqrt(num / den);
}
template <typename A, typename B>
double RelL2(const std::vector<A>& a, const std::vector<B>& ref) {
  return RelL2(std::span<const A>(a), std::span<const B>(ref));
}

}  // namespace scout::kernels::testing
