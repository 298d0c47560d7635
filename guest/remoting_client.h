#pragma once
// The guest side of API remoting (F4): the same operations as the mediated Driver
// (buffers, write, read, dispatch a catalogue kernel, copy, fill, fence, wait), serialized
// into a shared-memory ring the Venus way. Buffer ids are chosen here, so creation costs no
// round trip; commands are batched and published by one tail store; the daemon is kicked
// through an eventfd only when its status line says it is idle; write payloads travel in
// the shared heap by reference; only Read() and Wait() wait for a reply, which comes back
// through shared memory. Wire format: abi/remoting.h, docs/remoting-protocol.md.

#include <array>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "base/base.h"
#include "abi/remoting.h"

namespace vg::guest {

struct RemotingOptions {
  std::string socket;                 // <runtime-dir>/<uuid>.remote.sock
  uint32_t ring_size = 256u << 10;    // power of two
  uint64_t heap_size = 16ull << 20;   // multiple of 4096
  int connect_timeout_ms = 5000;
  // The study's remoting ablation (docs/ab-methodology.md "Ablations"); both default on.
  // batch off: every command is published by a tail store of its own as it is recorded (and
  // kicks an idle daemon), instead of one store per Submit/Flush.
  bool batch = true;
  // idle_notify off: every publish signals the wake eventfd, whatever the status line says
  // (no notification suppression). The daemon treats a wake while awake as a no-op.
  bool idle_notify = true;
};

struct RemoteBuffer {
  uint32_t id = 0;
  uint64_t size = 0;
};
struct RemoteBinding {
  uint32_t id = 0;
  uint64_t offset = 0;
  uint64_t size = 0;
};
inline RemoteBinding Bind(const RemoteBuffer& b) { return {b.id, 0, b.size}; }

// Crossings and bytes, for vgpu-bench (per submission = delta / submissions).
struct RemotingCounters {
  uint64_t commands = 0;         // commands encoded
  uint64_t ring_bytes = 0;       // command bytes written to the ring
  uint64_t heap_bytes_in = 0;    // write payload bytes placed in the heap
  uint64_t heap_bytes_out = 0;   // read reply bytes taken from the heap
  uint64_t publishes = 0;        // tail stores
  uint64_t wakes_sent = 0;       // eventfd signals to the daemon (crossings)
  uint64_t wakes_suppressed = 0; // publishes that found the daemon awake
  uint64_t replies_waited = 0;   // Read()/Wait() calls that had to block on the daemon
  uint64_t ring_full_waits = 0;  // appends that waited for ring or heap space
  uint64_t submissions = 0;      // fences
};

// The last refusal the daemon reported in the status line.
struct RemoteError {
  Errc code = Errc::kOk;
  uint32_t offset = 0;  // ring position of the refused command
  uint32_t count = 0;   // refusals so far
};

class RemotingClient {
 public:
  static Result<std::unique_ptr<RemotingClient>> Connect(const RemotingOptions& opts);
  // Over an already-connected SOCK_SEQPACKET socket (in-process tests: a socketpair).
  static Result<std::unique_ptr<RemotingClient>> Connect(UniqueFd sock, const RemotingOptions& opts);
  ~RemotingClient();
  RemotingClient(const RemotingClient&) = delete;
  RemotingClient& operator=(const RemotingClient&) = delete;

  // Encoded only: no round trip. Errors in what the daemon does surface at the next Read/Wait.
  Result<RemoteBuffer> CreateBuffer(uint64_t size);
  Result<> DestroyBuffer(const RemoteBuffer& b);
  Result<> Write(const RemoteBuffer& b, uint64_t offset, std::span<const std::byte> data);
  Result<> Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups, std::span<const RemoteBinding> bindings,
                    std::span<const std::byte> push);
  Result<> Copy(const RemoteBuffer& src, uint64_t src_offset, const RemoteBuffer& dst, uint64_t dst_offset,
                uint64_t size);
  Result<> Fill(const RemoteBuffer& dst, uint64_t offset, uint64_t size, uint32_t value);
  // Waits for the reply (data through the heap). The daemon's named error if it refused.
  Result<> Read(const RemoteBuffer& b, uint64_t offset, std::span<std::byte> out, int timeout_ms = 10000);

  // Appends FENCE(next seqno) and publishes the batch. Returns the seqno.
  Result<uint64_t> Submit();
  // Publishes what is recorded; kicks the daemon only if it is idle.
  Result<> Flush();
  // Ok once the fence passed seq; the daemon's named error if it refused a command
  // meanwhile (or dropped this client); kTimeout otherwise.
  Result<> Wait(uint64_t seq, int timeout_ms = 10000);

  uint64_t completed() const;
  uint64_t last_submitted() const { return fence_seq_; }
  RemoteError LastError() const;
  bool Dead() const;
  const RemotingCounters& counters() const { return counters_; }
  void ResetCounters() { counters_ = {}; }
  uint32_t ring_size() const { return opts_.ring_size; }
  uint64_t heap_size() const { return opts_.heap_size; }

  // Hostile tests and the fuzz seeds: raw access to what a malicious guest controls.
  Result<> AppendRaw(std::span<const std::byte> bytes);  // a multiple of 8 bytes
  Result<RemoteBuffer> CreateBufferWithId(uint32_t id, uint64_t size);
  void StoreTail(uint32_t tail);  // publishes `tail` as-is and kicks
  void StoreHead(uint32_t head);  // scribbles on the server-owned head line
  uint32_t tail() const { return tail_; }
  std::span<std::byte> heap() const;
  std::span<std::byte> ring() const;

 private:
  explicit RemotingClient(const RemotingOptions& opts) : opts_(opts) {}
  Result<> Init();
  Result<> Append(remoting::wire::Op op, std::span<const std::byte> payload);
  Result<> WaitForSpace(uint32_t bytes);
  Result<uint64_t> HeapAlloc(uint64_t size);
  Result<> CheckErrors();
  uint32_t Head() const;
  void Kick();

  RemotingOptions opts_;
  UniqueFd sock_;
  UniqueFd memfd_;
  Mapping area_;
  EventFd wake_;   // ours, the daemon waits on it
  EventFd reply_;  // the daemon's, signalled on fences, replies, errors
  uint32_t tail_ = 0;        // local: bytes written
  uint32_t published_ = 0;   // last tail stored to the shared line
  uint64_t heap_top_ = 0;    // bump allocator, reset when the daemon has drained the ring
  uint32_t next_id_ = 1;
  uint64_t fence_seq_ = 0;
  uint64_t read_seq_ = 0;
  uint32_t errors_seen_ = 0;
  RemotingCounters counters_;
};

}  // namespace vg::guest
