#pragma once
// Builds raw remoting command streams by hand for the decoder tests and the fuzz seeds.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "abi/remoting.h"

namespace vg::remoting::testing {

class Stream {
 public:
  template <class T>
  Stream& Cmd(wire::Op op, const T& payload, uint16_t flags = 0) {
    return Raw(static_cast<uint16_t>(op), flags, std::as_bytes(std::span<const T, 1>(&payload, 1)));
  }
  Stream& Raw(uint16_t opcode, uint16_t flags, std::span<const std::byte> payload, uint32_t size_override = 0) {
    uint32_t size = size_override ? size_override : wire::AlignUp8(static_cast<uint32_t>(8 + payload.size()));
    wire::CmdHeader h{opcode, flags, size};
    Put(&h, sizeof(h));
    Put(payload.data(), payload.size());
    while (bytes_.size() % 8) bytes_.push_back(std::byte{0});
    return *this;
  }
  Stream& Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups, std::vector<wire::DispatchBinding> binds,
                   std::span<const std::byte> push) {
    std::vector<std::byte> p(sizeof(wire::DispatchCmd));
    wire::DispatchCmd d{kernel, {groups[0], groups[1], groups[2]}, static_cast<uint32_t>(binds.size()),
                        static_cast<uint32_t>(push.size())};
    std::memcpy(p.data(), &d, sizeof(d));
    for (auto& b : binds) {
      auto bb = std::as_bytes(std::span<const wire::DispatchBinding, 1>(&b, 1));
      p.insert(p.end(), bb.begin(), bb.end());
    }
    p.insert(p.end(), push.begin(), push.end());
    return Raw(static_cast<uint16_t>(wire::Op::kDispatch), 0, p);
  }
  Stream& Bytes(std::span<const std::byte> b) {
    Put(b.data(), b.size());
    return *this;
  }
  const std::vector<std::byte>& bytes() const { return bytes_; }

 private:
  void Put(const void* p, size_t n) {
    auto* b = static_cast<const std::byte*>(p);
    bytes_.insert(bytes_.end(), b, b + n);
  }
  std::vector<std::byte> bytes_;
};

}  // namespace vg::remoting::testing
