#pragma once
// The remoting wire format (docs/remoting-protocol.md), shared by the daemon and the guest
// client. Header-only: layouts and constants, no code that trusts anything.
//
// The shape follows Venus (Mesa src/virtio/vulkan/vn_ring.c, virglrenderer
// src/venus/vkr_ring.c): one shared memory area with head, tail and status words in
// separate cache lines, a byte ring of commands, client-chosen object ids, batches
// published by a tail store, a wake-up only when the server says it is idle, and replies
// written back into shared memory.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace vg::remoting::wire {

inline constexpr uint32_t kMagic = 0x4d524756;  // "VGRM"
inline constexpr uint32_t kVersion = 1;

// ---- Handshake (SOCK_SEQPACKET, one datagram each way) ----------------------------------
// Client -> server: Hello + 2 fds (SCM_RIGHTS): [0] the shared-area memfd, [1] the client's
// wake eventfd. Server -> client: Welcome + 1 fd: the server's reply eventfd (omitted when
// status != 0). After the handshake the socket carries nothing; its EOF means "gone".
struct Hello {
  uint32_t magic;
  uint32_t version;
  uint32_t ring_size;  // bytes, power of two, kMinRingSize..kMaxRingSize
  uint32_t reserved;
  uint64_t heap_size;  // bytes, multiple of 4096, <= kMaxHeapSize
};
struct Welcome {
  uint32_t magic;
  uint32_t version;
  uint32_t status;       // vg::Errc value; 0 = accepted
  uint32_t client_id;    // per listener, for logs
  uint32_t max_objects;  // the per-client caps this server enforces
  uint32_t reserved;
  uint64_t max_bytes;
};
static_assert(sizeof(Hello) == 24 && sizeof(Welcome) == 32);

inline constexpr uint32_t kMinRingSize = 4096;
inline constexpr uint32_t kMaxRingSize = 16u << 20;
inline constexpr uint64_t kMaxHeapSize = 1ull << 30;

// ---- Shared area ------------------------------------------------------------------------
// [0, 4096)                    control: four 64-byte lines (below), rest reserved
// [4096, 4096+ring_size)       command ring
// [4096+ring_size, +heap_size) heap: WRITE sources and READ destinations, by offset
inline constexpr uint64_t kCacheLine = 64;
inline constexpr uint64_t kHeadOffset = 0 * kCacheLine;    // u32, written by the server only
inline constexpr uint64_t kTailOffset = 1 * kCacheLine;    // u32, written by the client only
inline constexpr uint64_t kStatusOffset = 2 * kCacheLine;  // Status, written by the server only
inline constexpr uint64_t kRingOffset = 4096;
inline constexpr uint64_t HeapOffset(uint32_t ring_size) { return kRingOffset + ring_size; }
inline constexpr uint64_t AreaSize(uint32_t ring_size, uint64_t heap_size) {
  return kRingOffset + ring_size + heap_size;
}

// Status flags.
inline constexpr uint32_t kStatusIdle = 1u << 0;  // server is asleep: publish, then signal the wake eventfd
inline constexpr uint32_t kStatusDead = 1u << 1;  // server dropped this client (error_* says why)

// The status line. The server writes, the client reads; the server never reads it back.
struct Status {
  uint32_t flags;
  uint32_t error_code;    // vg::Errc of the last refused command
  uint32_t error_offset;  // ring position (free-running) of that command
  uint32_t error_count;   // refused commands so far
  uint64_t completed_fence;
  uint64_t reply_seq;     // last READ whose data is in the heap
};
static_assert(sizeof(Status) <= kCacheLine && std::is_trivially_copyable_v<Status>);
inline constexpr uint64_t kStatusFlagsOffset = kStatusOffset + offsetof(Status, flags);
inline constexpr uint64_t kStatusErrorCodeOffset = kStatusOffset + offsetof(Status, error_code);
inline constexpr uint64_t kStatusErrorOffsetOffset = kStatusOffset + offsetof(Status, error_offset);
inline constexpr uint64_t kStatusErrorCountOffset = kStatusOffset + offsetof(Status, error_count);
inline constexpr uint64_t kStatusFenceOffset = kStatusOffset + offsetof(Status, completed_fence);
inline constexpr uint64_t kStatusReplyOffset = kStatusOffset + offsetof(Status, reply_seq);

