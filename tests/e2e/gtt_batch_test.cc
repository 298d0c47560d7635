// GTT updates in bulk (F12 item 3), against the real daemon: the GTT batch (GTT_BATCH_GO, an
// array in guest memory, all or nothing) and REGION_WRITE_MULTI to the GTT window (each entry
// checked as a REGION_WRITE), what a create/destroy costs in vfio-user messages, and hostile
// batches beside a victim tenant.
#include <doctest.h>

#include <cstring>

#include "guest/guest.h"
#include "tests/e2e/guest_checks.h"
#include "tests/e2e/harness.h"
#include "tests/e2e/victim.h"

using namespace vg;
using namespace vg::e2e;
using namespace vg::guest;
namespace vu = vg::vfio_user;

namespace {

// The attacker's RAM sits at a GPA the victim's does not (the victim's is the default,
// 0x1'0000'0000), so "the victim's memory" is an address only the victim mapped.
constexpr uint64_t kAttackerRam = 0x3'0000'0000;
constexpr uint64_t kVictimRam = DeviceOptions{}.ram_base.v;

struct Guest {
  std::unique_ptr<Device> dev;
  std::unique_ptr<Driver> drv;
  explicit Guest(const std::string& socket, DeviceOptions o = {}, DriverOptions d = {}) {
    o.socket = socket;
    o.ram_size = 16 << 20;
    if (o.ram_base.v == DeviceOptions{}.ram_base.v) o.ram_base = Gpa{kAttackerRam};
    auto dv = Device::Open(o);
    REQUIRE_MESSAGE(dv.ok(), Why(dv.ok() ? Ok() : Result<>(dv.error())));
    dev = std::move(dv).value();
    auto r = Driver::Create(*dev, d);
    REQUIRE_MESSAGE(r.ok(), Why(r.ok() ? Ok() : Result<>(r.error())));
    drv = std::move(r).value();
  }
  uint64_t Entry(uint32_t i) { return dev->Read64(abi::kGttOffset + i * 8).value_or(~0ull); }
};

std::vector<std::string> TwoVgpus() { return {std::string(kUuidA) + ":small", std::string(kUuidB) + ":small"}; }

// Messages of one Alloc + Free of `bytes`.
uint64_t CycleMessages(Guest& g, uint64_t bytes) {
  uint64_t m0 = g.dev->messages();
  auto b = g.drv->Alloc(bytes);
  REQUIRE(b.ok());
  REQUIRE(g.drv->Free(*b).ok());
  return g.dev->messages() - m0;
}

}  // namespace

TEST_CASE("GTT updates cost O(1) vfio-user messages per Alloc + Free") {
  // Each Free clears at once here (lazy_free off): what a create and a destroy cost each.
  Daemon daemon({std::string(kUuidA) + ":small"});
  {
    DriverOptions d;
    d.lazy_free = false;
    Guest g(daemon.Socket(0), {}, d);
    REQUIRE(g.drv->uses_gtt_batch());
    uint64_t small = CycleMessages(g, 64 << 10), big = CycleMessages(g, 1 << 20);
    MESSAGE("GTT batch: ", small, " messages per Alloc+Free of 64 KiB (16 pages), ", big, " for 1 MiB (256 pages)");
    CHECK(small <= 3);
    CHECK(big == small);
    CHECK(g.drv->counters().gtt_writes == 0);
    ExpectStillWorks(g);
  }
  {
    DriverOptions d;
    d.gtt_batch = false;
    d.lazy_free = false;
    Guest g(daemon.Socket(0), {}, d);
    REQUIRE(g.dev->client().caps().write_multiple);
    uint64_t small = CycleMessages(g, 64 << 10), big = CycleMessages(g, 1 << 20);
    MESSAGE("REGION_WRITE_MULTI: ", small, " messages per Alloc+Free of 64 KiB, ", big, " for 1 MiB");
    CHECK(small == 3);  // one multi-write each way and the ERR_COUNT read
    CHECK(big == 5);    // 256 entries: two multi-writes (200 at most each) each way
    ExpectStillWorks(g);
  }
  {
    DeviceOptions o;
    o.write_multi = false;
    DriverOptions d;
    d.gtt_batch = false;
    d.lazy_free = false;
    Guest g(daemon.Socket(0), o, d);
    uint64_t small = CycleMessages(g, 64 << 10);
    MESSAGE("per-entry REGION_WRITE: ", small, " messages per Alloc+Free of 64 KiB");
    CHECK(small == 33);
  }
  {
    // RAM shared without an fd: the device could not read the array without waiting on us,
    // so the driver does not offer it one.
    DeviceOptions o;
    o.share_ram_fd = false;
    DriverOptions d;
    d.lazy_free = false;
    Guest g(daemon.Socket(0), o, d);
    CHECK(!g.drv->uses_gtt_batch());
    CHECK(CycleMessages(g, 64 << 10) == 3);
    ExpectStillWorks(g);
  }
}

