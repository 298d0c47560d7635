#include "vfio_user/client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>

namespace vg::vfio_user {
namespace {

struct ErrnoRow {
  uint32_t err;
  Errc code;
};
// First match wins; where several Errc share an errno the most common meaning is listed.
constexpr ErrnoRow kErrnoTable[] = {
    {EINVAL, Errc::kInvalidArgument}, {EFAULT, Errc::kOutOfBounds},    {ENOTSUP, Errc::kUnsupported},
    {ENOSYS, Errc::kUnknownCommand},  {ENOMEM, Errc::kOutOfMemory},    {EIO, Errc::kIo},
    {E2BIG, Errc::kMessageTooLarge},  {EPERM, Errc::kReadOnly},        {EEXIST, Errc::kOverlap},
    {ENOENT, Errc::kNotFound},        {EBUSY, Errc::kBusy},            {ETIMEDOUT, Errc::kTimeout},
    {EACCES, Errc::kAccessDenied},    {ECONNRESET, Errc::kPeerClosed}, {ELOOP, Errc::kRecursion},
};

}  // namespace

Errc ErrnoToErrc(uint32_t err) {
  for (const auto& r : kErrnoTable)
    if (r.err == err) return r.code;
  return Errc::kIo;
}

Client::Client(UniqueFd sock) : conn_(std::move(sock), kHeaderSize + 64 + (64u << 20), 253) {}

Client::~Client() {
  if (twin_thread_.joinable()) {
    (void)stop_.Signal();
    twin_thread_.join();
  }
}

std::unique_ptr<Client> Client::Adopt(UniqueFd sock) { return std::unique_ptr<Client>(new Client(std::move(sock))); }

Result<std::unique_ptr<Client>> Client::Connect(const std::string& path, int timeout_ms) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  VG_INVALID_IF(path.size() >= sizeof(sa.sun_path), "socket path '{}' too long", path);
  std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    VG_ERROR_IF(!s.Valid(), Errc::kIo, "socket: {}", std::strerror(errno));
    if (::connect(s.Get(), reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) return Adopt(std::move(s));
    int e = errno;
    // The daemon may not have created the socket yet.
    VG_ERROR_IF(std::chrono::steady_clock::now() >= deadline, Errc::kTimeout, "connect {}: {}", path,
                std::strerror(e));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

Result<Message> Client::Request(Command cmd, std::span<const std::byte> payload, std::span<const int> fds,
                                bool no_reply) {
  std::lock_guard lk(mu_);
  Header h;
  h.msg_id = NextId();
  h.command = static_cast<uint16_t>(cmd);
  h.flags = kTypeCommand | (no_reply ? kFlagNoReply : 0);
  VG_TRY(conn_.Send(h, payload, fds));
  VG_TRY(conn_.FlushBlocking(opts_.timeout_ms));
  if (no_reply) return Message{h, {}, {}, false, false};
  for (;;) {
    VG_TRY_ASSIGN(Message m, conn_.ReceiveBlocking(opts_.timeout_ms));
    if (m.type() == kTypeCommand) {
      // Server request on the main socket (no twin socket): serve it, keep waiting.
      VG_TRY(ServeServerRequest(conn_, m));
      continue;
    }
    VG_ERROR_IF(m.hdr.msg_id != h.msg_id || m.hdr.command != h.command, Errc::kBadMessage,
                "reply id {} command {} to request id {} command {}", m.hdr.msg_id, m.hdr.command, h.msg_id,
                h.command);
    if (m.is_error())
      return MakeError(ErrnoToErrc(m.hdr.error), "server refused {}: errno {} ({})", CommandName(h.command),
                       m.hdr.error, std::strerror(static_cast<int>(m.hdr.error)));
    return m;
  }
}

Result<> Client::SendRaw(std::span<const std::byte> bytes, std::span<const int> fds) {
  std::lock_guard lk(mu_);
  VG_TRY(conn_.SendBytes(bytes, fds));
  return conn_.FlushBlocking(opts_.timeout_ms);
}

Result<Message> Client::ReceiveRaw(int timeout_ms) {
  std::lock_guard lk(mu_);
  return conn_.ReceiveBlocking(timeout_ms);
}

Result<> Client::ServeOneServerRequest(int timeout_ms) {
  std::lock_guard lk(mu_);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    VG_ERROR_IF(left.count() <= 0, Errc::kTimeout, "no server request within {} ms", timeout_ms);
    VG_TRY_ASSIGN(Message m, conn_.ReceiveBlocking(static_cast<int>(left.count())));
    if (m.type() == kTypeCommand) return ServeServerRequest(conn_, m);
  }
}

Result<ServerCaps> Client::Negotiate(const ClientOptions& opts, DmaHandler dma) {
  opts_ = opts;
  dma_ = std::move(dma);
  nlohmann::json caps = {{"max_msg_fds", opts.max_msg_fds},
                         {"max_data_xfer_size", opts.max_data_xfer_size},
                         {"pgsizes", kDefaultPgsizes},
                         {"write_multiple", true}};
  if (opts.twin_socket) caps["twin_socket"] = {{"supported", true}};
  if (opts.dma_rw_layout == DmaRwLayout::kSpec) caps[kCapDmaRwLayout] = "spec";
  std::string js = nlohmann::json{{"capabilities", caps}}.dump();
  std::vector<std::byte> body;
  Append(body, VersionPayload{opts.major, opts.minor});
  auto jb = std::as_bytes(std::span(js.data(), js.size() + 1));
  body.insert(body.end(), jb.begin(), jb.end());
  VG_TRY_ASSIGN(Message m, Request(Command::kVersion, body));

  VG_ERROR_IF(m.payload.size() < sizeof(VersionPayload), Errc::kTruncated, "VERSION reply of {} bytes",
              m.payload.size());
  auto v = LoadAt<VersionPayload>(m.payload);
  VG_ERROR_IF(v.major != opts.major || v.minor > opts.minor, Errc::kBadMessage, "server replied version {}.{}",
              v.major, v.minor);
  ServerCaps sc;
  sc.major = v.major;
  sc.minor = v.minor;
  auto rest = std::span<const std::byte>(m.payload).subspan(sizeof(VersionPayload));
  if (!rest.empty()) {
    const char* s = reinterpret_cast<const char*>(rest.data());
    const void* nul = std::memchr(s, 0, rest.size());
    VG_ERROR_IF(!nul, Errc::kBadMessage, "VERSION reply JSON is not NUL-terminated");
    sc.json.assign(s, static_cast<const char*>(nul));
    auto j = nlohmann::json::parse(sc.json, nullptr, false);
    VG_ERROR_IF(j.is_discarded() || !j.is_object(), Errc::kBadMessage, "VERSION reply JSON: {}", sc.json);
    if (j.contains("capabilities") && j["capabilities"].is_object()) {
      const auto& c = j["capabilities"];
      auto u = [&](const char* k, auto& dst) {
        if (c.contains(k) && c[k].is_number_unsigned()) dst = c[k].get<std::remove_reference_t<decltype(dst)>>();
      };
      u("max_msg_fds", sc.max_msg_fds);
      u("max_data_xfer_size", sc.max_data_xfer_size);
      u("pgsizes", sc.pgsizes);
      u("max_dma_maps", sc.max_dma_maps);
      sc.write_multiple = c.contains("write_multiple") && c["write_multiple"].is_boolean() &&
                          c["write_multiple"].get<bool>();
      sc.migration = c.contains("migration");
      if (c.contains("twin_socket") && c["twin_socket"].is_object()) {
        const auto& t = c["twin_socket"];
        if (t.contains("supported") && t["supported"].is_boolean() && t["supported"].get<bool>()) {
          // Spec: supported without a valid fd_index is inconsistent; abort.
          VG_ERROR_IF(!opts.twin_socket, Errc::kBadMessage, "server enabled twin_socket we did not offer");
          VG_ERROR_IF(!t.contains("fd_index") || !t["fd_index"].is_number_unsigned() ||
                          t["fd_index"].get<uint64_t>() >= m.fds.size(),
                      Errc::kBadMessage, "twin_socket without a valid fd_index");
          twin_ = std::make_unique<Connection>(std::move(m.fds[t["fd_index"].get<size_t>()]),
                                               kHeaderSize + sizeof(DmaAccessPayload) + opts.max_data_xfer_size, 0);
          sc.twin_socket = true;
        }
      }
    }
  }
  caps_ = sc;
  if (twin_) {
    VG_TRY_ASSIGN(stop_, EventFd::Create());
    twin_thread_ = std::thread([this] { TwinLoop(); });
  }
  return sc;
}

Result<> Client::ServeServerRequest(Connection& conn, Message& m) {
  Header rh;
  rh.msg_id = m.hdr.msg_id;
  rh.command = m.hdr.command;
  rh.flags = kTypeReply;
  Result<std::vector<std::byte>> body = [&]() -> Result<std::vector<std::byte>> {
    bool is_read = m.hdr.command == static_cast<uint16_t>(Command::kDmaRead);
    bool is_write = m.hdr.command == static_cast<uint16_t>(Command::kDmaWrite);
    VG_ERROR_IF(!is_read && !is_write, Errc::kUnknownCommand, "server sent command {}", m.hdr.command);
    VG_ERROR_IF(!dma_, Errc::kUnsupported, "no DMA handler");
    VG_ERROR_IF(m.payload.size() < sizeof(DmaAccessPayload), Errc::kTruncated, "DMA request of {} bytes",
                m.payload.size());
    const DmaRwWire wire = DmaRwWireOf(opts_.dma_rw_layout);
    auto a = LoadAt<DmaAccessPayload>(m.payload);
    if (opts_.dma_rw_layout == DmaRwLayout::kQemu) a.count = static_cast<uint32_t>(a.count);  // a 4-byte count
    VG_ERROR_IF(a.count > opts_.max_data_xfer_size, Errc::kMessageTooLarge, "DMA of {} bytes", a.count);
    std::vector<std::byte> out;
    if (is_read) {
      VG_ERROR_IF(m.payload.size() != sizeof(DmaAccessPayload), Errc::kBadMessage, "DMA_READ with data");
      Append(out, a);
      out.resize(wire.data_offset + a.count + wire.trailing);
      VG_TRY(dma_(false, Gpa{a.addr}, std::span(out).subspan(wire.data_offset, a.count)));
    } else {
      VG_ERROR_IF(m.payload.size() != wire.data_offset + a.count + wire.trailing, Errc::kBadLength,
                  "DMA_WRITE of {} bytes for count {}", m.payload.size(), a.count);
      VG_TRY(dma_(true, Gpa{a.addr}, std::span(m.payload).subspan(wire.data_offset, a.count)));
      if (opts_.dma_rw_layout == DmaRwLayout::kSpec) Append(out, a);  // QEMU answers with a bare header
    }
    return out;
  }();
  dma_served_.fetch_add(1);
  if (!body.ok()) {
    rh.flags |= kFlagError;
    rh.error = static_cast<uint32_t>(ErrcToErrno(body.code()));
    VG_TRY(conn.Send(rh, {}));
  } else {
    VG_TRY(conn.Send(rh, *body));
  }
  return conn.FlushBlocking(opts_.timeout_ms);
}

void Client::TwinLoop() {
  for (;;) {
    pollfd p[2] = {{twin_->fd(), POLLIN, 0}, {stop_.Get(), POLLIN, 0}};
    int r = ::poll(p, 2, -1);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 || (p[1].revents & POLLIN)) return;
    for (;;) {
      auto m = twin_->Receive();
      if (!m.ok()) return;  // server went away
      if (!*m) break;
      if ((*m)->type() != kTypeCommand) continue;
      if (!ServeServerRequest(*twin_, **m).ok()) return;
    }
  }
}

