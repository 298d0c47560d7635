// The real daemon driven by a client that behaves as QEMU's vfio-user-pci (hw/vfio-user/ in
// QEMU 10.1 and 10.2) does, message for message: what it sends, in what layout and order, and
// what it refuses in a reply. Each TEST_CASE is a regression test for an incompatibility a
// real VMM found (F14), so the default suite catches it without QEMU:
// - QEMU sizes every reply buffer by its request (argsz + header for GET_REGION_INFO, the
//   request's own size elsewhere) and fails a larger reply;
// - it asks GET_REGION_INFO with argsz 32 first and refuses FLAG_CAPS outside the reply;
// - it caps max_msg_fds at 16 and max_data_xfer_size at 64 MiB in VERSION's reply;
// - DMA_MAPs of RAM (one memfd, several offsets), of read-only ROM and of fd-less memory,
//   pipelined without waiting for replies;
// - SET_IRQS with argsz 20 and the fds only in SCM_RIGHTS, an fd of -1 sent as no fd;
// - MSI-X enabled by a config write (the table itself is emulated by QEMU and never written);
// - posted writes (NO_REPLY) and REGION_WRITE_MULTI, later reads ordered after them;
// - server DMA_READ/DMA_WRITE answered in QEMU's VFIOUserDMARW layout (a 4-byte count);
// - DEVICE_RESET on reboot.
#include <doctest.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "guest/guest.h"
#include "tests/e2e/harness.h"
#include "vfio_user/client.h"

using namespace vg;
using namespace vg::e2e;
namespace vu = vg::vfio_user;

namespace {

// QEMU's VERSION capabilities (proxy.c caps_json), byte for byte in content.
constexpr const char* kQemuCaps =
    R"({"capabilities":{"migration":{"pgsize":4096,"max_bitmap_size":268435456},"max_msg_fds":16,)"
    R"("max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}})";

template <class T>
std::vector<std::byte> Pod(const T& v) {
  auto b = std::as_bytes(std::span(&v, 1));
  return {b.begin(), b.end()};
}