TEST_CASE("lazy Free: one GTT update per create/use/destroy, a reused VA is cleared then mapped in order") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  Guest g(daemon.Socket(0));
  REQUIRE(g.drv->uses_gtt_batch());
  auto cycle = [&](uint32_t value) {
    auto b = g.drv->Alloc(64 << 10);
    REQUIRE(b.ok());
    CommandBuilder cb;
    cb.Fill(b->va, 64 << 10, value);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    REQUIRE(g.drv->Wait(*seq).ok());
    CHECK(reinterpret_cast<uint32_t*>(b->host.data())[(64 << 10) / 4 - 1] == value);
    REQUIRE(g.drv->Free(*b).ok());
    return *b;
  };
  GpuBuffer first = cycle(1);
  const uint32_t index = static_cast<uint32_t>(first.va.v >> kPageShift);
  // Freed but not yet cleared: the entry is still the old mapping until the next update.
  CHECK(g.drv->pending_clears() == 16);
  CHECK((g.Entry(index) & abi::kGttValid) != 0);
  const uint64_t batches0 = g.drv->counters().gtt_batches, messages0 = g.dev->messages();
  for (uint32_t i = 2; i < 12; ++i) {
    GpuBuffer b = cycle(i);
    // First fit: the same VA every cycle, cleared and mapped again in one batch.
    CHECK(b.va.v == first.va.v);
  }
  const uint64_t batches = g.drv->counters().gtt_batches - batches0;
  MESSAGE("10 create/fill/destroy cycles: ", batches, " GTT batches, ", g.dev->messages() - messages0,
          " vfio-user messages (doorbells and interrupts are eventfds)");
  CHECK(batches == 10);
  CHECK(g.dev->messages() - messages0 == 10);
  // A VA freed and not reused: its entries clear at FlushFrees, and at the latest with the
  // next mapping.
  auto other = g.drv->Alloc(8 << 10);
  REQUIRE(other.ok());
  REQUIRE(g.drv->Free(*other).ok());
  const uint32_t other_index = static_cast<uint32_t>(other->va.v >> kPageShift);
  REQUIRE(g.drv->FlushFrees().ok());
  CHECK(g.drv->pending_clears() == 0);
  CHECK(g.Entry(index) == 0);
  CHECK(g.Entry(other_index) == 0);
  CHECK(g.Entry(other_index + 1) == 0);
  ExpectStillWorks(g);
}

