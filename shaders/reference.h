#pragma once
// CPU references for every catalogue kernel. They take the same push-constant bytes,
// bindings (as byte spans) and group counts as a dispatch and compute what the GPU
// must produce, including which elements the group counts leave untouched. Tests of
// the engine, the mediated path and the remoting path compare against these.

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

#include "base/result.h"
#include "shaders/catalogue.h"

namespace vg::shaders {

// Checks the arguments with ValidateKernelArgs, then runs kernel `id` on the CPU.
// Integer kernels are bit-exact. Float kernels use the same operation order as the
// shader in f32; the GPU may contract a*b+c into an FMA, see the tolerances below.
Result<> RunReference(uint32_t id, std::span<const std::byte> push, std::span<const std::span<std::byte>> bindings,
                      std::array<uint32_t, 3> groups);

// One pixel of the 2-D kernels, for references of whole frames (tests, the bench):
// premultiplied ARGB8888 src-over (blend.comp), and RGB565 -> XRGB8888 (convert_565.comp).
uint32_t BlendPixel(uint32_t src, uint32_t dst);
uint32_t Widen565(uint16_t p);

// Stated tolerances for the float kernels (what the tests assert):
//   saxpy : |gpu - ref| <= kSaxpyRelTol * (|a*x| + |y|) + kAbsTol
//   matmul: |gpu - ref| <= kMatmulRelTol * sum_k |a_ik * b_kj| + kAbsTol
inline constexpr float kSaxpyRelTol = 1.0f / (1 << 22);  // 2 ulp at f32
inline constexpr float kMatmulRelTol = 1e-5f;
inline constexpr float kAbsTol = 1e-6f;

}  // namespace vg::shaders