// A vfio-user client with QEMU's habits. Server requests (DMA_READ/WRITE) that arrive while
// it waits for a reply are served from the fd-less regions it registered, in QEMU's layout.
class QemuLike {
 public:
  explicit QemuLike(const std::string& path) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path.c_str());
    bool ok = false;
    for (int i = 0; i < 500 && !ok; ++i) {
      ok = ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0;
      if (!ok) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    REQUIRE(ok);
    conn_ = std::make_unique<vu::Connection>(UniqueFd(fd), 64u << 20, 16);
  }

  // Sends a request and returns its id; nothing waits (QEMU's nowait/async sends).
  uint16_t Send(vu::Command c, std::span<const std::byte> payload, std::span<const int> fds = {},
                uint32_t flags = 0) {
    vu::Header h;
    h.msg_id = ++id_;
    h.command = static_cast<uint16_t>(c);
    h.flags = vu::kTypeCommand | flags;
    REQUIRE(conn_->Send(h, payload, fds).ok());
    REQUIRE(conn_->FlushBlocking(5000).ok());
    sizes_[h.msg_id] = vu::kHeaderSize + payload.size();
    return h.msg_id;
  }
  // The reply to `id`, within QEMU's 5 s, no larger than QEMU's buffer for it (rsize; 0:
  // the request's own size, as vfio_user_send_wait does).
  vu::Message Wait(uint16_t id, size_t rsize = 0) {
    if (rsize == 0) rsize = sizes_.at(id);
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      REQUIRE_MESSAGE(left.count() > 0, "no reply to message " << id << " within QEMU's 5 s");
      auto m = conn_->ReceiveBlocking(static_cast<int>(left.count()));
      REQUIRE_MESSAGE(m.ok(), m.error().ToString());
      if (m->type() == vu::kTypeCommand) {
        ServeRequest(*m);
        continue;
      }
      // QEMU matches replies to requests by id; a reply nobody waits for is an error.
      REQUIRE_MESSAGE(m->hdr.msg_id == id, "reply " << m->hdr.msg_id << " while waiting for " << id);
      CHECK_MESSAGE(m->hdr.msg_size <= rsize, "reply of " << m->hdr.msg_size << " bytes for a " << rsize
                                                          << "-byte buffer (QEMU: reply larger than recv buffer)");
      return std::move(*m);
    }
  }
  vu::Message Call(vu::Command c, std::span<const std::byte> payload, std::span<const int> fds = {},
                   size_t rsize = 0) {
    return Wait(Send(c, payload, fds), rsize);
  }
  // No message may arrive (posted writes get no reply).
  void ExpectSilence(int ms) {
    auto m = conn_->ReceiveBlocking(ms);
    CHECK_MESSAGE(!m.ok(), "unexpected message " << (m.ok() ? m->hdr.command : 0));
  }

  void AddFdlessRegion(uint64_t iova, std::span<std::byte> mem) { fdless_[iova] = mem; }
  uint64_t dma_reads = 0, dma_writes = 0;

  // Region access as QEMU's vfio_user_device_io_region_read/write.
  std::vector<std::byte> Read(uint32_t region, uint64_t off, uint32_t count) {
    vu::RegionAccessPayload p{off, region, count};
    auto m = Call(vu::Command::kRegionRead, Pod(p), {}, vu::kHeaderSize + sizeof p + count);
    REQUIRE(!m.is_error());
    REQUIRE(m.payload.size() == sizeof p + count);
    return {m.payload.begin() + sizeof p, m.payload.end()};
  }
  template <class T>
  T ReadAs(uint32_t region, uint64_t off) {
    auto b = Read(region, off, sizeof(T));
    T v;
    std::memcpy(&v, b.data(), sizeof v);
    return v;
  }
  template <class T>
  vu::Message Write(uint32_t region, uint64_t off, T v, uint32_t flags = 0) {
    std::vector<std::byte> body = Pod(vu::RegionAccessPayload{off, region, sizeof(T)});
    auto vb = Pod(v);
    body.insert(body.end(), vb.begin(), vb.end());
    uint16_t id = Send(vu::Command::kRegionWrite, body, {}, flags);
    if (flags & vu::kFlagNoReply) return {};
    return Wait(id);
  }

 private:
  void ServeRequest(vu::Message& m) {
    // hw/vfio-user/pci.c vfio_user_dma_read/write: VFIOUserDMARW {hdr; u64 offset; u32 count;
    // char data[]}: data at +12 after the header, messages sizeof(VFIOUserDMARW) + count.
    REQUIRE(m.payload.size() >= 16);
    uint64_t addr;
    uint32_t count;
    std::memcpy(&addr, m.payload.data(), 8);
    std::memcpy(&count, m.payload.data() + 8, 4);
    REQUIRE_MESSAGE(count <= (1u << 20), "server DMA of " << count << " bytes past QEMU's max_data_xfer_size");
    std::span<std::byte> mem;
    for (auto& [iova, span] : fdless_)
      if (addr >= iova && addr - iova + count <= span.size()) mem = span.subspan(addr - iova, count);
    REQUIRE_MESSAGE(!mem.empty(), "server DMA outside the fd-less regions at " << addr);
    vu::Header rh = m.hdr;
    rh.flags = vu::kTypeReply;
    if (m.hdr.command == static_cast<uint16_t>(vu::Command::kDmaRead)) {
      REQUIRE(m.payload.size() == 16);  // QEMU: hdr.size >= sizeof(VFIOUserDMARW)
      std::vector<std::byte> body(16 + count);
      std::memcpy(body.data(), m.payload.data(), 16);
      std::memcpy(body.data() + 12, mem.data(), count);
      REQUIRE(conn_->Send(rh, body).ok());
      ++dma_reads;
    } else {
      REQUIRE(m.hdr.command == static_cast<uint16_t>(vu::Command::kDmaWrite));
      // QEMU: count must fit in hdr.size - sizeof(VFIOUserDMARW).
      REQUIRE(count <= m.payload.size() - 16);
      std::memcpy(mem.data(), m.payload.data() + 12, count);
      REQUIRE(conn_->Send(rh, {}).ok());  // a bare header
      ++dma_writes;
    }
    REQUIRE(conn_->FlushBlocking(5000).ok());
  }

  std::unique_ptr<vu::Connection> conn_;
  uint16_t id_ = 0;
  std::map<uint16_t, size_t> sizes_;
  std::map<uint64_t, std::span<std::byte>> fdless_;
};

