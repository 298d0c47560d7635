#pragma once
// Small pieces every mediated e2e test needs: a refusal's text for a failed REQUIRE, a guest
// device opened on a vGPU's socket, the device's access bits for a catalogue kernel's
// binding, and the check that a vGPU still runs work after an attack. One copy here instead
// of one per test file.

#include <doctest.h>

#include <cstdint>
#include <memory>
#include <string>

#include "guest/guest.h"
#include "shaders/catalogue.h"

namespace vg::e2e {

inline std::string Why(const Result<>& r) { return r.ok() ? std::string() : r.error().ToString(); }

// A guest process's view of the vGPU behind `socket` (4 MiB of guest RAM unless said), or a
// failed REQUIRE.
inline std::unique_ptr<guest::Device> OpenGuest(const std::string& socket, uint64_t ram_size = 4 << 20) {
  guest::DeviceOptions o;
  o.socket = socket;
  o.ram_size = ram_size;
  auto d = guest::Device::Open(o);
  REQUIRE_MESSAGE(d.ok(), Why(d.ok() ? Ok() : Result<>(d.error())));
  return std::move(d).value();
}

// A catalogue binding's access as the DISPATCH command's access bits.
inline uint32_t AccessOf(shaders::Access a) {
  return (a != shaders::Access::kWrite ? abi::cmd::kAccessRead : 0) |
         (shaders::Writes(a) ? abi::cmd::kAccessWrite : 0);
}

// The attacker's vGPU still runs work after the attack (the ring moved on past what was
// refused). `G` is a test's guest: anything with a `drv` pointing at a guest::Driver.
template <class G>
void ExpectStillWorks(G& g) {
  auto buf = g.drv->Alloc(4096);
  REQUIRE(buf.ok());
  guest::CommandBuilder cb;
  cb.Fill(buf->va, 4096, 0x600d);
  auto seq = g.drv->Submit(cb);
  REQUIRE(seq.ok());
  REQUIRE_MESSAGE(g.drv->Wait(*seq).ok(), "the attacker's vGPU stopped working");
  CHECK(reinterpret_cast<uint32_t*>(buf->host.data())[1023] == 0x600d);
  REQUIRE(g.drv->Free(*buf).ok());
}

}  // namespace vg::e2e