Result<DeviceInfoPayload> Client::GetDeviceInfo() {
  DeviceInfoPayload req{sizeof(DeviceInfoPayload), 0, 0, 0};
  VG_TRY_ASSIGN(Message m, Request(Command::kDeviceGetInfo, AsBytes(req)));
  VG_ERROR_IF(m.payload.size() < sizeof(DeviceInfoPayload), Errc::kTruncated, "DEVICE_GET_INFO reply");
  return LoadAt<DeviceInfoPayload>(m.payload);
}

Result<ClientRegionInfo> Client::GetRegionInfoWithArgsz(uint32_t index, uint32_t argsz) {
  RegionInfoPayload req;
  req.argsz = argsz;
  req.index = index;
  VG_TRY_ASSIGN(Message m, Request(Command::kDeviceGetRegionInfo, AsBytes(req)));
  VG_ERROR_IF(m.payload.size() < sizeof(RegionInfoPayload), Errc::kTruncated, "REGION_INFO reply of {} bytes",
              m.payload.size());
  ClientRegionInfo out;
  out.info = LoadAt<RegionInfoPayload>(m.payload);
  if (!m.fds.empty()) out.fd = std::move(m.fds[0]);
  // Walk the capability chain inside what was received, bounded against loops.
  uint32_t off = out.info.cap_offset;
  for (int hops = 0; off != 0 && hops < 16; ++hops) {
    VG_ERROR_IF(!RangeWithin(off, sizeof(SparseMmapCap), m.payload.size()), Errc::kOutOfBounds,
                "capability at {} outside the reply", off);
    auto cap = LoadAt<SparseMmapCap>(m.payload, off);
    if (cap.header.id == kCapSparseMmap) {
      uint64_t areas_bytes = uint64_t{cap.nr_areas} * sizeof(SparseMmapAreaWire);
      VG_ERROR_IF(!RangeWithin(off + sizeof(SparseMmapCap), areas_bytes, m.payload.size()), Errc::kOutOfBounds,
                  "sparse mmap areas outside the reply");
      for (uint32_t i = 0; i < cap.nr_areas; ++i) {
        auto a = LoadAt<SparseMmapAreaWire>(m.payload, off + sizeof(SparseMmapCap) + i * sizeof(SparseMmapAreaWire));
        out.sparse.push_back(SparseArea{a.offset, a.size});
      }
    }
    off = cap.header.next;
  }
  return out;
}

