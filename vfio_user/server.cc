#include "vfio_user/server.h"

#include <poll.h>

#include <event2/event.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <bit>
#include <chrono>
#include <cstring>
#include <map>
#include <new>
#include <nlohmann/json.hpp>

namespace vg::vfio_user {
namespace {

constexpr int kMessagesPerWakeup = 64;  // fairness between clients on one loop
constexpr uint32_t kIrqDataMask = kIrqSetDataNone | kIrqSetDataBool | kIrqSetDataEventfd;
constexpr uint32_t kIrqActionMask = kIrqSetActionMask | kIrqSetActionUnmask | kIrqSetActionTrigger;

Header ReplyHeader(const Header& req) {
  Header h;
  h.msg_id = req.msg_id;
  h.command = req.command;
  h.flags = kTypeReply;
  return h;
}

}  // namespace

// The dispatch table: command -> {minimum payload, fd rule, handler}. Index = command number.
const ServerSession::CommandSpec ServerSession::kCommands[kMaxCommand + 1] = {
    /* 0 */ {"INVALID(0)", 0, FdRule::kNone, nullptr},
    /* VERSION */ {"VERSION", sizeof(VersionPayload), FdRule::kNone, &ServerSession::HandleVersion},
    /* DMA_MAP */ {"DMA_MAP", sizeof(DmaMapPayload), FdRule::kZeroOrOne, &ServerSession::HandleDmaMap},
    /* DMA_UNMAP */ {"DMA_UNMAP", sizeof(DmaUnmapPayload), FdRule::kNone, &ServerSession::HandleDmaUnmap},
    /* DEVICE_GET_INFO */
    {"DEVICE_GET_INFO", sizeof(DeviceInfoPayload), FdRule::kNone, &ServerSession::HandleGetInfo},
    /* DEVICE_GET_REGION_INFO */
    {"DEVICE_GET_REGION_INFO", sizeof(RegionInfoPayload), FdRule::kNone, &ServerSession::HandleGetRegionInfo},
    /* DEVICE_GET_REGION_IO_FDS */
    {"DEVICE_GET_REGION_IO_FDS", sizeof(RegionIoFdsPayload), FdRule::kNone, &ServerSession::HandleGetRegionIoFds},
    /* DEVICE_GET_IRQ_INFO */
    {"DEVICE_GET_IRQ_INFO", sizeof(IrqInfoPayload), FdRule::kNone, &ServerSession::HandleGetIrqInfo},
    /* DEVICE_SET_IRQS */
    {"DEVICE_SET_IRQS", sizeof(SetIrqsPayload), FdRule::kUpToMax, &ServerSession::HandleSetIrqs},
    /* REGION_READ */
    {"REGION_READ", sizeof(RegionAccessPayload), FdRule::kNone, &ServerSession::HandleRegionRead},
    /* REGION_WRITE */
    {"REGION_WRITE", sizeof(RegionAccessPayload), FdRule::kNone, &ServerSession::HandleRegionWrite},
    // Server -> client only.
    /* DMA_READ */ {"DMA_READ", 0, FdRule::kNone, &ServerSession::HandleUnsupported},
    /* DMA_WRITE */ {"DMA_WRITE", 0, FdRule::kNone, &ServerSession::HandleUnsupported},
    /* DEVICE_RESET */ {"DEVICE_RESET", 0, FdRule::kNone, &ServerSession::HandleReset},
    /* DIRTY_PAGES */ {"DIRTY_PAGES", 0, FdRule::kNone, &ServerSession::HandleUnsupported},
    /* REGION_WRITE_MULTI */
    {"REGION_WRITE_MULTI", sizeof(WriteMultiPayload), FdRule::kNone, &ServerSession::HandleRegionWriteMulti},
    // Migration is not advertised in VERSION, so these are refused.
    /* DEVICE_FEATURE */ {"DEVICE_FEATURE", 0, FdRule::kNone, &ServerSession::HandleUnsupported},
    /* MIG_DATA_READ */ {"MIG_DATA_READ", 0, FdRule::kNone, &ServerSession::HandleUnsupported},
    /* MIG_DATA_WRITE */ {"MIG_DATA_WRITE", 0, FdRule::kNone, &ServerSession::HandleUnsupported},
};

ServerSession::ServerSession(DeviceBackend& dev, UniqueFd sock, ServerLimits limits)
    : dev_(dev), limits_(limits), conn_(std::move(sock), MaxRequestSize(limits), limits.max_msg_fds) {
  dev_.OnConnect(this);
}

ServerSession::~ServerSession() {
  {
    // Wake a worker waiting for a DMA reply that can no longer come.
    std::lock_guard lk(pend_mu_);
    closing_ = true;
    pend_cv_.notify_all();
  }
  if (int tfd = twin_fd_.load(); tfd >= 0) ::shutdown(tfd, SHUT_RDWR);
  dev_.OnDisconnect();
  std::lock_guard lk(twin_mu_);
  twin_.reset();
}

bool ServerSession::twin_socket() const {
  std::lock_guard lk(twin_mu_);
  return twin_ != nullptr;
}

Result<> ServerSession::OnWritable() {
  std::lock_guard lk(send_mu_);
  return conn_.Flush();
}
bool ServerSession::WantsWrite() const {
  std::lock_guard lk(send_mu_);
  return conn_.HasPendingOutput();
}
bool ServerSession::OutputBackedUp() const {
  std::lock_guard lk(send_mu_);
  return conn_.PendingOutputBytes() > limits_.max_pending_output;
}
Result<> ServerSession::SendLocked(const Header& h, std::span<const std::byte> payload, std::span<const int> fds) {
  std::lock_guard lk(send_mu_);
  return conn_.Send(h, payload, fds);
}

Result<> ServerSession::OnReadable() {
  loop_thread_ = std::this_thread::get_id();
  int budget = kMessagesPerWakeup;
  while (!OutputBackedUp()) {
    if (budget-- == 0) break;
    VG_TRY_ASSIGN(std::optional<Message> m, conn_.Receive());
    if (!m) break;
    VG_TRY(HandleMessage(std::move(*m)));
  }
  return Ok();
}

Result<> ServerSession::Validate(const Message& m, const CommandSpec*& spec) const {
  const Header& h = m.hdr;
  VG_ERROR_IF(m.oversized, Errc::kMessageTooLarge, "msg_size {} over the limit of {}", h.msg_size,
              conn_.max_msg_size());
  VG_ERROR_IF(m.type() != kTypeCommand, Errc::kBadMessage, "message type {} is not a command", m.type());
  VG_ERROR_IF((h.flags & ~(kFlagTypeMask | kFlagNoReply)) != 0, Errc::kBadFlags, "header flags {:#x}", h.flags);
  VG_ERROR_IF(h.command > kMaxCommand || kCommands[h.command].handler == nullptr, Errc::kUnknownCommand,
              "unknown command {}", h.command);
  spec = &kCommands[h.command];
  // State gate: VERSION first, and only once.
  VG_ERROR_IF(!negotiated_ && h.command != static_cast<uint16_t>(Command::kVersion), Errc::kBadState,
              "{} before VERSION", spec->name);
  VG_ERROR_IF(negotiated_ && h.command == static_cast<uint16_t>(Command::kVersion), Errc::kBadState,
              "VERSION sent twice");
  VG_ERROR_IF(m.too_many_fds, Errc::kBadFdCount, "{}: more than {} fds", spec->name, limits_.max_msg_fds);
  VG_ERROR_IF(m.payload.size() < spec->min_payload, Errc::kTruncated, "{}: payload of {} bytes, need {}",
              spec->name, m.payload.size(), spec->min_payload);
  size_t nfds = m.fds.size();
  size_t max_fds = spec->fds == FdRule::kNone ? 0 : spec->fds == FdRule::kZeroOrOne ? 1 : limits_.max_msg_fds;
  VG_ERROR_IF(nfds > max_fds, Errc::kBadFdCount, "{}: {} fds, at most {} allowed", spec->name, nfds, max_fds);
  return Ok();
}

Result<> ServerSession::HandleMessage(Message msg) {
  Header req = msg.hdr;
  if (msg.type() == kTypeReply) {
    {
      std::lock_guard lk(pend_mu_);
      if (pending_ && !pending_->reply && pending_->id == req.msg_id && pending_->command == req.command) {
        pending_->reply = std::move(msg);
        pend_cv_.notify_all();
        return Ok();
      }
    }
    // A reply to nothing outstanding (late after a timeout, or made up): ignored, and logged
    // at most 8 times, then once per 1024, so junk cannot become a flood of log lines.
    ++unsolicited_;
    if (unsolicited_ <= 8 || unsolicited_ % 1024 == 0)
      VG_LOGW("vfio-user: ignoring unsolicited reply id {} command {} ({} so far)", req.msg_id,
              CommandName(req.command), unsolicited_);
    return Ok();
  }
  const CommandSpec* spec = nullptr;
  Result<Reply> r = [&]() -> Result<Reply> {
    VG_TRY(Validate(msg, spec));
    // The dispatch boundary: an allocation that fails anywhere below (a handler, the device
    // model, the engine) is this client's kOutOfMemory, never an exception that unwinds the
    // loop and aborts every tenant.
    try {
      return (this->*(spec->handler))(msg);
    } catch (const std::bad_alloc&) {
      return MakeError(Errc::kOutOfMemory, "{}: allocation failed", spec->name);
    }
  }();
  // msg (and any fd a refused request did not consume) is released at the end of this scope.
  if (!r.ok()) {
    VG_TRY(SendError(req, r.error()));
  } else if (r->later) {
    // Answered by PollUnmaps.
  } else if (!msg.no_reply()) {
    VG_TRY(SendLocked(ReplyHeader(req), r->payload, r->fds));
  }
  if (fatal_) {
    std::lock_guard lk(send_mu_);
    (void)conn_.FlushBlocking(100);
    return MakeError(Errc::kUnsupported, "session closed after VERSION mismatch");
  }
  return Ok();
}

Result<> ServerSession::SendError(const Header& req, const Error& e) {
  // Every refusal is logged until a client shows it is hostile; then one line per 1024 so a
  // flood of bad messages cannot turn into a flood of log lines.
  ++refusals_;
  if (refusals_ <= 64 || refusals_ % 1024 == 0)
    VG_LOGW("vfio-user: {} (id {}) refused: {} ({}){}{}", CommandName(req.command), req.msg_id, ErrcName(e.code),
            e.what, (req.flags & kFlagNoReply) ? " [no reply requested]" : "",
            refusals_ > 64 ? fmt::format(" [{} refusals so far]", refusals_) : std::string());
  // Never answer a No_reply message, even with an error (QEMU would take it for the reply
  // to a later request).
  if (req.flags & kFlagNoReply) return Ok();
  Header h = ReplyHeader(req);
  h.flags |= kFlagError;
  h.error = static_cast<uint32_t>(ErrcToErrno(e.code));
  return SendLocked(h, {});
}

// ---- VERSION ----------------------------------------------------------------------------

Result<ServerSession::Reply> ServerSession::HandleVersion(Message& m) {
  auto v = LoadAt<VersionPayload>(m.payload);
  if (v.major != kMajorVersion) {
    // Spec: the server closes the connection when it cannot support the proposed major.
    fatal_ = true;
    return MakeError(Errc::kUnsupported, "client major version {}, server speaks {}", v.major, kMajorVersion);
  }
  nlohmann::json caps = nlohmann::json::object();
  bool want_twin = false;
  std::span<const std::byte> rest = std::span<const std::byte>(m.payload).subspan(sizeof(VersionPayload));
  if (!rest.empty()) {
    const char* s = reinterpret_cast<const char*>(rest.data());
    const void* nul = std::memchr(s, 0, rest.size());
    VG_ERROR_IF(!nul, Errc::kBadMessage, "VERSION data is not NUL-terminated");
    size_t len = static_cast<size_t>(static_cast<const char*>(nul) - s);
    if (len > 0) {
      auto j = nlohmann::json::parse(s, s + len, nullptr, /*allow_exceptions=*/false);
      VG_ERROR_IF(j.is_discarded() || !j.is_object(), Errc::kBadMessage, "VERSION data is not a JSON object");
      if (j.contains("capabilities")) {
        const auto& c = j["capabilities"];
        VG_ERROR_IF(!c.is_object(), Errc::kBadMessage, "VERSION capabilities is not an object");
        if (c.contains("max_msg_fds")) {
          VG_ERROR_IF(!c["max_msg_fds"].is_number_unsigned(), Errc::kBadMessage, "max_msg_fds is not a number");
          peer_max_fds_ = static_cast<uint32_t>(std::min<uint64_t>(c["max_msg_fds"].get<uint64_t>(), 253));
        }
        if (c.contains("max_data_xfer_size")) {
          VG_ERROR_IF(!c["max_data_xfer_size"].is_number_unsigned(), Errc::kBadMessage,
                      "max_data_xfer_size is not a number");
          uint64_t x = c["max_data_xfer_size"].get<uint64_t>();
          VG_ERROR_IF(x == 0, Errc::kInvalidArgument, "max_data_xfer_size 0");
          peer_max_xfer_ = static_cast<uint32_t>(std::min<uint64_t>(x, 1u << 30));
        }
        if (c.contains(kCapDmaRwLayout)) {
          const auto& l = c[kCapDmaRwLayout];
          VG_ERROR_IF(!l.is_string() || (l != "spec" && l != "qemu"), Errc::kBadMessage,
                      "{} is not \"spec\" or \"qemu\"", kCapDmaRwLayout);
          dma_rw_layout_ = l == "spec" ? DmaRwLayout::kSpec : DmaRwLayout::kQemu;
        }
        if (c.contains("twin_socket")) {
          const auto& t = c["twin_socket"];
          VG_ERROR_IF(!t.is_object(), Errc::kBadMessage, "twin_socket is not an object");
          if (t.contains("supported")) {
            VG_ERROR_IF(!t["supported"].is_boolean(), Errc::kBadMessage, "twin_socket.supported is not a bool");
            want_twin = t["supported"].get<bool>();
          }
        }
      }
    }
  }

  Reply reply;
  UniqueFd client_end;
  caps["max_msg_fds"] = limits_.max_msg_fds;
  caps["max_data_xfer_size"] = limits_.max_data_xfer_size;
  caps["pgsizes"] = limits_.pgsizes;
  caps["max_dma_maps"] = limits_.max_dma_maps;
  caps["write_multiple"] = true;
  // Echoed only to a client that asked: QEMU warns about capabilities it does not know.
  if (dma_rw_layout_ == DmaRwLayout::kSpec) caps[kCapDmaRwLayout] = "spec";
  if (want_twin) {
    int sv[2];
    VG_ERROR_IF(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0, Errc::kIo, "socketpair: {}",
                std::strerror(errno));
    UniqueFd ours(sv[0]);
    client_end = UniqueFd(sv[1]);
    {
      std::lock_guard lk(twin_mu_);
      twin_fd_ = ours.Get();
      twin_ = std::make_unique<Connection>(std::move(ours), kHeaderSize + sizeof(DmaAccessPayload) + peer_max_xfer_,
                                           0);
    }
    caps["twin_socket"] = {{"supported", true}, {"fd_index", 0}};
  }
  std::string json = nlohmann::json{{"capabilities", caps}}.dump();
  VersionPayload out{kMajorVersion, std::min(v.minor, kMinorVersion)};
  Append(reply.payload, out);
  auto jb = std::as_bytes(std::span(json.data(), json.size() + 1));  // with the NUL
  reply.payload.insert(reply.payload.end(), jb.begin(), jb.end());
  // The fd must outlive Send (which dups it): keep it in the message's fd list.
  if (client_end.Valid()) {
    reply.fds.push_back(client_end.Get());
    m.fds.push_back(std::move(client_end));
  }
  negotiated_ = true;
  VG_LOGI("vfio-user: negotiated {}.{}{}", out.major, out.minor, want_twin ? " with twin socket" : "");
  return reply;
}

// ---- DMA_MAP / DMA_UNMAP ----------------------------------------------------------------

Result<ServerSession::Reply> ServerSession::HandleDmaMap(Message& m) {
  auto p = LoadAt<DmaMapPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(DmaMapPayload), "DMA_MAP argsz {}", p.argsz);
  VG_ERROR_IF((p.flags & ~(kDmaRead | kDmaWrite)) != 0, Errc::kBadFlags, "DMA_MAP flags {:#x}", p.flags);
  VG_INVALID_IF(p.size == 0, "DMA_MAP of zero bytes at {:#x}", p.addr);
  VG_ERROR_IF(!IsAligned(p.addr, kPageSize) || !IsAligned(p.size, kPageSize) || !IsAligned(p.offset, kPageSize),
              Errc::kMisaligned, "DMA_MAP addr {:#x} size {:#x} offset {:#x} not page aligned", p.addr, p.size,
              p.offset);
  VG_TRY(CheckedAdd(p.addr, p.size));
  // The region count and mapped bytes are bounded by the device's DmaSpace, which charges a
  // region until its last use ends (a count kept here could not see that end).
  UniqueFd fd = m.fds.empty() ? UniqueFd() : std::move(m.fds[0]);
  DmaMapArgs a{Gpa{p.addr}, ByteSize{p.size}, p.offset, p.flags};
  VG_TRY(dev_.DmaMap(a, std::move(fd)));
  return Reply{};
}

