#pragma once
// Shared helpers for the engine tests: one engine per test binary (creating a Vulkan
// device per test case would dominate the runtime on lavapipe).

#include <doctest.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "engine/engine.h"
#include "shaders/catalogue.h"
#include "shaders/reference.h"

namespace vg::engine::testing {

inline Engine& TheEngine() {
  static std::unique_ptr<Engine> e = [] {
    auto r = Engine::Create({});
    if (!r.ok()) FAIL("no engine: " << r.error().ToString());
    return std::move(r).value();
  }();
  return *e;
}

inline BufferRef MakeBuffer(Engine& e, std::span<const std::byte> init) {
  auto b = e.CreateBuffer(ByteSize{init.size()});
  REQUIRE_MESSAGE(b.ok(), b.error().ToString());
  std::memcpy((*b)->Map().data(), init.data(), init.size());
  return *b;
}

template <class T>
std::vector<std::byte> ToBytes(const std::vector<T>& v) {
  std::vector<std::byte> out(v.size() * sizeof(T));
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}
template <class T>
std::vector<T> FromBytes(std::span<const std::byte> b) {
  std::vector<T> out(b.size() / sizeof(T));
  std::memcpy(out.data(), b.data(), out.size() * sizeof(T));
  return out;
}

inline std::vector<uint32_t> RandomU32(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint32_t> v(n);
  for (auto& x : v) x = rng();
  return v;
}
inline std::vector<float> RandomF32(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

}  // namespace vg::engine::testing