// VERSION, GET_INFO, GET_REGION_INFO for every region, GET_IRQ_INFO for every index: QEMU's
// realize. Returns the regions' infos with their fds.
struct Realized {
  std::map<uint32_t, vu::RegionInfoPayload> info;
  std::map<uint32_t, std::vector<vu::SparseMmapAreaWire>> areas;
  std::map<uint32_t, UniqueFd> fd;
};

Realized Realize(QemuLike& q) {
  std::vector<std::byte> body = Pod(vu::VersionPayload{0, 0});
  std::string caps = kQemuCaps;
  auto cb = std::as_bytes(std::span(caps.data(), caps.size() + 1));
  body.insert(body.end(), cb.begin(), cb.end());
  auto v = q.Call(vu::Command::kVersion, body);
  REQUIRE(!v.is_error());
  auto ver = vu::LoadAt<vu::VersionPayload>(v.payload);
  CHECK(ver.major == 0);
  CHECK(ver.minor == 0);
  REQUIRE(v.payload.back() == std::byte{0});  // "corrupt version reply" otherwise
  auto j = nlohmann::json::parse(reinterpret_cast<const char*>(v.payload.data() + 4));
  const auto& c = j.at("capabilities");
  CHECK(c.at("max_msg_fds").get<uint64_t>() <= 16);                  // VFIO_USER_MAX_MAX_FDS
  CHECK(c.at("max_data_xfer_size").get<uint64_t>() <= (64u << 20));  // VFIO_USER_MAX_MAX_XFER
  CHECK(c.at("pgsizes").get<uint64_t>() % 4096 == 0);
  CHECK(c.at("max_dma_maps").get<uint64_t>() <= 65535);
  CHECK(!c.contains(vu::kCapDmaRwLayout));  // QEMU did not ask: no spurious capability

  vu::DeviceInfoPayload di{16, 0, 0, 0};
  auto d = q.Call(vu::Command::kDeviceGetInfo, Pod(di));
  REQUIRE(!d.is_error());
  di = vu::LoadAt<vu::DeviceInfoPayload>(d.payload);
  CHECK(di.num_regions <= 100);  // QEMU's VFIO_USER_MAX_REGIONS
  CHECK(di.num_irqs <= 50);
  CHECK((di.flags & vu::kDeviceFlagReset) != 0);

  Realized r;
  for (uint32_t i = 0; i < di.num_regions; ++i) {
    uint32_t argsz = 32;
    for (int attempt = 0; attempt < 2; ++attempt) {
      vu::RegionInfoPayload req;
      req.argsz = argsz;
      req.index = i;
      std::vector<std::byte> rb = Pod(req);
      rb.resize(argsz);  // QEMU sends its whole argsz-sized buffer
      auto m = q.Call(vu::Command::kDeviceGetRegionInfo, rb, {}, argsz + vu::kHeaderSize);
      REQUIRE(!m.is_error());
      auto info = vu::LoadAt<vu::RegionInfoPayload>(m.payload);
      // vfio_user_device_io_get_region_info: FLAG_CAPS needs cap_offset within the reply.
      if (info.flags & vu::kRegionCaps) {
        CHECK_MESSAGE(info.cap_offset >= 32, "region " << i << " claims caps at " << info.cap_offset);
        CHECK_MESSAGE(info.cap_offset <= argsz, "region " << i << " claims caps past argsz " << argsz);
      }
      CHECK(m.fds.size() <= 1);
      if (info.argsz > argsz) {  // vfio_device_get_region_info: grow and ask again
        CHECK(attempt == 0);
        CHECK(m.fds.empty());
        argsz = info.argsz;
        continue;
      }
      r.info[i] = info;
      if (!m.fds.empty()) r.fd[i] = std::move(m.fds[0]);
      if (info.flags & vu::kRegionCaps) {
        auto cap = vu::LoadAt<vu::SparseMmapCap>(m.payload, info.cap_offset);
        CHECK(cap.header.id == vu::kCapSparseMmap);
        for (uint32_t a = 0; a < cap.nr_areas; ++a)
          r.areas[i].push_back(vu::LoadAt<vu::SparseMmapAreaWire>(m.payload, info.cap_offset + 16 + 16 * a));
      }
      break;
    }
  }
  for (uint32_t i = 0; i < di.num_irqs; ++i) {
    auto m = q.Call(vu::Command::kDeviceGetIrqInfo, Pod(vu::IrqInfoPayload{16, 0, i, 0}));
    REQUIRE(!m.is_error());
    auto info = vu::LoadAt<vu::IrqInfoPayload>(m.payload);
    // vfio_register_err_notifier: without an ERR vector QEMU warns that error recovery
    // cannot be enabled.
    if (i == vu::kIrqErr) CHECK(info.count >= 1);
  }
  return r;
}

