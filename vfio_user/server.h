#pragma once
// vfio-user server: ServerSession speaks the protocol for one connected client on behalf of a
// DeviceBackend; Listener accepts clients on a unix socket path inside a libevent loop.
//
// Every message passes staged checks before a backend method sees it (libvfio-user's
// get_request / is_valid_header / should_exec_command): framing (transport), message type,
// the VERSION-first state gate, the command table's minimum payload and fd rule, then the
// handler's own payload checks. A refusal is an error reply carrying ErrcToErrno(code) and
// a log line with ErrcName(code); only framing loss or a dead socket ends the session.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <thread>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "base/base.h"
#include "vfio_user/device.h"
#include "vfio_user/dma.h"
#include "vfio_user/messages.h"
#include "vfio_user/transport.h"

struct event_base;
struct event;

namespace vg::vfio_user {

struct ServerLimits {
  uint32_t max_msg_fds = 16;               // QEMU refuses more than 16
  uint32_t max_data_xfer_size = 1u << 20;  // spec default
  uint64_t pgsizes = kPageSize;
  // Advertised in VERSION; the device's DmaSpace enforces it (DmaLimits::max_regions), with
  // a region charged until its last use ends.
  uint32_t max_dma_maps = DmaLimits{}.max_regions;
  // One DMA_READ/DMA_WRITE transfer (all its chunks) waits at most this long for the client,
  // on the worker thread that asked (never on the loop), as QEMU's client does.
  int dma_timeout_ms = 5000;
  // A DMA_UNMAP is answered when the last use of the removed memory ends (the loop never
  // waits for it); after this long it is answered kBusy instead.
  int unmap_timeout_ms = 4000;
  size_t max_pending_output = 8u << 20;    // stop reading from a client that does not read
  // A connected client that has not sent VERSION by then is dropped, so an idle connection
  // cannot hold the device's one client slot (0: no limit).
  int version_timeout_ms = 10000;
};

// Largest message the server accepts: a REGION_WRITE of max_data_xfer_size bytes.
inline uint32_t MaxRequestSize(const ServerLimits& l) {
  return kHeaderSize + static_cast<uint32_t>(sizeof(RegionAccessPayload)) + l.max_data_xfer_size;
}

class ServerSession final : public DmaMessenger {
 public:
  // Calls dev.OnConnect(this); the destructor calls dev.OnDisconnect().
  ServerSession(DeviceBackend& dev, UniqueFd sock, ServerLimits limits = {});
  ~ServerSession() override;
  ServerSession(const ServerSession&) = delete;
  ServerSession& operator=(const ServerSession&) = delete;

  int fd() const { return conn_.fd(); }
  // Handles the messages the socket has (bounded per call for fairness). An error means the
  // session must end (peer gone, stream unframeable, fatal VERSION mismatch).
  Result<> OnReadable();
  Result<> OnWritable();
  bool WantsWrite() const;
  bool OutputBackedUp() const;
  // DMA_UNMAPs waiting for the last use of the memory they removed (loop thread only).
  bool HasPendingUnmaps() const { return !unmaps_.empty(); }
  // Answers the DMA_UNMAPs whose memory is idle now, and kBusy those past unmap_timeout_ms.
  Result<> PollUnmaps();

  // One framed message through validation and dispatch (also the fuzz entry point).
  Result<> HandleMessage(Message msg);

  bool negotiated() const { return negotiated_; }
  bool twin_socket() const;
  DmaRwLayout dma_rw_layout() const { return dma_rw_layout_; }
  uint64_t refusals() const { return refusals_; }  // loop thread only

  // DmaMessenger, for worker threads only. Over the twin socket when negotiated, otherwise
  // over the main socket (QEMU's client serves server requests there), where the loop routes
  // the reply to the waiting worker. Called on the loop thread it refuses with kWouldBlock:
  // the loop never waits on a guest. One server request is outstanding at a time; a
  // transfer waits at most dma_timeout_ms in all, however many chunks or unrelated
  // messages the client sends meanwhile.
  Result<> DmaRead(Gpa addr, std::span<std::byte> out) override;
  Result<> DmaWrite(Gpa addr, std::span<const std::byte> data) override;

 private:
  struct Reply {
    std::vector<std::byte> payload;
    std::vector<int> fds;  // borrowed; dup'ed by the transport
    bool later = false;    // the handler answers later (a DMA_UNMAP waiting for its drain)
  };
  struct PendingUnmap {
    Header req;
    std::vector<std::byte> payload;  // the reply: the original DMA entry
    DmaDrain drain;
    std::chrono::steady_clock::time_point deadline;
  };
  using Handler = Result<Reply> (ServerSession::*)(Message&);
  enum class FdRule : uint8_t { kNone, kZeroOrOne, kUpToMax };
  struct CommandSpec {
    const char* name;
    uint32_t min_payload;
    FdRule fds;
    Handler handler;  // nullptr: no such command
  };
  static const CommandSpec kCommands[kMaxCommand + 1];

  Result<> Validate(const Message& m, const CommandSpec*& spec) const;
  Result<> SendError(const Header& req, const Error& e);