// head and tail are free-running byte counters; position p is at ring[p & (ring_size-1)].
// tail - head <= ring_size; both multiples of kAlign. Commands may wrap the ring's end.
inline constexpr uint32_t kAlign = 8;

// ---- Commands ---------------------------------------------------------------------------
// Every command: CmdHeader + payload, `size` bytes in all (header included), a multiple of 8.
struct CmdHeader {
  uint16_t opcode;
  uint16_t flags;  // must be 0
  uint32_t size;
};
static_assert(sizeof(CmdHeader) == 8);

enum class Op : uint16_t {
  kNop = 0,
  kCreateBuffer = 1,
  kDestroyBuffer = 2,
  kWrite = 3,
  kRead = 4,
  kDispatch = 5,
  kCopy = 6,
  kFill = 7,
  kFence = 8,
};
inline constexpr uint16_t kOpCount = 9;

struct CreateBufferCmd { uint32_t id; uint32_t reserved; uint64_t size; };
struct DestroyBufferCmd { uint32_t id; uint32_t reserved; };
// heap[heap_offset, +size) -> buffer[offset, +size)
struct WriteCmd { uint32_t id; uint32_t reserved; uint64_t offset; uint64_t heap_offset; uint64_t size; };
// buffer[offset, +size) -> heap[heap_offset, +size), then Status.reply_seq = seq
struct ReadCmd { uint32_t id; uint32_t reserved; uint64_t offset; uint64_t heap_offset; uint64_t size; uint64_t seq; };
// Followed by binding_count DispatchBinding, then push_size bytes, zero-padded to 8.
struct DispatchCmd { uint32_t kernel; uint32_t groups[3]; uint32_t binding_count; uint32_t push_size; };
struct DispatchBinding { uint32_t id; uint32_t reserved; uint64_t offset; uint64_t size; };
struct CopyCmd { uint32_t src; uint32_t dst; uint64_t src_offset; uint64_t dst_offset; uint64_t size; };
struct FillCmd { uint32_t id; uint32_t value; uint64_t offset; uint64_t size; };
// Status.completed_fence = value once every earlier command has finished on the GPU.
struct FenceCmd { uint64_t value; };
static_assert(sizeof(CreateBufferCmd) == 16 && sizeof(DestroyBufferCmd) == 8 && sizeof(WriteCmd) == 32 &&
              sizeof(ReadCmd) == 40 && sizeof(DispatchCmd) == 24 && sizeof(DispatchBinding) == 24 &&
              sizeof(CopyCmd) == 32 && sizeof(FillCmd) == 24 && sizeof(FenceCmd) == 8);

inline constexpr uint32_t kMaxCommandSize = 4096;  // no command is larger (dispatch is < 256)
inline constexpr uint32_t kInvalidId = 0;          // ids are client-chosen, nonzero

inline constexpr uint32_t AlignUp8(uint32_t v) { return (v + 7u) & ~7u; }

// Atomic access to words in the shared mapping (C++20 atomic_ref on plain memory).
template <class T>
inline T LoadShared(const std::byte* area, uint64_t off, std::memory_order mo = std::memory_order_acquire) {
  return std::atomic_ref<T>(*reinterpret_cast<T*>(const_cast<std::byte*>(area + off))).load(mo);
}
template <class T>
inline void StoreShared(std::byte* area, uint64_t off, T v, std::memory_order mo = std::memory_order_release) {
  std::atomic_ref<T>(*reinterpret_cast<T*>(area + off)).store(v, mo);
}

}  // namespace vg::remoting::wire
