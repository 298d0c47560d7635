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

// ---- GTT_UPDATE: GTT updates in the ring (F12, docs/device-spec.md "GTT_UPDATE") ----

namespace {
DriverOptions InRing() {
  DriverOptions d;
  d.gtt_in_ring = true;
  return d;
}
std::vector<uint32_t> Words(const CommandBuilder& cb) { return {cb.dwords().begin(), cb.dwords().end()}; }

// Submits exactly `dwords`, then a fenced NOP, waits for it, and returns the error report
// the raw submission caused (cleared afterwards).
ErrorReport RawRefusal(Guest& g, const std::vector<uint32_t>& dwords) {
  const uint32_t n0 = g.dev->Status32(abi::status::kErrCount);
  REQUIRE(g.drv->SubmitRaw(dwords).ok());
  auto nop = g.drv->Submit(CommandBuilder().Nop());
  REQUIRE(nop.ok());
  (void)g.drv->Wait(*nop, WaitMode::kIrq, 3000);
  auto err = g.dev->ReadError();
  REQUIRE(err.ok());
  CHECK(err->count > n0);
  REQUIRE(g.dev->ClearError().ok());
  return *err;
}
}  // namespace

TEST_CASE("GTT_UPDATE: create/use/destroy crosses only with the doorbell and the interrupt, results exact") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  Guest g(daemon.Socket(0), {}, InRing());
  REQUIRE(g.drv->uses_gtt_ring());
  const DriverCounters c0 = g.drv->counters();
  const uint64_t m0 = g.dev->messages();
  constexpr int kCycles = 200;
  for (int i = 0; i < kCycles; ++i) {
    auto b = g.drv->Alloc(64 << 10);
    REQUIRE(b.ok());
    CommandBuilder cb;
    cb.Fill(b->va, 64 << 10, 0xc0de0000u + i);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    REQUIRE_MESSAGE(g.drv->Wait(*seq).ok(), "cycle ", i);
    const auto* w = reinterpret_cast<const uint32_t*>(b->host.data());
    REQUIRE(w[0] == 0xc0de0000u + i);
    REQUIRE(w[(64 << 10) / 4 - 1] == 0xc0de0000u + i);
    REQUIRE(g.drv->Free(*b).ok());
  }
  const DriverCounters& c = g.drv->counters();
  const uint64_t messages = g.dev->messages() - m0;
  MESSAGE("GTT_UPDATE: ", kCycles, " cycles: ", messages, " vfio-user messages, ", c.doorbells - c0.doorbells,
          " doorbells, ", c.gtt_ring_records - c0.gtt_ring_records, " GTT records in the ring");
  CHECK(c.gtt_batches == c0.gtt_batches);  // no GTT_BATCH_GO
  CHECK(c.gtt_writes == c0.gtt_writes);    // no GTT window write
  CHECK(messages == 0);                    // nothing over the socket: ioeventfd, status page, irq eventfd
  CHECK(c.doorbells - c0.doorbells <= uint64_t(kCycles));
  // 16 maps a cycle, and 16 clears for each but the last (still queued).
  CHECK(c.gtt_ring_records - c0.gtt_ring_records == uint64_t(kCycles) * 16 + (kCycles - 1) * 16);
  CHECK(g.drv->pending_ring_gtt() == 16);
  // The device sees a change once the submission that carries it has been taken.
  auto b = g.drv->Alloc(4096);
  REQUIRE(b.ok());
  const uint32_t index = static_cast<uint32_t>(b->va.v >> kPageShift);
  CommandBuilder nop;
  nop.Nop();
  auto seq = g.drv->Submit(nop);
  REQUIRE(seq.ok());
  REQUIRE(g.drv->Wait(*seq).ok());
  CHECK(g.Entry(index) == (b->gpa.v | abi::kGttValid | abi::kGttWritable));
  REQUIRE(g.drv->Free(*b).ok());
  REQUIRE(g.drv->FlushFrees().ok());
  seq = g.drv->Submit(nop);
  REQUIRE(g.drv->Wait(*seq).ok());
  CHECK(g.Entry(index) == 0);
  // Bigger than one submission's share of the ring: sent ahead in GTT-only submissions.
  auto big = g.drv->Alloc(8 << 20);  // 2048 pages
  REQUIRE(big.ok());
  CommandBuilder fill;
  fill.Fill(big->va, 8 << 20, 0x5eedu);
  seq = g.drv->Submit(fill);
  REQUIRE(seq.ok());
  REQUIRE(g.drv->Wait(*seq).ok());
  CHECK(reinterpret_cast<const uint32_t*>(big->host.data())[(8 << 20) / 4 - 1] == 0x5eedu);
  REQUIRE(g.drv->Free(*big).ok());
  ExpectStillWorks(g);
}