  Result<Reply> HandleVersion(Message& m);
  Result<Reply> HandleDmaMap(Message& m);
  Result<Reply> HandleDmaUnmap(Message& m);
  Result<Reply> HandleGetInfo(Message& m);
  Result<Reply> HandleGetRegionInfo(Message& m);
  Result<Reply> HandleGetRegionIoFds(Message& m);
  Result<Reply> HandleGetIrqInfo(Message& m);
  Result<Reply> HandleSetIrqs(Message& m);
  Result<Reply> HandleRegionRead(Message& m);
  Result<Reply> HandleRegionWrite(Message& m);
  Result<Reply> HandleRegionWriteMulti(Message& m);
  Result<Reply> HandleReset(Message& m);
  Result<Reply> HandleUnsupported(Message& m);

  Result<RegionInfo> CheckRegionAccess(uint32_t region, uint64_t offset, uint64_t count, uint32_t need) const;
  Result<> DmaTransfer(Command cmd, Gpa addr, std::span<std::byte> in, std::span<const std::byte> out);
  Result<Message> TwinRoundTrip(const Header& h, std::span<const std::byte> body,
                                std::chrono::steady_clock::time_point deadline);
  Result<Message> MainRoundTrip(const Header& h, std::span<const std::byte> body,
                                std::chrono::steady_clock::time_point deadline);
  Result<> SendLocked(const Header& h, std::span<const std::byte> payload, std::span<const int> fds = {});

  DeviceBackend& dev_;
  ServerLimits limits_;
  // conn_'s receive side belongs to the loop thread; its send queue is shared with DMA
  // requests from worker threads and guarded by send_mu_.
  Connection conn_;
  mutable std::mutex send_mu_;
  std::atomic<bool> negotiated_{false};
  std::atomic<bool> closing_{false};
  bool fatal_ = false;
  std::atomic<std::thread::id> loop_thread_{};
  std::deque<PendingUnmap> unmaps_;  // loop thread only

  // The one outstanding server -> client request on the main socket.
  struct Pending {
    uint16_t id = 0;
    uint16_t command = 0;
    std::optional<Message> reply;
  };
  std::mutex dma_mu_;  // serializes server requests (both sockets)
  std::mutex pend_mu_;
  std::condition_variable pend_cv_;
  std::optional<Pending> pending_;
  uint32_t peer_max_fds_ = kDefaultMaxMsgFds;
  uint32_t peer_max_xfer_ = kDefaultMaxDataXfer;
  DmaRwLayout dma_rw_layout_ = DmaRwLayout::kQemu;  // set once by VERSION
  uint64_t refusals_ = 0;
  uint64_t unsolicited_ = 0;  // replies to nothing outstanding (rate-limits their log line)

  mutable std::mutex twin_mu_;
  std::unique_ptr<Connection> twin_;
  std::atomic<int> twin_fd_{-1};  // shut down on close to wake a worker blocked on the twin
  uint16_t next_dma_id_ = 0;
  bool twin_broken_ = false;
  uint64_t twin_dropped_ = 0;  // unexpected messages on the twin socket (rate-limits the log)
};

// Serves one device on a unix socket path, one client at a time: a second concurrent
// connection is closed at once. A client that breaks the protocol or dies is dropped alone;
// the listener keeps accepting.
class Listener {
 public:
  // Binds and listens on `path`, unlinked again when the listener goes.
  static Result<std::unique_ptr<Listener>> Create(event_base* base, const std::string& path, DeviceBackend& dev,
                                                  ServerLimits limits = {});
  // Accepts on a socket that already listens and that someone else owns the path of (a
  // vgpud worker serves the socket its supervisor bound); `name` is for the log only.
  static Result<std::unique_ptr<Listener>> CreateOnSocket(event_base* base, UniqueFd listening, std::string name,
                                                          DeviceBackend& dev, ServerLimits limits = {});
  ~Listener();
  Listener(const Listener&) = delete;
  Listener& operator=(const Listener&) = delete;

  const std::string& path() const { return path_; }
  bool HasClient() const { return session_ != nullptr; }
  ServerSession* session() { return session_.get(); }
  void DropClient();
  uint64_t accepted() const { return accepted_.load(); }  // readable from any thread
  uint64_t refused() const { return refused_.load(); }

 private:
  Listener(event_base* base, std::string path, DeviceBackend& dev, ServerLimits limits, UniqueFd sock, bool owns_path);
  Result<> Arm();
  static void OnAccept(int fd, short what, void* arg);
  static void OnAcceptBackoff(int fd, short what, void* arg);
  bool SessionHungUp() const;
  static void OnClient(int fd, short what, void* arg);
  static void OnVersionTimeout(int fd, short what, void* arg);
  static void OnUnmapPoll(int fd, short what, void* arg);
  void UpdateEvents();

  event_base* base_;
  std::string path_;
  DeviceBackend& dev_;
  ServerLimits limits_;
  UniqueFd sock_;
  bool owns_path_;
  event* accept_ev_ = nullptr;
  event* accept_backoff_ev_ = nullptr;  // re-arms accept_ev_ after EMFILE (AcceptConnection)
  event* read_ev_ = nullptr;
  event* write_ev_ = nullptr;
  event* version_timer_ = nullptr;
  event* unmap_timer_ = nullptr;  // armed while a DMA_UNMAP waits for its drain
  bool unmap_armed_ = false;
  bool write_armed_ = false;
  bool read_armed_ = false;
  std::unique_ptr<ServerSession> session_;
  std::atomic<uint64_t> accepted_{0};
  std::atomic<uint64_t> refused_{0};
};

}  // namespace vg::vfio_user