TEST_CASE("QEMU realize: VERSION, argsz negotiation, FLAG_CAPS, sparse mmaps, ERR irq") {
  Daemon d({std::string(kUuidA) + ":small"});
  QemuLike q(d.Socket(0));
  Realized r = Realize(q);
  // BAR0: trapped, mmap-capable with the status page as its sparse area; BAR2 the aperture.
  REQUIRE(r.info.count(vu::kBar0Region));
  CHECK(r.info[vu::kBar0Region].size == abi::kBar0Size);
  REQUIRE(r.areas[vu::kBar0Region].size() == 1);
  CHECK(r.areas[vu::kBar0Region][0].offset == abi::kStatusPageOffset);
  REQUIRE(r.fd.count(vu::kBar0Region));
  // QEMU maps each sparse area from the region's fd at region offset + area offset.
  const auto& area = r.areas[vu::kBar0Region][0];
  void* p = ::mmap(nullptr, area.size, PROT_READ, MAP_SHARED, r.fd[vu::kBar0Region].Get(),
                   static_cast<off_t>(r.info[vu::kBar0Region].offset + area.offset));
  REQUIRE(p != MAP_FAILED);
  uint32_t magic;
  std::memcpy(&magic, static_cast<std::byte*>(p) + abi::status::kMagic, 4);
  CHECK(magic == abi::kIdMagic);
  ::munmap(p, area.size);
  REQUIRE(r.fd.count(vu::kBar2Region));
  CHECK((r.info[vu::kBar2Region].flags & vu::kRegionMmap) != 0);
  // Config space through the trapped region: identity as QEMU reads it at realize.
  CHECK(q.ReadAs<uint16_t>(vu::kConfigRegion, 0) == abi::kVendorId);
  CHECK(q.ReadAs<uint16_t>(vu::kConfigRegion, 2) == abi::kDeviceId);
}

struct Rig {
  Daemon d{{std::string(kUuidA) + ":small"}};
  QemuLike q{d.Socket(0)};
  Realized r = Realize(q);
  static constexpr uint64_t kRamSize = 4 << 20;
  static constexpr uint64_t kHighIova = 1ull << 32;
  static constexpr uint64_t kRomIova = 0xfffc0000;
  static constexpr uint64_t kFdlessIova = 0x80000000;
  UniqueFd ram_fd;
  Mapping ram;
  std::vector<std::byte> rom = std::vector<std::byte>(256 << 10, std::byte{0x5a});
  std::vector<std::byte> fdless = std::vector<std::byte>(1 << 20);
  EventFd irq0, irq1;

  Rig() {
    // memory-backend-memfd: sealed against growing and shrinking, as QEMU seals it.
    int fd = ::memfd_create("qemu-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    REQUIRE(fd >= 0);
    ram_fd = UniqueFd(fd);
    REQUIRE(::ftruncate(fd, kRamSize) == 0);
    REQUIRE(::fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) == 0);
    auto m = Mapping::Map(ram_fd, ByteSize{kRamSize}, 0);
    REQUIRE(m.ok());
    ram = std::move(*m);
    q.AddFdlessRegion(kRomIova, rom);
    q.AddFdlessRegion(kFdlessIova, fdless);
    // The memory listener's transaction: every map sent before any reply is awaited.
    auto map = [&](uint64_t iova, uint64_t size, uint64_t off, uint32_t flags, int f) {
      vu::DmaMapPayload p{32, flags, off, iova, size};
      int fds[1] = {f};
      return q.Send(vu::Command::kDmaMap, Pod(p), f >= 0 ? std::span<const int>(fds) : std::span<const int>());
    };
    std::vector<uint16_t> ids{
        map(0, kRamSize / 2, 0, vu::kDmaRead | vu::kDmaWrite, fd),                       // low RAM
        map(kHighIova, kRamSize / 2, kRamSize / 2, vu::kDmaRead | vu::kDmaWrite, fd),    // high RAM
        map(kRomIova, rom.size(), 0, vu::kDmaRead, -1),                                  // ROM: read-only, no fd
        map(kFdlessIova, fdless.size(), 0, vu::kDmaRead | vu::kDmaWrite, -1),            // RAM without an fd
    };
    for (auto id : ids) {
      auto rep = q.Wait(id);
      CHECK_MESSAGE(!rep.is_error(), "DMA_MAP refused: errno " << rep.hdr.error);
    }
    irq0 = std::move(EventFd::Create()).value();
    irq1 = std::move(EventFd::Create()).value();
    GuestInit();
  }

