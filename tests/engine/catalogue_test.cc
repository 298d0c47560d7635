#include <doctest.h>

#include <set>

#include "engine/internal/core.h"
#include "shaders/catalogue.h"
#include "shaders/reference.h"

using namespace vg;
using namespace vg::shaders;

namespace {
// OpExecutionMode (opcode 16) with mode LocalSize (17): [len<<16|16, entry, 17, x, y, z].
std::array<uint32_t, 3> SpirvLocalSize(std::span<const uint32_t> w) {
  for (size_t i = 5; i < w.size();) {
    uint32_t len = w[i] >> 16, op = w[i] & 0xffff;
    if (len == 0) break;
    if (op == 16 && len >= 6 && w[i + 2] == 17) return {w[i + 3], w[i + 4], w[i + 5]};
    i += len;
  }
  return {0, 0, 0};
}
}  // namespace

TEST_CASE("catalogue: ids are dense, stable and findable") {
  auto all = AllKernels();
  REQUIRE(all.size() == 11);
  std::set<std::string_view> names;
  for (size_t i = 0; i < all.size(); ++i) {
    CHECK(all[i].raw_id() == i + 1);
    CHECK(FindKernel(all[i].raw_id()) == &all[i]);
    names.insert(all[i].name);
  }
  CHECK(names.size() == all.size());
  CHECK(FindKernel(0u) == nullptr);
  CHECK(FindKernel(12u) == nullptr);
  CHECK(FindKernel(0xffffffffu) == nullptr);
  // ABI: these numbers are in guests' command streams.
  CHECK(FindKernel(1u)->name == "fill");
  CHECK(FindKernel(4u)->name == "matmul");
  CHECK(FindKernel(7u)->name == "spin");
  CHECK(FindKernel(8u)->name == "fill_rect");
  CHECK(FindKernel(9u)->name == "blit");
  CHECK(FindKernel(10u)->name == "blend");
  CHECK(FindKernel(11u)->name == "convert_565");
  CHECK(FindKernel(KernelId::kSaxpy)->push_size == sizeof(SaxpyPush));
}

TEST_CASE("catalogue: embedded SPIR-V matches the table") {
  for (const KernelDesc& k : AllKernels()) {
    CAPTURE(k.name);
    REQUIRE(k.spirv.size() > 5);
    CHECK(k.spirv[0] == 0x07230203u);  // SPIR-V magic
    CHECK(SpirvLocalSize(k.spirv) == k.workgroup_size);
    CHECK(k.binding_count >= 1);
    CHECK(k.binding_count <= kMaxBindings);
    CHECK(k.push_size <= kMaxPushBytes);
    CHECK(k.push_size % 4 == 0);
  }
}

TEST_CASE("catalogue: ValidateKernelArgs names each refusal") {
  const KernelDesc& mm = *FindKernel(KernelId::kMatmul);
  MatmulPush p{4, 5, 6};
  uint64_t ok_sizes[] = {4 * 6 * 4, 6 * 5 * 4, 4 * 5 * 4};
  CHECK(ValidateKernelArgs(mm, PushBytes(p), ok_sizes, {1, 1, 1}).ok());
  CHECK(ValidateKernelArgs(mm, PushBytes(p), std::span(ok_sizes, 2), {1, 1, 1}).code() == Errc::kBadKernel);
  CHECK(ValidateKernelArgs(mm, PushBytes(p).first(8), ok_sizes, {1, 1, 1}).code() == Errc::kBadKernel);
  uint64_t small[] = {4 * 6 * 4, 6 * 5 * 4 - 1, 4 * 5 * 4};
  CHECK(ValidateKernelArgs(mm, PushBytes(p), small, {1, 1, 1}).code() == Errc::kOutOfBounds);
  CHECK(ValidateKernelArgs(mm, PushBytes(p), ok_sizes, {0, 1, 1}).code() == Errc::kInvalidArgument);
  CHECK(ValidateKernelArgs(mm, PushBytes(p), ok_sizes, {1, 1, 2}).code() == Errc::kLimitExceeded);
  MatmulPush big{5000, 1, 1};
  uint64_t big_sizes[] = {5000 * 4, 4, 5000 * 4};
  CHECK(ValidateKernelArgs(mm, PushBytes(big), big_sizes, {1, 1, 1}).code() == Errc::kLimitExceeded);
  const KernelDesc& spin = *FindKernel(KernelId::kSpin);
  SpinPush sp{1, (1u << 20) + 1, 0};
  uint64_t spin_sizes[] = {4};
  CHECK(ValidateKernelArgs(spin, PushBytes(sp), spin_sizes, {1, 1, 1}).code() == Errc::kLimitExceeded);
  // Push words are u32: a huge count cannot wrap the size rule.
  const KernelDesc& fill = *FindKernel(KernelId::kFill);
  FillPush fp{0xffffffffu, 1};
  uint64_t fill_sizes[] = {uint64_t{0xffffffffu} * 4 - 4};
  CHECK(ValidateKernelArgs(fill, PushBytes(fp), fill_sizes, {1, 1, 1}).code() == Errc::kOutOfBounds);
}