Result<ServerSession::Reply> ServerSession::HandleDmaUnmap(Message& m) {
  auto p = LoadAt<DmaUnmapPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(DmaUnmapPayload), "DMA_UNMAP argsz {}", p.argsz);
  VG_ERROR_IF((p.flags & ~kDmaUnmapAll) != 0, Errc::kBadFlags, "DMA_UNMAP flags {:#x}", p.flags);
  if (!(p.flags & kDmaUnmapAll)) {
    VG_INVALID_IF(p.size == 0, "DMA_UNMAP of zero bytes at {:#x}", p.addr);
    VG_TRY(CheckedAdd(p.addr, p.size));
  }
  VG_TRY_ASSIGN(DmaDrain drain, dev_.DmaUnmap(DmaUnmapArgs{Gpa{p.addr}, ByteSize{p.size}, p.flags}));
  Reply r;
  Append(r.payload, p);  // spec: the reply carries the original DMA entry
  if (drain.Idle() || m.no_reply()) return r;
  // Work in flight still uses the memory. The client may reuse it only after our reply, and
  // the loop must not wait: answer from PollUnmaps when the last use ends.
  unmaps_.push_back(PendingUnmap{m.hdr, std::move(r.payload), std::move(drain),
                                 std::chrono::steady_clock::now() + std::chrono::milliseconds(limits_.unmap_timeout_ms)});
  return Reply{{}, {}, true};
}

