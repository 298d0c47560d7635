#include "remoting/decoder.h"

#include <cstring>

#include "shaders/catalogue.h"

namespace vg::remoting {

namespace {

template <class T>
T Load(std::span<const std::byte> bytes, size_t off) {
  T v{};
  std::memcpy(&v, bytes.data() + off, sizeof(T));
  return v;
}

// Per-op decoders, indexed like kOpTable (data, not a switch over opcodes). They fill
// `out` in place (no Result<Payload> temporaries: GCC 12 + ASan misreads their moves).
using DecodeFn = Result<> (*)(std::span<const std::byte> body, Payload& out);

template <class T>
Result<> DecodeFixed(std::span<const std::byte> body, Payload& out) {
  out.emplace<T>(Load<T>(body, 0));
  return Ok();
}
Result<> DecodeNop(std::span<const std::byte>, Payload& out) {
  out.emplace<std::monostate>();
  return Ok();
}
Result<> DecodeDispatch(std::span<const std::byte> body, Payload& out) {
  const auto head = Load<wire::DispatchCmd>(body, 0);
  VG_ERROR_IF(head.binding_count > shaders::kMaxBindings, Errc::kBadKernel, "{} bindings > {}", head.binding_count,
              shaders::kMaxBindings);
  VG_ERROR_IF(head.push_size > shaders::kMaxPushBytes, Errc::kBadKernel, "{} push bytes > {}", head.push_size,
              shaders::kMaxPushBytes);
  size_t need = sizeof(wire::DispatchCmd) + head.binding_count * sizeof(wire::DispatchBinding) + head.push_size;
  VG_ERROR_IF(wire::AlignUp8(static_cast<uint32_t>(need + sizeof(wire::CmdHeader))) !=
                  body.size() + sizeof(wire::CmdHeader),
              Errc::kBadLength, "dispatch with {} bindings and {} push bytes is not {} bytes", head.binding_count,
              head.push_size, body.size() + sizeof(wire::CmdHeader));
  auto& d = out.emplace<DispatchCommand>();
  d.head = head;
  size_t off = sizeof(wire::DispatchCmd);
  for (uint32_t i = 0; i < head.binding_count; ++i, off += sizeof(wire::DispatchBinding))
    d.bindings.push_back(Load<wire::DispatchBinding>(body, off));
  d.push.assign(body.begin() + static_cast<ptrdiff_t>(off), body.begin() + static_cast<ptrdiff_t>(off + head.push_size));
  return Ok();
}

constexpr DecodeFn kDecoders[wire::kOpCount] = {
    &DecodeNop,
    &DecodeFixed<wire::CreateBufferCmd>,
    &DecodeFixed<wire::DestroyBufferCmd>,
    &DecodeFixed<wire::WriteCmd>,
    &DecodeFixed<wire::ReadCmd>,
    &DecodeDispatch,
    &DecodeFixed<wire::CopyCmd>,
    &DecodeFixed<wire::FillCmd>,
    &DecodeFixed<wire::FenceCmd>,
};

}  // namespace

const OpDesc* FindOp(uint16_t opcode) { return opcode < wire::kOpCount ? &kOpTable[opcode] : nullptr; }

Decoded DecodeCommand(std::span<const std::byte> stream, size_t off) {
  Decoded out{MakeError(Errc::kInternal, "unset"), 0};
  if (off > stream.size() || stream.size() - off < sizeof(wire::CmdHeader)) {
    out.cmd = MakeError(Errc::kTruncated, "{} bytes left, a header needs 8", stream.size() - std::min(off, stream.size()));
    return out;
  }
  const auto h = Load<wire::CmdHeader>(stream, off);
  const size_t left = stream.size() - off;
  if (h.size < sizeof(wire::CmdHeader) || h.size % wire::kAlign != 0 || h.size > wire::kMaxCommandSize) {
    out.cmd = MakeError(Errc::kBadLength, "command size {} (opcode {})", h.size, h.opcode);
    return out;
  }
  if (h.size > left) {
    out.cmd = MakeError(Errc::kTruncated, "command of {} bytes with {} published", h.size, left);
    return out;
  }
  // From here the size is trustworthy: a bad command is skipped, the stream stays framed.
  out.advance = h.size;
  const OpDesc* d = FindOp(h.opcode);
  if (d == nullptr) {
    out.cmd = MakeError(Errc::kUnknownCommand, "opcode {}", h.opcode);
    return out;
  }
  if (h.flags != 0) {
    out.cmd = MakeError(Errc::kBadFlags, "{}: flags {:#x}", d->name, h.flags);
    return out;
  }
  const uint32_t want = wire::AlignUp8(static_cast<uint32_t>(sizeof(wire::CmdHeader) + d->payload));
  bool size_ok = d->rule == SizeRule::kExact ? h.size == want : h.size >= want;
  if (!size_ok) {
    out.cmd = MakeError(Errc::kBadLength, "{}: {} bytes, want {}{}", d->name, h.size,
                        d->rule == SizeRule::kExact ? "" : ">= ", want);
    return out;
  }
  auto body = stream.subspan(off + sizeof(wire::CmdHeader), h.size - sizeof(wire::CmdHeader));
  Command cmd;
  cmd.op = d->op;
  cmd.size = h.size;
  auto r = kDecoders[h.opcode](body, cmd.payload);
  if (!r.ok()) {
    out.cmd = Error{r.error().code, fmt::format("{}: {}", d->name, r.error().what)};
    return out;
  }
  out.cmd = std::move(cmd);
  return out;
}

// ---- Objects ----------------------------------------------------------------------------

Result<const ObjectTable::Object*> ObjectTable::Lookup(uint32_t id) const {
  auto it = objects_.find(id);
  VG_ERROR_IF(it == objects_.end(), Errc::kNotFound, "buffer {} was never created by this client", id);
  VG_ERROR_IF(!it->second.alive, Errc::kBadState, "buffer {} was destroyed", id);
  return &it->second;
}

Result<> ObjectTable::ValidateCreate(const wire::CreateBufferCmd& c) const {
  VG_INVALID_IF(c.id == wire::kInvalidId, "buffer id 0 is reserved");
  VG_INVALID_IF(c.reserved != 0, "reserved field {:#x}", c.reserved);
  VG_INVALID_IF(c.size == 0, "zero-sized buffer {}", c.id);
  VG_ERROR_IF(c.size % 4 != 0, Errc::kMisaligned, "buffer {} size {} not a multiple of 4", c.id, c.size);
  auto it = objects_.find(c.id);
  VG_ERROR_IF(it != objects_.end() && it->second.alive, Errc::kAlreadyExists, "buffer {} exists", c.id);
  VG_ERROR_IF(live_ >= limits_.max_objects, Errc::kLimitExceeded, "{} live buffers (cap {})", live_,
              limits_.max_objects);
  VG_ERROR_IF(c.size > limits_.max_buffer, Errc::kLimitExceeded, "buffer of {} B > cap {} B", c.size,
              limits_.max_buffer);
  VG_ERROR_IF(c.size > limits_.max_bytes - bytes_, Errc::kLimitExceeded, "{} B more than the client's {} B cap",
              c.size, limits_.max_bytes);
  VG_ERROR_IF(c.size > limits_.max_bytes - bytes_ - std::min(held_, limits_.max_bytes - bytes_), Errc::kBusy,
              "{} B of destroyed buffers are still in use", held_);
  return Ok();
}

void ObjectTable::DoCreate(const wire::CreateBufferCmd& c) {
  auto [it, fresh] = objects_.try_emplace(c.id);
  if (!fresh && !it->second.alive) --tombstones_;
  it->second = Object{c.size, true};
  ++live_;
  bytes_ += c.size;
}

void ObjectTable::DoDestroy(uint32_t id) {
  auto it = objects_.find(id);
  if (it == objects_.end() || !it->second.alive) return;
  bytes_ -= it->second.size;
  --live_;
  it->second.alive = false;
  // Tombstones are bounded: past the cap, forget the oldest-keyed (use after destroy of a
  // forgotten id then reads as kNotFound, still refused).
  if (++tombstones_ > limits_.max_objects) {
    for (auto t = objects_.begin(); t != objects_.end(); ++t)
      if (!t->second.alive && t->first != id) {
        objects_.erase(t);
        --tombstones_;
        break;
      }
  }
}

// ---- Validation (no side effects) -------------------------------------------------------

namespace {

Result<> CheckRange(const ObjectTable& objects, uint32_t id, uint64_t off, uint64_t size, const char* what) {
  VG_TRY_ASSIGN(const ObjectTable::Object* o, objects.Lookup(id));
  VG_INVALID_IF(size == 0, "{}: zero-sized range", what);
  VG_ERROR_IF(!RangeWithin(off, size, o->size), Errc::kOutOfBounds, "{}: [{:#x}, +{:#x}) past buffer {} of {:#x} B",
              what, off, size, id, o->size);
  return Ok();
}
Result<> CheckHeap(uint64_t off, uint64_t size, uint64_t heap_size, const char* what) {
  VG_ERROR_IF(!RangeWithin(off, size, heap_size), Errc::kOutOfBounds, "{}: heap [{:#x}, +{:#x}) past a {:#x}-byte heap",
              what, off, size, heap_size);
  return Ok();
}

using ObjectsRef = const ObjectTable&;
Result<> V(const std::monostate&, ObjectsRef, uint64_t) { return Ok(); }
Result<> V(const wire::CreateBufferCmd& c, ObjectsRef o, uint64_t) { return o.ValidateCreate(c); }
Result<> V(const wire::DestroyBufferCmd& c, ObjectsRef o, uint64_t) {
  VG_INVALID_IF(c.reserved != 0, "reserved field {:#x}", c.reserved);
  VG_TRY(o.Lookup(c.id));
  return Ok();
}
Result<> V(const wire::WriteCmd& c, ObjectsRef o, uint64_t heap) {
  VG_INVALID_IF(c.reserved != 0, "reserved field {:#x}", c.reserved);
  VG_TRY(CheckRange(o, c.id, c.offset, c.size, "write"));
  return CheckHeap(c.heap_offset, c.size, heap, "write");
}
Result<> V(const wire::ReadCmd& c, ObjectsRef o, uint64_t heap) {
  VG_INVALID_IF(c.reserved != 0, "reserved field {:#x}", c.reserved);
  VG_TRY(CheckRange(o, c.id, c.offset, c.size, "read"));
  return CheckHeap(c.heap_offset, c.size, heap, "read");
}
Result<> V(const DispatchCommand& c, ObjectsRef o, uint64_t) {
  const shaders::KernelDesc* k = shaders::FindKernel(c.head.kernel);
  VG_ERROR_IF(k == nullptr, Errc::kBadKernel, "unknown kernel {}", c.head.kernel);
  uint64_t sizes[shaders::kMaxBindings] = {};
  for (size_t i = 0; i < c.bindings.size(); ++i) {
    const auto& b = c.bindings[i];
    VG_INVALID_IF(b.reserved != 0, "binding {}: reserved field {:#x}", i, b.reserved);
    VG_TRY_CTX(CheckRange(o, b.id, b.offset, b.size, "binding"), "{} binding {}", k->name, i);
    sizes[i] = b.size;
  }
  std::array<uint32_t, 3> groups{c.head.groups[0], c.head.groups[1], c.head.groups[2]};
  return shaders::ValidateKernelArgs(*k, c.push, std::span(sizes, c.bindings.size()), groups);
}
Result<> V(const wire::CopyCmd& c, ObjectsRef o, uint64_t) {
  VG_TRY(CheckRange(o, c.src, c.src_offset, c.size, "copy source"));
  VG_TRY(CheckRange(o, c.dst, c.dst_offset, c.size, "copy destination"));
  VG_ERROR_IF(c.src == c.dst && RangesOverlap(c.src_offset, c.size, c.dst_offset, c.size), Errc::kOverlap,
              "copy within buffer {} with overlapping ranges", c.src);
  return Ok();
}
Result<> V(const wire::FillCmd& c, ObjectsRef o, uint64_t) {
  VG_TRY(CheckRange(o, c.id, c.offset, c.size, "fill"));
  VG_ERROR_IF(!IsAligned(c.offset, 4) || !IsAligned(c.size, 4), Errc::kMisaligned,
              "fill offset {:#x} / size {:#x} not multiples of 4", c.offset, c.size);
  return Ok();
}
Result<> V(const wire::FenceCmd&, ObjectsRef, uint64_t) { return Ok(); }

}  // namespace

Result<> ValidateCommand(const Command& c, const ObjectTable& objects, uint64_t heap_size) {
  return std::visit([&](const auto& p) { return V(p, objects, heap_size); }, c.payload);
}

}  // namespace vg::remoting
