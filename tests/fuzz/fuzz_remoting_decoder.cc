// libFuzzer target: arbitrary bytes as a remoting command stream (what a client publishes
// between head and tail), through the real decoder and validator with the server's
// resynchronisation rule, against a live object table that CREATE/DESTROY change exactly
// as the daemon's replay does. Engine-free: the replay sink only tracks objects.
// Byte 0 of the input picks a tiny or a generous limit set and the heap size, so caps and
// heap bounds are reached often.
#include <cstddef>
#include <cstdint>
#include <span>

#include "remoting/decoder.h"

using namespace vg;
using namespace vg::remoting;
namespace w = vg::remoting::wire;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  Limits limits;
  if (data[0] & 1) {
    limits.max_objects = 3;
    limits.max_bytes = 1 << 16;
    limits.max_buffer = 1 << 15;
  }
  const uint64_t heap_size = (data[0] & 2) ? 4096 : (1 << 20);
  auto stream = std::as_bytes(std::span(data + 1, size - 1));

  ObjectTable objects(limits);
  size_t off = 0, steps = 0;
  while (off < stream.size()) {
    Decoded d = DecodeCommand(stream, off);
    if (!d.cmd.ok()) {
      (void)ErrcName(d.cmd.code());
      // The server's rule: skip a framed command, else everything up to the tail.
      off = d.advance ? off + d.advance : stream.size();
      continue;
    }
    const Command& c = *d.cmd;
    if (c.size == 0 || c.size % w::kAlign != 0 || c.size > w::kMaxCommandSize) __builtin_trap();
    if (ValidateCommand(c, objects, heap_size).ok()) {
      if (const auto* cr = std::get_if<w::CreateBufferCmd>(&c.payload)) {
        objects.DoCreate(*cr);
        if (objects.live() > limits.max_objects || objects.bytes() > limits.max_bytes) __builtin_trap();
      } else if (const auto* de = std::get_if<w::DestroyBufferCmd>(&c.payload)) {
        objects.DoDestroy(de->id);
        if (objects.Lookup(de->id).ok()) __builtin_trap();
      } else if (const auto* wr = std::get_if<w::WriteCmd>(&c.payload)) {
        // What Execute() relies on: both ranges inside their spaces.
        auto o = objects.Lookup(wr->id);
        if (!o.ok() || !RangeWithin(wr->offset, wr->size, (*o)->size) ||
            !RangeWithin(wr->heap_offset, wr->size, heap_size))
          __builtin_trap();
      }
    }
    off += c.size;
    ++steps;
  }
  (void)steps;
  return 0;
}