Result<ClientRegionInfo> Client::GetRegionInfo(uint32_t index) {
  VG_TRY_ASSIGN(ClientRegionInfo r, GetRegionInfoWithArgsz(index, sizeof(RegionInfoPayload)));
  if (r.info.argsz <= sizeof(RegionInfoPayload)) return r;
  return GetRegionInfoWithArgsz(index, r.info.argsz);
}

Result<ClientIoFds> Client::GetRegionIoFds(uint32_t index) {
  RegionIoFdsPayload req{sizeof(RegionIoFdsPayload), 0, index, 0};
  VG_TRY_ASSIGN(Message m, Request(Command::kDeviceGetRegionIoFds, AsBytes(req)));
  VG_ERROR_IF(m.payload.size() < sizeof(RegionIoFdsPayload), Errc::kTruncated, "REGION_IO_FDS reply");
  auto head = LoadAt<RegionIoFdsPayload>(m.payload);
  if (head.argsz > sizeof(RegionIoFdsPayload) && m.payload.size() == sizeof(RegionIoFdsPayload)) {
    req.argsz = head.argsz;
    VG_TRY_ASSIGN(m, Request(Command::kDeviceGetRegionIoFds, AsBytes(req)));
    head = LoadAt<RegionIoFdsPayload>(m.payload);
  }
  VG_ERROR_IF(m.payload.size() != sizeof(RegionIoFdsPayload) + uint64_t{head.count} * sizeof(SubRegionIoFd),
              Errc::kBadMessage, "REGION_IO_FDS reply of {} bytes for {} entries", m.payload.size(), head.count);
  ClientIoFds out;
  for (uint32_t i = 0; i < head.count; ++i)
    out.subregions.push_back(
        LoadAt<SubRegionIoFd>(m.payload, sizeof(RegionIoFdsPayload) + i * sizeof(SubRegionIoFd)));
  out.fds = std::move(m.fds);
  return out;
}