  // What the guest's driver does at boot, and QEMU for it: memory space + bus master and the
  // MSI-X enable with the function masked are written through to the device; QEMU emulates
  // the table, wires eventfds with SET_IRQS (first vfio_enable_msix_no_vec), then the guest
  // clears the function mask.
  void GuestInit() {
    REQUIRE(!q.Write<uint16_t>(vu::kConfigRegion, 4, 0x0006).is_error());
    uint32_t msix_ctrl = abi::kCapMsixOffset + 2;
    REQUIRE(!q.Write<uint16_t>(vu::kConfigRegion, msix_ctrl, 0xC000 | (abi::kNumVectors - 1)).is_error());
    vu::SetIrqsPayload novec{20, vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, 1};
    REQUIRE(!q.Call(vu::Command::kDeviceSetIrqs, Pod(novec)).is_error());
    vu::SetIrqsPayload vecs{20, vu::kIrqSetDataEventfd | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, 2};
    int fds[2] = {irq0.Get(), irq1.Get()};
    REQUIRE(!q.Call(vu::Command::kDeviceSetIrqs, Pod(vecs), fds).is_error());
    REQUIRE(!q.Write<uint16_t>(vu::kConfigRegion, msix_ctrl, 0x8000 | (abi::kNumVectors - 1)).is_error());
  }

  std::span<std::byte> Ram(uint64_t gpa, uint64_t n) { return ram.bytes().subspan(gpa, n); }
  // True when the device took the entry. A refused one is an error reply (QEMU logs it and
  // goes on) and, for the guest, a named code in ERR_CODE.
  bool Gtt(uint32_t index, uint64_t entry) {
    auto m = q.Write<uint64_t>(vu::kBar0Region, abi::kGttOffset + 8ull * index, entry);
    return !m.is_error();
  }
  uint32_t Reg(uint32_t off) { return q.ReadAs<uint32_t>(vu::kBar0Region, off); }
  bool WaitIrq(const EventFd& e, int ms) {
    pollfd p{e.Get(), POLLIN, 0};
    if (::poll(&p, 1, ms) != 1) return false;
    uint64_t v;
    return ::read(e.Get(), &v, 8) == 8;
  }
};