// Bounded without a limit of its own: each entry holds at least one busy region that no
// other entry holds, and busy regions stay charged to the client (DmaLimits::max_regions).
Result<> ServerSession::PollUnmaps() {
  auto now = std::chrono::steady_clock::now();
  for (auto it = unmaps_.begin(); it != unmaps_.end();) {
    if (it->drain.Idle()) {
      VG_TRY(SendLocked(ReplyHeader(it->req), it->payload));
    } else if (now >= it->deadline) {
      // The region is out of translation already and stays charged to this client until the
      // work ends (it is cut into submissions of bounded duration); the client learns by name
      // that its memory is still in use.
      VG_TRY(SendError(it->req, Error{Errc::kBusy, fmt::format("DMA_UNMAP: {} regions still in use after {} ms",
                                                               it->drain.Busy(), limits_.unmap_timeout_ms)}));
    } else {
      ++it;
      continue;
    }
    it = unmaps_.erase(it);
  }
  return Ok();
}

// ---- Device, region and IRQ info ---------------------------------------------------------

Result<ServerSession::Reply> ServerSession::HandleGetInfo(Message& m) {
  auto p = LoadAt<DeviceInfoPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(DeviceInfoPayload), "DEVICE_GET_INFO argsz {}", p.argsz);
  DeviceInfoPayload out{sizeof(DeviceInfoPayload), dev_.DeviceFlags(), dev_.NumRegions(), dev_.NumIrqs()};
  Reply r;
  Append(r.payload, out);
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleGetRegionInfo(Message& m) {
  auto p = LoadAt<RegionInfoPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(RegionInfoPayload), "DEVICE_GET_REGION_INFO argsz {}", p.argsz);
  VG_ERROR_IF(p.index >= dev_.NumRegions(), Errc::kBadRegion, "region {} of {}", p.index, dev_.NumRegions());
  VG_TRY_ASSIGN(RegionInfo info, dev_.GetRegionInfo(p.index));

  std::vector<std::byte> caps;
  if (!info.sparse_areas.empty()) {
    SparseMmapCap cap;
    cap.header = {kCapSparseMmap, kCapSparseMmapVersion, 0};
    cap.nr_areas = static_cast<uint32_t>(info.sparse_areas.size());
    Append(caps, cap);
    for (const auto& a : info.sparse_areas) Append(caps, SparseMmapAreaWire{a.offset, a.size});
  }
  uint64_t needed = sizeof(RegionInfoPayload) + caps.size();
  VG_ERROR_IF(needed > limits_.max_data_xfer_size, Errc::kInternal, "region {} info of {} bytes", p.index, needed);
  RegionInfoPayload out;
  out.argsz = static_cast<uint32_t>(needed);
  // FLAG_CAPS only on a reply that carries the capabilities, as the kernel's vfio-pci does:
  // QEMU's client refuses a reply whose flags claim capabilities at an offset outside it.
  out.flags = info.flags & ~kRegionCaps;
  out.index = p.index;
  out.size = info.size.v;
  out.offset = info.fd_offset;
  Reply r;
  if (p.argsz < needed) {
    // Too small for the capabilities: say how much is needed (spec "Message sizes"); the
    // client asks again. The fd goes with the complete reply only.
    Append(r.payload, out);
    return r;
  }
  if (!caps.empty()) {
    out.flags |= kRegionCaps;
    out.cap_offset = sizeof(RegionInfoPayload);
  }
  Append(r.payload, out);
  r.payload.insert(r.payload.end(), caps.begin(), caps.end());
  if ((info.flags & kRegionMmap) && info.mmap_fd && info.mmap_fd->Valid()) {
    // The client gets the device's own memory file: seal its size first, or a client that
    // truncates it would make the daemon's accesses SIGBUS. Best effort for non-memfds.
    (void)::fcntl(info.mmap_fd->Get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
    r.fds.push_back(info.mmap_fd->Get());
  }
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleGetRegionIoFds(Message& m) {
  auto p = LoadAt<RegionIoFdsPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(RegionIoFdsPayload), "DEVICE_GET_REGION_IO_FDS argsz {}", p.argsz);
  VG_ERROR_IF(p.flags != 0, Errc::kBadFlags, "DEVICE_GET_REGION_IO_FDS flags {:#x}", p.flags);
  VG_ERROR_IF(p.index >= dev_.NumRegions(), Errc::kBadRegion, "region {} of {}", p.index, dev_.NumRegions());
  VG_TRY_ASSIGN(std::vector<IoFd> iofds, dev_.GetRegionIoFds(p.index));
  std::map<const EventFd*, uint32_t> index_of;
  Reply r;
  std::vector<SubRegionIoFd> subs;
  for (const auto& f : iofds) {
    VG_ERROR_IF(!f.fd || !f.fd->Valid(), Errc::kInternal, "region {} io fd without an eventfd", p.index);
    auto [it, fresh] = index_of.emplace(f.fd, static_cast<uint32_t>(index_of.size()));
    if (fresh) r.fds.push_back(f.fd->Get());
    subs.push_back(SubRegionIoFd{f.offset, f.size, it->second, kIoFdTypeIoeventfd, f.flags, 0, f.datamatch});
  }
  VG_ERROR_IF(r.fds.size() > peer_max_fds_, Errc::kLimitExceeded, "{} io fds, client takes {}", r.fds.size(),
              peer_max_fds_);
  uint64_t needed = sizeof(RegionIoFdsPayload) + subs.size() * sizeof(SubRegionIoFd);
  RegionIoFdsPayload out{static_cast<uint32_t>(needed), 0, p.index, static_cast<uint32_t>(subs.size())};
  Append(r.payload, out);
  if (p.argsz < needed) {
    r.fds.clear();
    return r;
  }
  for (const auto& s : subs) Append(r.payload, s);
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleGetIrqInfo(Message& m) {
  auto p = LoadAt<IrqInfoPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(IrqInfoPayload), "DEVICE_GET_IRQ_INFO argsz {}", p.argsz);
  VG_ERROR_IF(p.index >= dev_.NumIrqs(), Errc::kOutOfBounds, "irq index {} of {}", p.index, dev_.NumIrqs());
  VG_TRY_ASSIGN(IrqInfo info, dev_.GetIrqInfo(p.index));
  Reply r;
  Append(r.payload, IrqInfoPayload{sizeof(IrqInfoPayload), info.flags, p.index, info.count});
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleSetIrqs(Message& m) {
  auto p = LoadAt<SetIrqsPayload>(m.payload);
  VG_INVALID_IF(p.argsz < sizeof(SetIrqsPayload), "DEVICE_SET_IRQS argsz {}", p.argsz);
  VG_ERROR_IF((p.flags & ~(kIrqDataMask | kIrqActionMask)) != 0 || std::popcount(p.flags & kIrqDataMask) != 1 ||
                  std::popcount(p.flags & kIrqActionMask) != 1,
              Errc::kBadFlags, "DEVICE_SET_IRQS flags {:#x}", p.flags);
  VG_ERROR_IF(p.index >= dev_.NumIrqs(), Errc::kOutOfBounds, "irq index {} of {}", p.index, dev_.NumIrqs());
  VG_TRY(CheckedAdd(p.start, p.count));
  // Bound the vector range by the device before anything is sized by `count` (found by the
  // fuzzer: a de-assign of 2^32 vectors with no fds allocated that many empty fds).
  VG_TRY_ASSIGN(IrqInfo info, dev_.GetIrqInfo(p.index));
  VG_ERROR_IF(info.count == 0, Errc::kUnsupported, "DEVICE_SET_IRQS on irq index {} the device lacks", p.index);
  VG_ERROR_IF(uint64_t{p.start} + p.count > info.count, Errc::kOutOfBounds,
              "DEVICE_SET_IRQS vectors [{}, +{}) beyond the {} of index {}", p.start, p.count, info.count, p.index);
  uint32_t data = p.flags & kIrqDataMask;
  std::span<const uint8_t> bools;
  size_t extra = m.payload.size() - sizeof(SetIrqsPayload);
  if (data == kIrqSetDataBool) {
    VG_ERROR_IF(extra < p.count, Errc::kTruncated, "DEVICE_SET_IRQS: {} bool bytes for {} vectors", extra, p.count);
    bools = {reinterpret_cast<const uint8_t*>(m.payload.data()) + sizeof(SetIrqsPayload), p.count};
  }
  std::vector<UniqueFd> fds;
  if (data == kIrqSetDataEventfd) {
    VG_ERROR_IF(!m.fds.empty() && m.fds.size() != p.count, Errc::kBadFdCount, "DEVICE_SET_IRQS: {} fds for {} vectors",
                m.fds.size(), p.count);
    if (m.fds.empty()) {
      fds.resize(p.count);  // no fds: de-assign the range (invalid UniqueFds, device.h)
    } else {
      fds = std::move(m.fds);
    }
  } else {
    VG_ERROR_IF(!m.fds.empty(), Errc::kBadFdCount, "DEVICE_SET_IRQS: {} fds without DATA_EVENTFD", m.fds.size());
  }
  VG_TRY(dev_.SetIrqs(SetIrqsArgs{p.flags, p.index, p.start, p.count}, std::move(fds), bools));
  return Reply{};
}

// ---- Region access ------------------------------------------------------------------------

Result<RegionInfo> ServerSession::CheckRegionAccess(uint32_t region, uint64_t offset, uint64_t count,
                                                    uint32_t need) const {
  VG_ERROR_IF(region >= dev_.NumRegions(), Errc::kBadRegion, "region {} of {}", region, dev_.NumRegions());
  VG_INVALID_IF(count == 0, "access of zero bytes");
  VG_ERROR_IF(count > limits_.max_data_xfer_size, Errc::kMessageTooLarge, "count {} over max_data_xfer_size {}",
              count, limits_.max_data_xfer_size);
  VG_TRY_ASSIGN(RegionInfo info, dev_.GetRegionInfo(region));
  VG_ERROR_IF((info.flags & need) == 0, Errc::kAccessDenied, "region {} does not allow {}", region,
              need == kRegionRead ? "reads" : "writes");
  VG_ERROR_IF(!RangeWithin(offset, count, info.size.v), Errc::kOutOfBounds,
              "region {} access [{:#x}, +{:#x}) beyond its {:#x} bytes", region, offset, count, info.size.v);
  return info;
}

Result<ServerSession::Reply> ServerSession::HandleRegionRead(Message& m) {
  auto p = LoadAt<RegionAccessPayload>(m.payload);
  VG_ERROR_IF(m.payload.size() != sizeof(RegionAccessPayload), Errc::kBadMessage, "REGION_READ payload of {} bytes",
              m.payload.size());
  VG_TRY(CheckRegionAccess(p.region, p.offset, p.count, kRegionRead));
  Reply r;
  Append(r.payload, p);
  r.payload.resize(sizeof(RegionAccessPayload) + p.count);
  VG_TRY(dev_.RegionRead(p.region, p.offset, std::span(r.payload).subspan(sizeof(RegionAccessPayload))));
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleRegionWrite(Message& m) {
  auto p = LoadAt<RegionAccessPayload>(m.payload);
  VG_ERROR_IF(m.payload.size() - sizeof(RegionAccessPayload) != p.count, Errc::kBadLength,
              "REGION_WRITE carries {} bytes for count {}", m.payload.size() - sizeof(RegionAccessPayload), p.count);
  VG_TRY(CheckRegionAccess(p.region, p.offset, p.count, kRegionWrite));
  VG_TRY(dev_.RegionWrite(p.region, p.offset, std::span<const std::byte>(m.payload).subspan(sizeof(p))));
  Reply r;
  Append(r.payload, p);
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleRegionWriteMulti(Message& m) {
  auto p = LoadAt<WriteMultiPayload>(m.payload);
  VG_INVALID_IF(p.wr_cnt == 0 || p.wr_cnt > kWriteMultiMax, "REGION_WRITE_MULTI of {} writes", p.wr_cnt);
  VG_ERROR_IF(m.payload.size() != sizeof(WriteMultiPayload) + p.wr_cnt * sizeof(WriteOne), Errc::kBadLength,
              "REGION_WRITE_MULTI: {} bytes for {} writes", m.payload.size(), p.wr_cnt);
  std::vector<WriteOne> wrs;
  for (uint64_t i = 0; i < p.wr_cnt; ++i)
    wrs.push_back(LoadAt<WriteOne>(m.payload, sizeof(WriteMultiPayload) + i * sizeof(WriteOne)));
  // Validate every write before applying any.
  for (const auto& w : wrs) {
    VG_INVALID_IF(w.count == 0 || w.count > kWriteMultiData, "REGION_WRITE_MULTI entry of {} bytes", w.count);
    VG_TRY(CheckRegionAccess(w.region, w.offset, w.count, kRegionWrite));
  }
  for (const auto& w : wrs)
    VG_TRY(dev_.RegionWrite(w.region, w.offset, std::as_bytes(std::span(w.data, w.count))));
  Reply r;
  Append(r.payload, p);
  return r;
}

Result<ServerSession::Reply> ServerSession::HandleReset(Message&) {
  VG_ERROR_IF((dev_.DeviceFlags() & kDeviceFlagReset) == 0, Errc::kUnsupported, "device has no reset");
  VG_TRY(dev_.Reset());
  return Reply{};
}

Result<ServerSession::Reply> ServerSession::HandleUnsupported(Message& m) {
  return MakeError(Errc::kUnsupported, "{} is not supported by this server", CommandName(m.hdr.command));
}

// ---- DmaMessenger -------------------------------------------------------------------------

Result<Message> ServerSession::TwinRoundTrip(const Header& h, std::span<const std::byte> body,
                                            std::chrono::steady_clock::time_point deadline) {
  std::lock_guard lk(twin_mu_);
  VG_ERROR_IF(twin_broken_, Errc::kDeviceLost, "twin socket lost sync after an earlier failure");
  auto fail = [&](Error e) {
    twin_broken_ = true;  // a lost or late reply would be taken for the next one's
    return Unexpected{std::move(e)};
  };
  auto left_ms = [&] {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    return static_cast<int>(std::max<int64_t>(left.count(), 0));
  };
  if (auto r = twin_->Send(h, body); !r.ok()) return fail(std::move(r).error());
  if (auto r = twin_->FlushBlocking(left_ms()); !r.ok()) return fail(std::move(r).error());
  // One absolute deadline: junk the client sends meanwhile does not buy it more time.
  for (;;) {
    int left = left_ms();
    if (left <= 0)
      return fail(Error{Errc::kTimeout, fmt::format("no reply to {} within {} ms", CommandName(h.command),
                                                    limits_.dma_timeout_ms)});
    auto rr = twin_->ReceiveBlocking(left);
    if (!rr.ok()) return fail(std::move(rr).error());
    if (rr->type() == kTypeReply && rr->hdr.msg_id == h.msg_id) return std::move(rr).value();
    ++twin_dropped_;
    if (twin_dropped_ <= 8 || twin_dropped_ % 1024 == 0)
      VG_LOGW("vfio-user: twin socket: dropping unexpected message id {} ({} so far)", rr->hdr.msg_id,
              twin_dropped_);
  }
}

Result<Message> ServerSession::MainRoundTrip(const Header& h, std::span<const std::byte> body,
                                             std::chrono::steady_clock::time_point deadline) {
  VG_ERROR_IF(closing_, Errc::kPeerClosed, "session is closing");
  {
    std::lock_guard lk(pend_mu_);
    pending_ = Pending{h.msg_id, h.command, std::nullopt};
  }
  struct ClearPending {
    ServerSession* s;
    ~ClearPending() {
      std::lock_guard lk(s->pend_mu_);
      s->pending_.reset();
    }
  } clear{this};
  {
    // Queued, not flushed: the loop's write event sends it (a worker never writes the
    // socket itself, so it never waits on the loop's lock for a slow client).
    std::lock_guard lk(send_mu_);
    VG_TRY(conn_.Send(h, body));
    (void)conn_.Flush();
  }
  // The loop reads the socket and hands the reply over (HandleMessage).
  std::unique_lock lk(pend_mu_);
  bool got = pend_cv_.wait_until(lk, deadline, [&] { return closing_ || pending_->reply.has_value(); });
  VG_ERROR_IF(closing_, Errc::kPeerClosed, "client went away during {}", CommandName(h.command));
  VG_ERROR_IF(!got, Errc::kTimeout, "no reply to {} within {} ms", CommandName(h.command), limits_.dma_timeout_ms);
  return std::move(*pending_->reply);
}

Result<> ServerSession::DmaTransfer(Command cmd, Gpa addr, std::span<std::byte> in, std::span<const std::byte> out) {
  VG_ERROR_IF(!negotiated_, Errc::kBadState, "DMA before the client negotiated");
  // The loop serves every tenant: it never waits for one client's reply. Callers on the loop
  // read such memory from a worker thread (the mediator's ring fetcher, the executor).
  VG_ERROR_IF(std::this_thread::get_id() == loop_thread_.load(), Errc::kWouldBlock,
              "{} at {:#x} requested on the event loop", CommandName(static_cast<uint16_t>(cmd)), addr.v);
  bool twin;
  {
    std::lock_guard lk(twin_mu_);
    twin = twin_ != nullptr;
  }
  std::lock_guard dma_lk(dma_mu_);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(limits_.dma_timeout_ms);
  bool is_read = cmd == Command::kDmaRead;
  const DmaRwWire wire = DmaRwWireOf(dma_rw_layout_);
  uint64_t total = is_read ? in.size() : out.size();
  uint64_t done = 0;
  while (done < total) {
    uint64_t n = std::min<uint64_t>(total - done, peer_max_xfer_);
    VG_TRY_ASSIGN(uint64_t at, CheckedAdd(addr.v, done));
    Header h;
    h.msg_id = ++next_dma_id_;
    h.command = static_cast<uint16_t>(cmd);
    h.flags = kTypeCommand;
    // addr and count read the same in both layouts (little-endian, n < 4 GiB); the data's
    // place and the message's length differ (DmaRwWire).
    std::vector<std::byte> body;
    Append(body, DmaAccessPayload{at, n});
    if (!is_read) {
      body.resize(wire.data_offset);
      body.insert(body.end(), out.begin() + static_cast<ptrdiff_t>(done), out.begin() + static_cast<ptrdiff_t>(done + n));
      body.resize(body.size() + wire.trailing);
    }
    VG_TRY_ASSIGN(Message rep, twin ? TwinRoundTrip(h, body, deadline) : MainRoundTrip(h, body, deadline));
    VG_ERROR_IF(rep.hdr.command != h.command, Errc::kBadMessage, "DMA reply for command {}", rep.hdr.command);
    VG_ERROR_IF(rep.is_error(), Errc::kIo, "client refused {} at {:#x}+{:#x}: errno {}", CommandName(h.command), at,
                n, rep.hdr.error);
    if (is_read) {
      VG_ERROR_IF(rep.payload.size() != wire.data_offset + n + wire.trailing, Errc::kBadMessage,
                  "DMA_READ reply of {} bytes for {}", rep.payload.size(), n);
      auto ra = LoadAt<DmaAccessPayload>(rep.payload);
      uint64_t count = wire.data_offset == sizeof(DmaAccessPayload) ? ra.count : static_cast<uint32_t>(ra.count);
      VG_ERROR_IF(ra.addr != at || count != n, Errc::kBadMessage, "DMA_READ reply for another range");
      std::memcpy(in.data() + done, rep.payload.data() + wire.data_offset, n);
    } else {
      VG_ERROR_IF(rep.payload.size() < wire.write_reply_min, Errc::kBadMessage, "DMA_WRITE reply of {} bytes",
                  rep.payload.size());
    }
    done += n;
  }
  return Ok();
}

Result<> ServerSession::DmaRead(Gpa addr, std::span<std::byte> out) {
  return DmaTransfer(Command::kDmaRead, addr, out, {});
}
Result<> ServerSession::DmaWrite(Gpa addr, std::span<const std::byte> data) {
  return DmaTransfer(Command::kDmaWrite, addr, {}, data);
}

// ---- Listener -----------------------------------------------------------------------------

Result<std::unique_ptr<Listener>> Listener::Create(event_base* base, const std::string& path, DeviceBackend& dev,
                                                   ServerLimits limits) {
  VG_TRY_ASSIGN(UniqueFd sock, ListenUnix(path, SOCK_STREAM, 4));
  std::unique_ptr<Listener> l(new Listener(base, path, dev, limits, std::move(sock), /*owns_path=*/true));
  VG_TRY(l->Arm());
  return l;
}

Result<std::unique_ptr<Listener>> Listener::CreateOnSocket(event_base* base, UniqueFd listening, std::string name,
                                                           DeviceBackend& dev, ServerLimits limits) {
  const int fl = ::fcntl(listening.Get(), F_GETFL);
  VG_ERROR_IF(fl < 0 || ::fcntl(listening.Get(), F_SETFL, fl | O_NONBLOCK) != 0, Errc::kIo, "fcntl {}: {}", name,
              std::strerror(errno));
  std::unique_ptr<Listener> l(new Listener(base, std::move(name), dev, limits, std::move(listening), false));
  VG_TRY(l->Arm());
  return l;
}

Result<> Listener::Arm() {
  accept_ev_ = event_new(base_, sock_.Get(), EV_READ | EV_PERSIST, &Listener::OnAccept, this);
  accept_backoff_ev_ = evtimer_new(base_, &Listener::OnAcceptBackoff, this);
  VG_ERROR_IF(!accept_ev_ || !accept_backoff_ev_ || event_add(accept_ev_, nullptr) != 0, Errc::kInternal,
              "event_add for {}", path_);
  return Ok();
}

Listener::Listener(event_base* base, std::string path, DeviceBackend& dev, ServerLimits limits, UniqueFd sock,
                   bool owns_path)
    : base_(base), path_(std::move(path)), dev_(dev), limits_(limits), sock_(std::move(sock)), owns_path_(owns_path) {}

Listener::~Listener() {
  DropClient();
  if (accept_ev_) event_free(accept_ev_);
  if (accept_backoff_ev_) event_free(accept_backoff_ev_);
  if (owns_path_) ::unlink(path_.c_str());
}

void Listener::DropClient() {
  if (version_timer_) event_free(version_timer_);
  version_timer_ = nullptr;
  if (unmap_timer_) event_free(unmap_timer_);
  unmap_timer_ = nullptr;
  unmap_armed_ = false;
  if (read_ev_) event_free(read_ev_);
  if (write_ev_) event_free(write_ev_);
  read_ev_ = write_ev_ = nullptr;
  read_armed_ = write_armed_ = false;
  session_.reset();  // OnDisconnect
}

void Listener::OnAcceptBackoff(int, short, void* arg) {
  auto* self = static_cast<Listener*>(arg);
  event_add(self->accept_ev_, nullptr);
}

void Listener::OnAccept(int fd, short, void* arg) {
  auto* self = static_cast<Listener*>(arg);
  auto accepted = AcceptConnection(fd);
  if (!accepted.ok()) {
    if (accepted.code() == Errc::kLimitExceeded) {
      // Out of fds: a level-triggered listener left armed would spin the loop.
      VG_LOGW("vfio-user: {}: {}", self->path_, accepted.error().what);
      event_del(self->accept_ev_);
      timeval tv{0, kAcceptBackoffMs * 1000};
      evtimer_add(self->accept_backoff_ev_, &tv);
    }
    return;
  }
  UniqueFd client = std::move(accepted).value();
  if (self->session_ && self->SessionHungUp()) {
    // The previous client is gone but the loop has not seen its EOF yet (a VMM that
    // reconnects at once after a crash): free the slot instead of refusing the newcomer.
    VG_LOGI("vfio-user: {}: previous client hung up; serving the new one", self->path_);
    self->DropClient();
  }
  if (self->session_) {
    // One client per device: a second VMM must not steal or share the device.
    ++self->refused_;
    VG_LOGW("vfio-user: {}: refusing a second concurrent client", self->path_);
    return;  // closed by UniqueFd
  }
  ++self->accepted_;
  self->session_ = std::make_unique<ServerSession>(self->dev_, std::move(client), self->limits_);
  int sfd = self->session_->fd();
  self->read_ev_ = event_new(self->base_, sfd, EV_READ | EV_PERSIST, &Listener::OnClient, self);
  self->write_ev_ = event_new(self->base_, sfd, EV_WRITE | EV_PERSIST, &Listener::OnClient, self);
  if (!self->read_ev_ || !self->write_ev_) {
    self->DropClient();
    return;
  }
  if (self->limits_.version_timeout_ms > 0) {
    self->version_timer_ = evtimer_new(self->base_, &Listener::OnVersionTimeout, self);
    timeval tv{self->limits_.version_timeout_ms / 1000, (self->limits_.version_timeout_ms % 1000) * 1000};
    if (self->version_timer_) evtimer_add(self->version_timer_, &tv);
  }
  self->UpdateEvents();
}

bool Listener::SessionHungUp() const {
  pollfd p{session_->fd(), POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) != 1) return false;
  if (p.revents & (POLLHUP | POLLERR)) return true;
  // Readable with RDHUP: the peer closed its end; any bytes it left are a dead client's.
  return (p.revents & POLLRDHUP) != 0;
}

void Listener::OnVersionTimeout(int, short, void* arg) {
  auto* self = static_cast<Listener*>(arg);
  if (!self->session_ || self->session_->negotiated()) return;
  VG_LOGW("vfio-user: {}: no VERSION within {} ms, dropping the client", self->path_,
          self->limits_.version_timeout_ms);
  self->DropClient();
}

void Listener::OnClient(int, short what, void* arg) {
  auto* self = static_cast<Listener*>(arg);
  if (!self->session_) return;
  Result<> r;
  if (what & EV_WRITE) r = self->session_->OnWritable();
  if (r.ok() && (what & EV_READ)) r = self->session_->OnReadable();
  if (!r.ok()) {
    if (r.code() == Errc::kPeerClosed)
      VG_LOGI("vfio-user: {}: client disconnected", self->path_);
    else
      VG_LOGW("vfio-user: {}: dropping client: {}", self->path_, r.error().ToString());
    self->DropClient();
    return;
  }
  self->UpdateEvents();
}

// While a DMA_UNMAP waits for the last use of its memory, the loop looks again every few
// milliseconds (a drain has no fd to wake us); it never waits for it.
void Listener::OnUnmapPoll(int, short, void* arg) {
  auto* self = static_cast<Listener*>(arg);
  self->unmap_armed_ = false;
  if (!self->session_) return;
  if (Result<> r = self->session_->PollUnmaps(); !r.ok()) {
    VG_LOGW("vfio-user: {}: dropping client: {}", self->path_, r.error().ToString());
    self->DropClient();
    return;
  }
  self->UpdateEvents();
}

void Listener::UpdateEvents() {
  if (!session_) return;
  if (session_->HasPendingUnmaps() && !unmap_armed_) {
    if (!unmap_timer_) unmap_timer_ = evtimer_new(base_, &Listener::OnUnmapPoll, this);
    timeval tv{0, 2000};
    if (unmap_timer_ && evtimer_add(unmap_timer_, &tv) == 0) unmap_armed_ = true;
  }
  bool want_write = session_->WantsWrite();
  bool want_read = !session_->OutputBackedUp();
  if (want_write != write_armed_) {
    want_write ? event_add(write_ev_, nullptr) : event_del(write_ev_);
    write_armed_ = want_write;
  }
  if (want_read != read_armed_) {
    want_read ? event_add(read_ev_, nullptr) : event_del(read_ev_);
    read_armed_ = want_read;
  }
}

}  // namespace vg::vfio_user