Result<IrqInfo> Client::GetIrqInfo(uint32_t index) {
  IrqInfoPayload req{sizeof(IrqInfoPayload), 0, index, 0};
  VG_TRY_ASSIGN(Message m, Request(Command::kDeviceGetIrqInfo, AsBytes(req)));
  VG_ERROR_IF(m.payload.size() < sizeof(IrqInfoPayload), Errc::kTruncated, "IRQ_INFO reply");
  auto r = LoadAt<IrqInfoPayload>(m.payload);
  return IrqInfo{r.flags, r.count};
}

Result<> Client::SetIrqs(const SetIrqsArgs& a, std::span<const int> fds, std::span<const uint8_t> bools) {
  std::vector<std::byte> body;
  SetIrqsPayload p{static_cast<uint32_t>(sizeof(SetIrqsPayload) + bools.size()), a.flags, a.index, a.start, a.count};
  Append(body, p);
  auto bb = std::as_bytes(bools);
  body.insert(body.end(), bb.begin(), bb.end());
  VG_TRY(Request(Command::kDeviceSetIrqs, body, fds));
  return Ok();
}

Result<std::vector<std::byte>> Client::RegionRead(uint32_t region, uint64_t offset, uint32_t count) {
  RegionAccessPayload p{offset, region, count};
  VG_TRY_ASSIGN(Message m, Request(Command::kRegionRead, AsBytes(p)));
  VG_ERROR_IF(m.payload.size() != sizeof(RegionAccessPayload) + count, Errc::kBadMessage,
              "REGION_READ reply of {} bytes for {}", m.payload.size(), count);
  return std::vector<std::byte>(m.payload.begin() + sizeof(RegionAccessPayload), m.payload.end());
}