TEST_CASE("QEMU memory and MMIO: pipelined DMA_MAPs, ring, doorbell, fence IRQ, fd-less DMA in QEMU's layout") {
  Rig g;
  // GPU VA pages: 0 ring (low RAM), 1 fence + data (high RAM), 2 fd-less RAM.
  // GPA 2 MiB lies between low and high RAM (the same memfd at two offsets): refused by name.
  CHECK(!g.Gtt(1, (g.kRamSize / 2) | abi::kGttValid | abi::kGttWritable));
  CHECK(g.Reg(abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kNotMapped));
  REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kErrClear, 0).is_error());
  REQUIRE(g.Gtt(0, 0x0000 | abi::kGttValid | abi::kGttWritable));
  REQUIRE(g.Gtt(1, g.kHighIova | abi::kGttValid | abi::kGttWritable));
  REQUIRE(g.Gtt(2, g.kFdlessIova | abi::kGttValid | abi::kGttWritable));
  CHECK(g.Reg(abi::reg::kErrCode) == 0);

  guest::CommandBuilder cb;
  std::memset(g.fdless.data(), 0x11, 4096);
  cb.Fill(GpuVa{0x1000 + 256}, 256, 0xA5A5A5A5u)
      .Copy(GpuVa{0x1000 + 256}, GpuVa{0x2000 + 64}, 256)  // into fd-less memory: DMA_WRITE
      .Copy(GpuVa{0x2000}, GpuVa{0x1000 + 1024}, 64)       // out of it: DMA_READ
      .Fence(GpuVa{0x1000}, 1, true);
  std::memcpy(g.Ram(0, cb.size_bytes()).data(), cb.dwords().data(), cb.size_bytes());
  for (auto [off, v] : {std::pair{abi::reg::kRingBaseLo, 0u}, {abi::reg::kRingBaseHi, 0u},
                        {abi::reg::kRingSize, 4096u}, {abi::reg::kCtrl, abi::kCtrlRingEnable}})
    REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, off, v).is_error());
  // QEMU sends the doorbell as a synchronous REGION_WRITE (posting is off once a region is
  // mmappable, device.c) and never asks for the ioeventfd.
  REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kRingTail, static_cast<uint32_t>(cb.size_bytes()))
               .is_error());
  // The fence IRQ arrives on MSI-X vector 0 while the client serves the device's DMA.
  bool fired = false;
  for (int i = 0; i < 200 && !fired; ++i) {
    (void)g.Reg(abi::reg::kStatus);  // keeps serving DMA_READ/WRITE the device sends meanwhile
    fired = g.WaitIrq(g.irq0, 50);
  }
  CHECK(fired);
  uint64_t fence;
  std::memcpy(&fence, g.Ram(g.kRamSize / 2, 8).data(), 8);
  CHECK(fence == 1);
  CHECK(g.Reg(abi::reg::kErrCode) == 0);
  CHECK(g.q.dma_writes > 0);
  CHECK(g.q.dma_reads > 0);
  for (int i = 0; i < 256; ++i) REQUIRE(g.fdless[64 + i] == std::byte{0xA5});
  CHECK(g.fdless[63] == std::byte{0x11});
  CHECK(g.fdless[64 + 256] == std::byte{0x11});
  for (int i = 0; i < 64; ++i) REQUIRE(g.Ram(g.kRamSize / 2 + 1024 + i, 1)[0] == std::byte{0x11});
}

TEST_CASE("QEMU read-only DMA regions: no writable GTT entry, no device write into ROM") {
  Rig g;
  CHECK(!g.Gtt(3, g.kRomIova | abi::kGttValid | abi::kGttWritable));  // writable into read-only memory
  CHECK(g.Reg(abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kAccessDenied));
  REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kErrClear, 0).is_error());
  REQUIRE(g.Gtt(0, 0x0000 | abi::kGttValid | abi::kGttWritable));
  REQUIRE(g.Gtt(1, g.kHighIova | abi::kGttValid | abi::kGttWritable));
  REQUIRE(g.Gtt(3, g.kRomIova | abi::kGttValid));  // read-only: allowed
  CHECK(g.Reg(abi::reg::kErrCode) == 0);
  guest::CommandBuilder cb;
  cb.Copy(GpuVa{0x3000}, GpuVa{0x1000 + 512}, 64)  // reading the ROM is fine
      .Fence(GpuVa{0x1000}, 1, false)
      .Fill(GpuVa{0x3000}, 64, 0)  // writing it is refused by name
      .Fence(GpuVa{0x1000}, 2, false);
  std::memcpy(g.Ram(0, cb.size_bytes()).data(), cb.dwords().data(), cb.size_bytes());
  for (auto [off, v] : {std::pair{abi::reg::kRingSize, 4096u}, {abi::reg::kCtrl, abi::kCtrlRingEnable},
                        {abi::reg::kRingTail, static_cast<uint32_t>(cb.size_bytes())}})
    REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, off, v).is_error());
  uint32_t err = 0;
  for (int i = 0; i < 400 && err == 0; ++i) {
    err = g.Reg(abi::reg::kErrCode);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(err != 0);
  CHECK(std::all_of(g.rom.begin(), g.rom.end(), [](std::byte b) { return b == std::byte{0x5a}; }));
  uint64_t fence;
  std::memcpy(&fence, g.Ram(g.kRamSize / 2, 8).data(), 8);
  CHECK(fence != 2);  // the submission stopped at the refused FILL
}

