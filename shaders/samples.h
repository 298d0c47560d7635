#pragma once
// One ready-to-run case per catalogue kernel (push constants, group counts, initial
// binding contents) and the check of a result against the CPU reference. The mediated
// and remoting tests and vgpu-bench run the same cases, so the three paths compute the
// same thing and are checked the same way.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"
#include "shaders/catalogue.h"

namespace vg::shaders {

struct KernelSample {
  uint32_t kernel = 0;
  std::vector<std::byte> push;
  std::array<uint32_t, 3> groups{1, 1, 1};
  std::vector<std::vector<std::byte>> bindings;  // initial contents, one per binding
};

// `elements` sizes 1-D kernels (not a multiple of the workgroup size unless asked) and
// picks proportionate matrices and images for the 2-D ones. Deterministic in `seed`.
KernelSample MakeSample(KernelId id, uint32_t elements, uint32_t seed);

// Runs the reference on a copy of `input` and compares every binding of `result` to it:
// exactly for integer kernels, within reference.h's tolerances for float ones.
// kInternal with the first mismatch named otherwise.
Result<> CheckSample(const KernelSample& input, std::span<const std::vector<std::byte>> result);

}  // namespace vg::shaders