Result<> Client::RegionWrite(uint32_t region, uint64_t offset, std::span<const std::byte> data, bool posted) {
  std::vector<std::byte> body;
  Append(body, RegionAccessPayload{offset, region, static_cast<uint32_t>(data.size())});
  body.insert(body.end(), data.begin(), data.end());
  VG_TRY(Request(Command::kRegionWrite, body, {}, posted));
  return Ok();
}

Result<> Client::RegionWriteMulti(std::span<const MultiWrite> writes, bool posted) {
  std::vector<std::byte> body;
  Append(body, WriteMultiPayload{writes.size()});
  for (const auto& w : writes) {
    VG_INVALID_IF(w.data.size() > kWriteMultiData, "multi write of {} bytes", w.data.size());
    WriteOne one{w.offset, w.region, static_cast<uint32_t>(w.data.size()), {}};
    std::memcpy(one.data, w.data.data(), w.data.size());
    Append(body, one);
  }
  VG_TRY(Request(Command::kRegionWriteMulti, body, {}, posted));
  return Ok();
}

Result<> Client::DmaMap(const DmaMapArgs& a, const UniqueFd& fd) {
  DmaMapPayload p{sizeof(DmaMapPayload), a.prot, a.fd_offset, a.iova.v, a.size.v};
  int f = fd.Get();
  VG_TRY(Request(Command::kDmaMap, AsBytes(p), std::span<const int>(&f, 1)));
  return Ok();
}

Result<> Client::DmaMap(const DmaMapArgs& a) {
  DmaMapPayload p{sizeof(DmaMapPayload), a.prot, 0, a.iova.v, a.size.v};
  VG_TRY(Request(Command::kDmaMap, AsBytes(p)));
  return Ok();
}

Result<> Client::DmaUnmap(const DmaUnmapArgs& a) {
  DmaUnmapPayload p{sizeof(DmaUnmapPayload), a.flags, a.iova.v, a.size.v};
  VG_TRY(Request(Command::kDmaUnmap, AsBytes(p)));
  return Ok();
}

Result<> Client::Reset() {
  VG_TRY(Request(Command::kDeviceReset, {}));
  return Ok();
}

}  // namespace vg::vfio_user