TEST_CASE("GTT_UPDATE translates in ring order inside one submission; a refused submission changes nothing") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  Guest g(daemon.Socket(0), {}, InRing());
  REQUIRE(g.drv->uses_gtt_ring());
  auto mem = g.drv->Alloc(4 * 4096);  // RAM to point entries at; its own VA too
  REQUIRE(mem.ok());
  const uint32_t base = 5000;  // GTT entries the driver has not used
  const GpuVa va{uint64_t{base} << kPageShift};
  auto rec = [&](uint32_t i, uint64_t entry) { return abi::GttBatchRecord{base + i, 0, entry}; };
  const uint64_t rw = abi::kGttValid | abi::kGttWritable;
  // Map, fill through the new mapping, unmap, in one submission: the FILL uses the staged
  // entries; the GTT ends unmapped.
  {
    CommandBuilder cb;
    std::vector<abi::GttBatchRecord> map = {rec(0, mem->gpa.v | rw), rec(1, (mem->gpa.v + 4096) | rw)};
    std::vector<abi::GttBatchRecord> unmap = {rec(0, 0), rec(1, 0)};
    cb.GttUpdate(map).Fill(va, 2 * 4096, 0xabcd1234u).GttUpdate(unmap);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    REQUIRE(g.drv->Wait(*seq).ok());
    CHECK(reinterpret_cast<const uint32_t*>(mem->host.data())[2047] == 0xabcd1234u);
    CHECK(g.Entry(base) == 0);
    CHECK(g.Entry(base + 1) == 0);
  }
  // Unmapped earlier in the same submission: the FILL after it is refused, kNotMapped.
  {
    CommandBuilder cb;
    std::vector<abi::GttBatchRecord> map = {rec(0, mem->gpa.v | rw)}, unmap = {rec(0, 0)};
    cb.GttUpdate(map).GttUpdate(unmap).Fill(va, 4096, 1);
    auto seq = g.drv->Submit(cb);
    REQUIRE(seq.ok());
    auto w = g.drv->Wait(*seq, WaitMode::kIrq, 3000);
    CHECK(w.code() == Errc::kNotMapped);
    CHECK(g.Entry(base) == 0);  // the refused submission's map never took effect
    REQUIRE(g.dev->ClearError().ok());
  }
  // A good update followed by a bad command: nothing of the submission applies.
  {
    CommandBuilder cb;
    std::vector<abi::GttBatchRecord> map = {rec(2, mem->gpa.v | rw)};
    cb.GttUpdate(map).Raw(std::vector<uint32_t>{abi::cmd::Header(0x7f, 1)});
    CHECK(RawRefusal(g, Words(cb)).code == Errc::kUnknownCommand);
    CHECK(g.Entry(base + 2) == 0);
  }
  ExpectStillWorks(g);
}