TEST_CASE("hostile GTT batches: nothing applied, refused by name with the record, the victim unaffected") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));
  const Gpa arr = g.drv->gtt_batch().gpa;
  auto* rec = reinterpret_cast<abi::GttBatchRecord*>(g.drv->gtt_batch().host.data());
  const uint32_t base = 2000;  // GTT entries the driver has not used
  std::vector<uint64_t> before;
  for (uint32_t i = 0; i < 8; ++i) before.push_back(g.Entry(base + i));
  auto unchanged = [&] {
    for (uint32_t i = 0; i < 8; ++i) CHECK(g.Entry(base + i) == before[i]);
  };
  auto go = [&](uint32_t n) { return g.dev->Write32(abi::reg::kGttBatchGo, n); };
  const uint64_t page = kAttackerRam + (8 << 20);

  // A record in the middle whose entry points at the victim's memory.
  for (uint32_t i = 0; i < 8; ++i) rec[i] = {base + i, 0, (page + i * 4096) | abi::kGttValid | abi::kGttWritable};
  rec[4].entry = kVictimRam | abi::kGttValid;
  CHECK(!go(8).ok());
  unchanged();
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  CHECK(err->code == Errc::kNotMapped);
  CHECK(err->source == abi::kErrSourceGttBatch);
  CHECK(err->info == 4);
  CHECK(err->addr == kVictimRam);

  // The array itself at the victim's address, past the record bound, over the end of RAM.
  REQUIRE(g.dev->Write64(abi::reg::kGttBatchAddrLo, kVictimRam).ok());
  CHECK(!go(1).ok());
  CHECK(g.dev->ReadError()->code == Errc::kNotMapped);
  CHECK(g.dev->ReadError()->info == abi::kGttBatchWhole);
  REQUIRE(g.dev->Write64(abi::reg::kGttBatchAddrLo, arr.v).ok());
  CHECK(!go(abi::kGttBatchMaxRecords + 1).ok());
  CHECK(g.dev->ReadError()->code == Errc::kLimitExceeded);
  const uint64_t end = kAttackerRam + (16 << 20);
  REQUIRE(g.dev->Write64(abi::reg::kGttBatchAddrLo, end - 16).ok());
  CHECK(!go(2).ok());
  CHECK(g.dev->ReadError()->code == Errc::kNotMapped);
  unchanged();

  // Copy once: what was applied is what was there at GO, not what the guest wrote after.
  REQUIRE(g.dev->Write64(abi::reg::kGttBatchAddrLo, arr.v).ok());
  for (uint32_t i = 0; i < 8; ++i) rec[i] = {base + i, 0, (page + i * 4096) | abi::kGttValid};
  REQUIRE(go(8).ok());
  for (uint32_t i = 0; i < 8; ++i) rec[i].entry = kVictimRam | abi::kGttValid;
  for (uint32_t i = 0; i < 8; ++i) CHECK(g.Entry(base + i) == ((page + i * 4096) | abi::kGttValid));
  for (uint32_t i = 0; i < 8; ++i) rec[i] = {base + i, 0, 0};
  REQUIRE(go(8).ok());

  REQUIRE(daemon.Alive());
  REQUIRE(g.dev->ClearError().ok());
  ExpectStillWorks(g);  // the driver's own batches still work
  CheckVictim(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile REGION_WRITE_MULTI to the GTT: each entry checked as a REGION_WRITE, the victim unaffected") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0));
  const uint32_t base = 3000;
  const uint64_t page = kAttackerRam + (8 << 20);
  auto one = [](uint32_t index, uint64_t entry) {
    vu::MultiWrite w;
    w.region = vu::kBar0Region;
    w.offset = abi::kGttOffset + uint64_t{index} * 8;
    w.data.resize(8);
    std::memcpy(w.data.data(), &entry, 8);
    return w;
  };
  // Entries are independent register writes, applied in order: the one before the refused
  // entry stays applied, the refused one and those after it are not.
  std::vector<vu::MultiWrite> ws = {one(base, page | abi::kGttValid), one(base + 1, kVictimRam | abi::kGttValid),
                                    one(base + 2, (page + 4096) | abi::kGttValid)};
  Result<> r = g.dev->client().RegionWriteMulti(ws);
  CHECK(!r.ok());
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  CHECK(err->code == Errc::kNotMapped);
  CHECK(err->source == abi::kErrSourceGtt);
  CHECK(err->info == base + 1);
  CHECK(g.Entry(base) == (page | abi::kGttValid));
  CHECK(g.Entry(base + 1) == 0);
  CHECK(g.Entry(base + 2) == 0);
  // Posted: no reply, the report names it all the same.
  REQUIRE(g.dev->ClearError().ok());
  ws = {one(base + 3, (page + 4096) | abi::kGttValid | 0x40)};
  REQUIRE(g.dev->client().RegionWriteMulti(ws, /*posted=*/true).ok());
  CHECK(g.dev->ReadError()->code == Errc::kBadFlags);
  CHECK(g.Entry(base + 3) == 0);
  // A 4-byte half per entry goes through the same latch as REGION_WRITE.
  vu::MultiWrite lo = one(base + 4, (page + 8192) | abi::kGttValid), hi = lo;
  lo.data.resize(4);
  hi.offset += 4;
  hi.data.erase(hi.data.begin(), hi.data.begin() + 4);
  ws = {lo, hi};
  REQUIRE(g.dev->client().RegionWriteMulti(ws).ok());
  CHECK(g.Entry(base + 4) == ((page + 8192) | abi::kGttValid));
  REQUIRE(daemon.Alive());
  REQUIRE(g.dev->ClearError().ok());
  ExpectStillWorks(g);
  CheckVictim(v.Stop());
}
