#pragma once
// vfio-user client: what the guest library and the tests use to drive a device from another
// process. Typed calls for every client -> server command, the server's DMA_READ/DMA_WRITE
// served from a caller-supplied callback (on the twin socket's own thread, or inline while
// waiting for a reply on the main socket), and raw access for hostile tests.

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "base/base.h"
#include "vfio_user/device.h"
#include "vfio_user/messages.h"
#include "vfio_user/transport.h"

namespace vg::vfio_user {

struct ClientOptions {
  bool twin_socket = true;
  uint32_t max_msg_fds = 16;
  uint32_t max_data_xfer_size = kDefaultMaxDataXfer;
  int timeout_ms = 5000;  // per reply, as QEMU's client
  uint16_t major = kMajorVersion;
  uint16_t minor = kMinorVersion;
  // The DMA_READ/DMA_WRITE layout this client serves (messages.h DmaRwLayout). kQemu
  // behaves as QEMU's client does: it does not ask for the spec's layout in VERSION.
  DmaRwLayout dma_rw_layout = DmaRwLayout::kSpec;
};

struct ServerCaps {
  uint16_t major = 0;
  uint16_t minor = 0;
  uint32_t max_msg_fds = kDefaultMaxMsgFds;
  uint32_t max_data_xfer_size = kDefaultMaxDataXfer;
  uint64_t pgsizes = kDefaultPgsizes;
  uint32_t max_dma_maps = kDefaultMaxDmaMaps;
  bool twin_socket = false;
  bool write_multiple = false;
  bool migration = false;
  std::string json;  // as received, without the NUL
};

// Serves a server-initiated DMA: is_write=false fills `buf` from guest memory at addr,
// is_write=true stores `buf` there.
using DmaHandler = std::function<Result<>(bool is_write, Gpa addr, std::span<std::byte> buf)>;

struct ClientRegionInfo {
  RegionInfoPayload info;             // as replied (argsz = size the server needs)
  std::vector<SparseArea> sparse;     // from the sparse-mmap capability
  UniqueFd fd;                        // sent with mappable regions
};

struct ClientIoFds {
  std::vector<SubRegionIoFd> subregions;
  std::vector<UniqueFd> fds;  // indexed by SubRegionIoFd::fd_index
};

struct MultiWrite {
  uint32_t region = 0;
  uint64_t offset = 0;
  std::vector<std::byte> data;  // 1..8 bytes
};

// Maps a reply's errno back to a named error (lossy where several codes share an errno).
Errc ErrnoToErrc(uint32_t err);

class Client {
 public:
  static Result<std::unique_ptr<Client>> Connect(const std::string& path, int timeout_ms = 5000);
  static std::unique_ptr<Client> Adopt(UniqueFd sock);
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  // VERSION. With opts.twin_socket the server's DMA requests arrive on a second socket that a
  // thread of this client serves with `dma`.
  Result<ServerCaps> Negotiate(const ClientOptions& opts = {}, DmaHandler dma = {});
  const ServerCaps& caps() const { return caps_; }

  Result<DeviceInfoPayload> GetDeviceInfo();
  // Asks with a 32-byte argsz first, then again with what the server says it needs.
  Result<ClientRegionInfo> GetRegionInfo(uint32_t index);
  Result<ClientRegionInfo> GetRegionInfoWithArgsz(uint32_t index, uint32_t argsz);
  Result<ClientIoFds> GetRegionIoFds(uint32_t index);
  Result<IrqInfo> GetIrqInfo(uint32_t index);
  Result<> SetIrqs(const SetIrqsArgs& a, std::span<const int> fds = {}, std::span<const uint8_t> bools = {});
  Result<std::vector<std::byte>> RegionRead(uint32_t region, uint64_t offset, uint32_t count);
  // posted: No_reply, as QEMU sends posted MMIO writes; errors are then not reported.
  Result<> RegionWrite(uint32_t region, uint64_t offset, std::span<const std::byte> data, bool posted = false);
  Result<> RegionWriteMulti(std::span<const MultiWrite> writes, bool posted = false);
  Result<> DmaMap(const DmaMapArgs& a, const UniqueFd& fd);  // memory shared with an fd
  Result<> DmaMap(const DmaMapArgs& a);                      // without: served by DmaHandler
  Result<> DmaUnmap(const DmaUnmapArgs& a);
  Result<> Reset();

  // One request; returns the reply (an error reply becomes an Error with the mapped code).
  // With no_reply, returns at once with an empty message.
  Result<Message> Request(Command cmd, std::span<const std::byte> payload, std::span<const int> fds = {},
                          bool no_reply = false);
  // Raw access for hostile tests: bytes go out exactly as given; ReceiveRaw returns the next
  // message (error replies included) with its fds.
  Result<> SendRaw(std::span<const std::byte> bytes, std::span<const int> fds = {});
  Result<Message> ReceiveRaw(int timeout_ms);
  uint16_t NextId() { return ++next_id_; }
  // Without a twin socket the server's DMA requests arrive on the main socket; Request()
  // serves them while it waits, and an idle client calls this to serve one (kTimeout when
  // none came within timeout_ms).
  Result<> ServeOneServerRequest(int timeout_ms);

  int fd() const { return conn_.fd(); }
  uint64_t dma_requests_served() const { return dma_served_.load(); }

 private:
  explicit Client(UniqueFd sock);
  // Answers a server -> client command (DMA_READ / DMA_WRITE) on `conn`.
  Result<> ServeServerRequest(Connection& conn, Message& m);
  void TwinLoop();

  std::mutex mu_;  // one request at a time on the main socket
  Connection conn_;
  ClientOptions opts_;
  ServerCaps caps_;
  DmaHandler dma_;
  uint16_t next_id_ = 0;
  std::unique_ptr<Connection> twin_;
  EventFd stop_;
  std::thread twin_thread_;
  std::atomic<uint64_t> dma_served_{0};
};

}  // namespace vg::vfio_user