TEST_CASE("hostile GTT_UPDATEs: a bad record in the middle changes nothing, refused by name, the victim unaffected") {
  Daemon daemon(TwoVgpus());
  Victim v(daemon.Socket(1));
  Guest g(daemon.Socket(0), {}, InRing());
  REQUIRE(g.drv->uses_gtt_ring());
  const uint32_t base = 6000;
  const uint64_t page = kAttackerRam + (8 << 20);
  std::vector<uint64_t> before;
  for (uint32_t i = 0; i < 8; ++i) before.push_back(g.Entry(base + i));
  auto unchanged = [&] {
    for (uint32_t i = 0; i < 8; ++i) CHECK(g.Entry(base + i) == before[i]);
  };
  auto good = [&] {
    std::vector<abi::GttBatchRecord> r;
    for (uint32_t i = 0; i < 8; ++i) r.push_back({base + i, 0, (page + i * 4096) | abi::kGttValid | abi::kGttWritable});
    return r;
  };
  // Submits `dwords` raw and returns the error report it caused.
  auto refused = [&](const std::vector<uint32_t>& dwords) {
    ErrorReport e = RawRefusal(g, dwords);
    unchanged();
    return e;
  };
  struct Bad {
    const char* what;
    uint64_t entry;
    uint32_t index_bump;
    uint32_t pad;
    Errc want;
  };
  const Bad bads[] = {
      {"the victim's RAM (not mapped for this client)", kVictimRam | abi::kGttValid, 0, 0, Errc::kNotMapped},
      {"past the end of its own RAM", (kAttackerRam + (16 << 20)) | abi::kGttValid, 0, 0, Errc::kNotMapped},
      {"an aperture page past the aperture", (1ull << 40) | abi::kGttValid | abi::kGttAperture, 0, 0, Errc::kOutOfBounds},
      {"reserved flag bits", page | abi::kGttValid | 0x80, 0, 0, Errc::kBadFlags},
      {"an index past the GTT", page | abi::kGttValid, 1u << 30, 0, Errc::kOutOfBounds},
      {"a non-zero pad", page | abi::kGttValid, 0, 7, Errc::kInvalidArgument},
  };
  for (const Bad& b : bads) {
    CAPTURE(b.what);
    std::vector<abi::GttBatchRecord> r = good();
    r[4].entry = b.entry;
    r[4].index += b.index_bump;
    r[4].pad = b.pad;
    ErrorReport e = refused(Words(CommandBuilder().GttUpdate(r)));
    CHECK(e.code == b.want);
    CHECK(e.source == abi::kErrSourceCommand);
  }
  // Malformed commands: no records, too many, a length that disagrees with the count, flags.
  {
    std::vector<uint32_t> zero = {abi::cmd::Header(abi::cmd::kGttUpdate, 2), 0};
    CHECK(refused(zero).code == Errc::kInvalidArgument);
    std::vector<abi::GttBatchRecord> many(abi::cmd::kGttUpdateMaxRecords + 1, abi::GttBatchRecord{base, 0, 0});
    CHECK(refused(Words(CommandBuilder().GttUpdate(many))).code == Errc::kLimitExceeded);
    std::vector<uint32_t> lying = Words(CommandBuilder().GttUpdate(good()));
    lying[1] = 9;  // says 9 records, carries 8
    CHECK(refused(lying).code == Errc::kBadLength);
    std::vector<uint32_t> flagged = Words(CommandBuilder().GttUpdate(good()));
    flagged[0] |= 1u << 16;
    CHECK(refused(flagged).code == Errc::kBadFlags);
  }
  REQUIRE(daemon.Alive());
  ExpectStillWorks(g);
  CheckVictim(v.Stop());
  CHECK(daemon.Alive());
}

TEST_CASE("hostile GTT_UPDATE flood: more records in one submission than the bound is refused by name") {
  Daemon daemon({std::string(kUuidA) + ":small"});
  DriverOptions big = InRing();
  big.ring_size = 1 << 20;
  Guest g(daemon.Socket(0), {}, big);
  REQUIRE(g.drv->uses_gtt_ring());
  // 17 full commands: one record past kMaxGttRecordsPerSubmission.
  std::vector<abi::GttBatchRecord> full(abi::cmd::kGttUpdateMaxRecords, abi::GttBatchRecord{6000, 0, 0});
  CommandBuilder cb;
  for (uint32_t i = 0; i <= abi::cmd::kMaxGttRecordsPerSubmission / abi::cmd::kGttUpdateMaxRecords; ++i)
    cb.GttUpdate(full);
  CHECK(RawRefusal(g, Words(cb)).code == Errc::kLimitExceeded);
  ExpectStillWorks(g);
  CHECK(daemon.Alive());
}