TEST_CASE("QEMU posted writes and REGION_WRITE_MULTI: no reply, ordered before later reads") {
  Rig g;
  // x-no-posted-writes=off and a region without mmap would let QEMU post: NO_REPLY writes.
  (void)g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kScratch, 0x1234u, vu::kFlagNoReply);
  g.q.ExpectSilence(50);
  CHECK(g.Reg(abi::reg::kScratch) == 0x1234u);
  // Past its high-water mark QEMU batches small posted writes into one WRITE_MULTI (NO_REPLY).
  std::vector<std::byte> body = Pod(vu::WriteMultiPayload{3});
  auto one = [&](uint32_t region, uint64_t off, uint32_t v) {
    vu::WriteOne w;
    w.offset = off;
    w.region = region;
    w.count = 4;
    std::memcpy(w.data, &v, 4);
    auto b = Pod(w);
    body.insert(body.end(), b.begin(), b.end());
  };
  one(vu::kBar0Region, abi::reg::kScratch, 0xAAAAu);
  one(vu::kBar0Region, abi::reg::kIrqMask, 0x2u);
  one(vu::kBar0Region, abi::reg::kScratch, 0xBBBBu);  // in order: the last one wins
  (void)g.q.Send(vu::Command::kRegionWriteMulti, body, {}, vu::kFlagNoReply);
  g.q.ExpectSilence(50);
  CHECK(g.Reg(abi::reg::kScratch) == 0xBBBBu);
  CHECK(g.Reg(abi::reg::kIrqMask) == 0x2u);
  // A refused posted write answers nothing either; the device's error report names it.
  (void)g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kId, 1u, vu::kFlagNoReply);
  g.q.ExpectSilence(50);
  CHECK(g.Reg(abi::reg::kErrCode) == static_cast<uint32_t>(Errc::kReadOnly));
}

TEST_CASE("QEMU reboot: DEVICE_RESET answers in time, scrubs the aperture, keeps the session") {
  Rig g;
  auto& bar2 = g.r.fd[vu::kBar2Region];
  uint64_t ap = g.r.info[vu::kBar2Region].size;
  void* p = ::mmap(nullptr, ap, PROT_READ | PROT_WRITE, MAP_SHARED, bar2.Get(),
                   static_cast<off_t>(g.r.info[vu::kBar2Region].offset));
  REQUIRE(p != MAP_FAILED);
  std::memset(p, 0xEE, 8192);
  REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kScratch, 7u).is_error());
  // vfio_pci_pre_reset: QEMU turns the device's interrupts off (DATA_NONE | TRIGGER, count 0).
  vu::SetIrqsPayload off{20, vu::kIrqSetDataNone | vu::kIrqSetActionTrigger, vu::kIrqMsix, 0, 0};
  REQUIRE(!g.q.Call(vu::Command::kDeviceSetIrqs, Pod(off)).is_error());
  auto t0 = std::chrono::steady_clock::now();
  auto m = g.q.Call(vu::Command::kDeviceReset, {});
  CHECK(!m.is_error());
  CHECK(std::chrono::steady_clock::now() - t0 < std::chrono::seconds(5));
  CHECK(static_cast<std::byte*>(p)[0] == std::byte{0});
  CHECK(static_cast<std::byte*>(p)[8191] == std::byte{0});
  CHECK(g.Reg(abi::reg::kScratch) == 0u);
  ::munmap(p, ap);
  // A function-level reset leaves config space at power-on: no bus mastering, no MSI-X, so
  // no interrupt reaches the VMM until the rebooted guest enables them again.
  REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kIrqTest, abi::kVectorFence).is_error());
  CHECK(!g.WaitIrq(g.irq0, 200));
  // The memory maps survive a reset (they belong to the VMM); the rebooted guest enables the
  // device again and its interrupts arrive.
  g.GuestInit();
  REQUIRE(!g.q.Write<uint32_t>(vu::kBar0Region, abi::reg::kIrqTest, abi::kVectorFence).is_error());
  CHECK(g.WaitIrq(g.irq0, 5000));
}

}  // namespace