TEST_CASE("catalogue: group helpers cover the elements") {
  const KernelDesc& fill = *FindKernel(KernelId::kFill);
  CHECK(Groups1D(fill, 0) == std::array<uint32_t, 3>{1, 1, 1});
  CHECK(Groups1D(fill, 256) == std::array<uint32_t, 3>{1, 1, 1});
  CHECK(Groups1D(fill, 257) == std::array<uint32_t, 3>{2, 1, 1});
  for (uint64_t n : {uint64_t{65535} * 256 + 1, uint64_t{32} << 20, uint64_t{65535} * 256 * 256}) {
    auto g = Groups1D(fill, n);
    CHECK(g[0] <= 65535);
    CHECK(uint64_t{g[0]} * g[1] * 256 >= n);
    CHECK(ValidateKernelArgs(fill, PushBytes(FillPush{0, 0}), std::array<uint64_t, 1>{0}, g).ok());
  }
  CHECK(Groups2D(*FindKernel(KernelId::kBlur3x3), 17, 16) == std::array<uint32_t, 3>{2, 1, 1});
}

TEST_CASE("reference: partial coverage leaves the rest untouched") {
  std::vector<std::byte> buf(1000 * 4, std::byte{0xee});
  std::span<std::byte> bindings[] = {buf};
  FillPush p{1000, 7};
  REQUIRE(RunReference(1, PushBytes(p), bindings, {1, 1, 1}).ok());
  uint32_t w;
  std::memcpy(&w, buf.data() + 255 * 4, 4);
  CHECK(w == 7);
  std::memcpy(&w, buf.data() + 256 * 4, 4);
  CHECK(w == 0xeeeeeeeeu);
  CHECK(RunReference(99, PushBytes(p), bindings, {1, 1, 1}).code() == Errc::kBadKernel);
  std::span<std::byte> two[] = {buf, buf};
  CHECK(RunReference(1, PushBytes(p), two, {1, 1, 1}).code() == Errc::kBadKernel);
}

TEST_CASE("device policy: GPUs first, overrides by index or name") {
  using namespace vg::engine;
  auto cand = [](const char* name, DeviceKind k) {
    PhysicalCandidate c;
    c.info.name = name;
    c.info.kind = k;
    return c;
  };
  std::vector<PhysicalCandidate> devs = {cand("llvmpipe (LLVM 15.0.6, 256 bits)", DeviceKind::kCpu),
                                         cand("Intel(R) UHD Graphics 770", DeviceKind::kIntegrated),
                                         cand("NVIDIA H100 80GB HBM3", DeviceKind::kDiscrete)};
  CHECK(PickDevice(devs, "").value() == 2);
  CHECK(PickDevice(std::span(devs).first(2), "").value() == 1);
  CHECK(PickDevice(std::span(devs).first(1), "").value() == 0);
  CHECK(PickDevice(devs, "0").value() == 0);
  CHECK(PickDevice(devs, "LLVMPIPE").value() == 0);
  CHECK(PickDevice(devs, "uhd").value() == 1);
  CHECK(PickDevice(devs, "3").code() == Errc::kNotFound);
  CHECK(PickDevice(devs, "radeon").code() == Errc::kNotFound);
  CHECK(PickDevice({}, "").code() == Errc::kNotFound);
}
