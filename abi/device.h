#pragma once
// The vGPU's guest-visible ABI: PCI identity, BAR layout, register offsets, status-page
// layout, GTT entry format, IRQ vectors. Pure constants, shared by the device model
// (mediator/) and the guest driver library (guest/). docs/device-spec.md is the prose
// version of this file and must stay true to it.

#include <cstdint>

namespace vg::abi {

// --- PCI identity (not a PCI-SIG registered vendor id: experimental use only) ---
inline constexpr uint16_t kVendorId = 0x5647;     // "VG"
inline constexpr uint16_t kDeviceId = 0x0001;
inline constexpr uint16_t kSubsystemVendorId = 0x5647;
inline constexpr uint16_t kSubsystemId = 0x0001;
inline constexpr uint8_t kRevision = 0x01;
inline constexpr uint32_t kClassCode = 0x030200;  // display controller, 3D controller

// --- BAR0: registers, status page, MSI-X table, GTT window ---
inline constexpr uint64_t kBar0Size = 4u << 20;  // 4 MiB
inline constexpr uint32_t kRegsBase = 0x0000;     // page 0: trapped vGPU registers
inline constexpr uint32_t kPrivBase = 0x1000;     // page 1: trapped privileged globals
inline constexpr uint32_t kStatusPageOffset = 0x2000;  // page 2: status page, mmap, no trap
inline constexpr uint32_t kMsixTableOffset = 0x3000;   // page 3: MSI-X table (trapped)
inline constexpr uint32_t kMsixPbaOffset = 0x3800;
inline constexpr uint32_t kGttOffset = 0x100000;       // GTT window: 8 bytes per entry, to BAR0's end
inline constexpr uint32_t kGttMaxEntries = (kBar0Size - kGttOffset) / 8;  // 384 Ki entries = 1.5 GiB of GPU VA

// Register offsets in page 0.
namespace reg {
inline constexpr uint32_t kId = 0x000;              // RO  kIdMagic
inline constexpr uint32_t kVersion = 0x004;         // RO  device ABI version
inline constexpr uint32_t kCaps = 0x008;            // RO  kCap* bits
inline constexpr uint32_t kApertureSizeLo = 0x00C;  // RO
inline constexpr uint32_t kApertureSizeHi = 0x010;  // RO
inline constexpr uint32_t kGttEntries = 0x014;      // RO  entries this vGPU's GTT has
inline constexpr uint32_t kKernelCount = 0x018;     // RO  kernels in the shader catalogue
inline constexpr uint32_t kCtrl = 0x020;            // RW  kCtrl* bits
inline constexpr uint32_t kStatus = 0x024;          // RO  kStatus* bits
inline constexpr uint32_t kReset = 0x028;           // WO  write kResetMagic: reset this vGPU
inline constexpr uint32_t kPowerState = 0x02C;      // RW  0 = D0, 3 = D3hot (per vGPU)
inline constexpr uint32_t kIrqStatus = 0x030;       // RW1C one bit per vector
inline constexpr uint32_t kIrqMask = 0x034;         // RW  1 = vector masked at the device
inline constexpr uint32_t kIrqTest = 0x038;         // WO  raise vector N (bring-up, tests)
inline constexpr uint32_t kScratch = 0x03C;         // RW  mirrored into the status page
inline constexpr uint32_t kRingBaseLo = 0x040;      // RW  GPU VA of the ring
inline constexpr uint32_t kRingBaseHi = 0x044;      // RW
inline constexpr uint32_t kRingSize = 0x048;        // RW  bytes, power of two, 4 KiB .. 1 MiB
inline constexpr uint32_t kRingHead = 0x04C;        // RO  byte offset the device has consumed to
inline constexpr uint32_t kRingTail = 0x050;        // RW  doorbell: write the new tail
inline constexpr uint32_t kDoorbellKick = 0x054;    // WO  kick: tail taken from the shadow (ioeventfd)
inline constexpr uint32_t kTailShadowLo = 0x058;    // RW  GPU VA of the u32 the guest publishes its tail in
inline constexpr uint32_t kTailShadowHi = 0x05C;    // RW
inline constexpr uint32_t kErrCode = 0x060;         // RO  Errc of the last refusal (0 = none)
inline constexpr uint32_t kErrSource = 0x064;       // RO  kErrSource*
inline constexpr uint32_t kErrAddrLo = 0x068;       // RO  faulting address (MMIO offset, GPU VA, ring offset)
inline constexpr uint32_t kErrAddrHi = 0x06C;       // RO
inline constexpr uint32_t kErrInfo = 0x070;         // RO  source-specific detail (opcode, register)
inline constexpr uint32_t kErrCount = 0x074;        // RO  refusals since reset
inline constexpr uint32_t kErrClear = 0x078;        // WO  any value clears code/source/addr/info
inline constexpr uint32_t kGttBatchAddrLo = 0x080;  // RW  GPA of a GttBatchRecord array (16-byte aligned)
inline constexpr uint32_t kGttBatchAddrHi = 0x084;  // RW
inline constexpr uint32_t kGttBatchGo = 0x088;      // WO  write n: apply n records from GTT_BATCH_ADDR, all or none
}  // namespace reg

// Privileged globals in page 1: a guest may not own these. Each is either emulated per
// vGPU (the write lands in a per-vGPU shadow and touches nothing shared) or refused with
// kPrivileged in the error report.
namespace priv {
inline constexpr uint32_t kGlobalReset = 0x1000;     // refused: whole-GPU reset
inline constexpr uint32_t kClockMhz = 0x1004;        // emulated: reads back the vGPU's shadow
inline constexpr uint32_t kGlobalGttBaseLo = 0x1008; // refused: host GTT base
inline constexpr uint32_t kGlobalGttBaseHi = 0x100C; // refused
inline constexpr uint32_t kPowerGate = 0x1010;       // refused: GPU-wide power gating
inline constexpr uint32_t kFenceWatchdogMs = 0x1014; // refused: host scheduler policy
// Scan-out (F10, docs/device-spec.md §Scan-out): the host's display engine is a global a
// guest may not own; each vGPU gets one emulated plane of its own. BASE..HEIGHT are staged
// (any value is stored, FORMAT excepted) and checked as a whole when ENABLE or FLIP commits
// them; the committed plane is scanned out from the next frame boundary of the vGPU's frame
// clock, which then raises kVectorDisplay.
inline constexpr uint32_t kDisplayBase = 0x1020;     // RW  staged: byte offset of the plane in the aperture
inline constexpr uint32_t kDisplayStride = 0x1024;   // RW  staged: bytes per row
inline constexpr uint32_t kDisplayFormat = 0x1028;   // RW  staged: kFormat*; an unknown one is refused at once
inline constexpr uint32_t kDisplayWidth = 0x102C;    // RW  staged: pixels
inline constexpr uint32_t kDisplayHeight = 0x1030;   // RW  staged: rows
inline constexpr uint32_t kDisplayEnable = 0x1034;   // RW  bit0: 1 commits the staged plane (as FLIP), 0 turns it off at once
inline constexpr uint32_t kDisplayFlip = 0x1038;     // WO  write 1: commit the staged plane at the next frame boundary
inline constexpr uint32_t kDisplayStatus = 0x103C;   // RO  kDisplayStatus* bits
inline constexpr uint32_t kDisplayFrames = 0x1040;   // RO  frame boundaries (vblanks) since reset, while enabled
inline constexpr uint32_t kDisplayFlips = 0x1044;    // RO  commits that took effect since reset (mirrored in the status page)
inline constexpr uint32_t kDisplayLiveBase = 0x1048; // RO  the base being scanned out
}  // namespace priv

namespace display {
inline constexpr uint32_t kFormatXrgb8888 = 1;  // 32 bpp, little-endian B, G, R, X bytes (DRM_FORMAT_XRGB8888)
inline constexpr uint32_t kFormatArgb8888 = 2;  // 32 bpp, B, G, R, A (DRM_FORMAT_ARGB8888)
inline constexpr uint32_t kFormatRgb565 = 3;    // 16 bpp, r5 g6 b5 little-endian (DRM_FORMAT_RGB565)
constexpr uint32_t BytesPerPixel(uint32_t format) {
  return format == kFormatXrgb8888 || format == kFormatArgb8888 ? 4 : format == kFormatRgb565 ? 2 : 0;
}
inline constexpr uint32_t kMaxWidth = 4096;
inline constexpr uint32_t kMaxHeight = 4096;
inline constexpr uint32_t kStrideAlign = 64;  // bytes; BASE too
inline constexpr uint32_t kFlipMagic = 1;
inline constexpr uint32_t kEnable = 1u << 0;
inline constexpr uint32_t kStatusScanning = 1u << 0;     // a plane is being scanned out
inline constexpr uint32_t kStatusFlipPending = 1u << 1;  // a commit waits for the next frame boundary
inline constexpr uint32_t kFrameHz = 60;                 // the frame clock
}  // namespace display

inline constexpr uint32_t kIdMagic = 0x56475055;  // "VGPU"
inline constexpr uint32_t kAbiVersion = 0x00010000;
inline constexpr uint32_t kResetMagic = 0x1;

inline constexpr uint32_t kCapStatusPage = 1u << 0;
inline constexpr uint32_t kCapDoorbellIoFd = 1u << 1;
inline constexpr uint32_t kCapMsix = 1u << 2;
inline constexpr uint32_t kCapMsi = 1u << 3;
inline constexpr uint32_t kCapRing = 1u << 4;
inline constexpr uint32_t kCapGttBatch = 1u << 5;  // GTT_BATCH_ADDR / GTT_BATCH_GO
// The status page's DEVICE_IDLE word is maintained for a guest that kicks through the tail
// shadow: it may skip the kick while the word reads 0 (docs/device-spec.md, "Idle notify").
// Nothing to enable; a guest that ignores it and kicks every time is served as before.
inline constexpr uint32_t kCapIdleNotify = 1u << 6;
inline constexpr uint32_t kCapDisplay = 1u << 7;  // scan-out plane, flip, display vector (F10)
// The ring takes GTT_UPDATE commands (docs/device-spec.md "GTT_UPDATE"): GTT updates in
// ring order, with no register write at all (F12).
inline constexpr uint32_t kCapGttRing = 1u << 8;

inline constexpr uint32_t kCtrlRingEnable = 1u << 0;
inline constexpr uint32_t kCtrlKnownBits = kCtrlRingEnable;

inline constexpr uint32_t kStatusRingEnabled = 1u << 0;
inline constexpr uint32_t kStatusBusy = 1u << 1;
inline constexpr uint32_t kStatusErrorLatched = 1u << 2;
inline constexpr uint32_t kStatusD3 = 1u << 3;
// A reset found an engine submission in flight: the aperture scrub waits for it (at most
// one bounded submission). The reset is complete, aperture zeroed, when this bit clears.
inline constexpr uint32_t kStatusResetting = 1u << 4;

inline constexpr uint32_t kErrSourceNone = 0;
inline constexpr uint32_t kErrSourceMmio = 1;
inline constexpr uint32_t kErrSourceGtt = 2;
inline constexpr uint32_t kErrSourceCommand = 3;
inline constexpr uint32_t kErrSourceRing = 4;
// A GTT batch (GTT_BATCH_GO): ERR_INFO is the index of the refused record, or
// kGttBatchWhole when the batch was refused as a whole (count, address, memory).
inline constexpr uint32_t kErrSourceGttBatch = 5;

// IRQ vectors (MSI-X table entries and MSI vectors alike).
inline constexpr uint32_t kVectorFence = 0;
inline constexpr uint32_t kVectorError = 1;
inline constexpr uint32_t kVectorDisplay = 2;  // a scan-out commit took effect (flip done, at a vblank)
inline constexpr uint32_t kNumVectors = 3;     // MSI-X table entries
// MSI offers a power of two: 2 vectors; the display vector folds onto MSI vector 0.
inline constexpr uint32_t kNumMsiVectors = 2;

// --- Status page (BAR0 + kStatusPageOffset, 4 KiB): written by the device only ---
namespace status {
inline constexpr uint32_t kMagic = 0x00;            // u32 kIdMagic once the device is live
inline constexpr uint32_t kStateFlags = 0x04;       // u32 mirror of reg::kStatus
inline constexpr uint32_t kCompletedFence = 0x08;   // u64 last fence value the device completed
inline constexpr uint32_t kRingHead = 0x10;         // u32 mirror of reg::kRingHead
inline constexpr uint32_t kErrCount = 0x14;         // u32 mirror of reg::kErrCount
inline constexpr uint32_t kDoorbells = 0x18;        // u64 doorbells seen (MMIO + ioeventfd); stored, then a
                                                    // fence, before the kick's pass reads the tail shadow
inline constexpr uint32_t kSubmissions = 0x20;      // u64 submissions accepted
inline constexpr uint32_t kScratch = 0x28;          // u32 mirror of reg::kScratch
inline constexpr uint32_t kResets = 0x2C;           // u32 resets since creation
// u32: 1 when the device will not look at the tail shadow again on its own (no plan queued or
// running, or nothing it may read), so a guest that published a tail must kick; 0 while the
// device is busy and will re-read the shadow when its last plan finishes. Ordering rule:
// the device stores 1, fences, re-reads the tail; the guest stores its tail, fences, reads
// this word (docs/device-spec.md, "Idle notify").
inline constexpr uint32_t kDeviceIdle = 0x30;
inline constexpr uint32_t kDisplayFlips = 0x34;  // u32 mirror of priv::kDisplayFlips
}  // namespace status

// --- GTT entry (u64) ---
// bits 63..12: page frame (guest-physical page, or aperture page when kGttAperture)
// bit 0 valid, bit 1 writable, bit 2 target is the aperture; bits 11..3 must be zero.
inline constexpr uint64_t kGttValid = 1u << 0;
inline constexpr uint64_t kGttWritable = 1u << 1;
inline constexpr uint64_t kGttAperture = 1u << 2;
inline constexpr uint64_t kGttFlagMask = 0xFFF;
inline constexpr uint64_t kGttKnownFlags = kGttValid | kGttWritable | kGttAperture;

// --- GTT batch: one record of the array GTT_BATCH_ADDR points at (guest memory) ---
// The device copies the whole array once, checks every record as an 8-byte GTT write would
// be checked, then applies all of them in order, or none (docs/device-spec.md §GTT batch).
struct GttBatchRecord {
  uint32_t index;  // GTT entry, < GTT_ENTRIES
  uint32_t pad;    // must be 0
  uint64_t entry;  // as written to the GTT window
};
static_assert(sizeof(GttBatchRecord) == 16);
inline constexpr uint32_t kGttBatchMaxRecords = 4096;  // 64 KiB of records per GO
inline constexpr uint32_t kGttBatchAlign = 16;
inline constexpr uint32_t kGttBatchWhole = 0xFFFFFFFF;  // ERR_INFO: not about one record

// --- PCI config space layout ---
inline constexpr uint32_t kConfigSize = 256;
inline constexpr uint8_t kCapPmOffset = 0x40;
inline constexpr uint8_t kCapMsiOffset = 0x48;
inline constexpr uint8_t kCapMsixOffset = 0x60;
// Advanced Features (PCI Conventional AF ECN): FLR capable; writing bit0 of AF_CTRL (+4)
// resets the function as DEVICE_RESET does (F8).
inline constexpr uint8_t kCapAfOffset = 0x70;

// --- Commands: dword streams in the ring and in batch buffers ---
// Header dword: opcode in bits 31..24, flags in 23..16, total length in dwords (header
// included) in 15..0. docs/device-spec.md §Commands lists each layout.
namespace cmd {
inline constexpr uint32_t kNop = 0x00;        // len >= 1; payload ignored
inline constexpr uint32_t kFence = 0x01;      // [hdr, va lo, va hi, value lo, value hi]
inline constexpr uint32_t kCopy = 0x02;       // [hdr, src lo, src hi, dst lo, dst hi, size lo, size hi]
inline constexpr uint32_t kFill = 0x03;       // [hdr, dst lo, dst hi, size lo, size hi, value]
inline constexpr uint32_t kDispatch = 0x04;   // [hdr, kernel, gx, gy, gz, nbind, npush, bind[nbind], push[npush]]
inline constexpr uint32_t kBatch = 0x05;      // [hdr, va lo, va hi, size bytes]
inline constexpr uint32_t kLoadReg = 0x06;    // [hdr, register offset, value]
inline constexpr uint32_t kTimestamp = 0x07;  // [hdr, va lo, va hi]
inline constexpr uint32_t kGttUpdate = 0x08;  // [hdr, count, record[count]] (GttBatchRecord: 4 dwords each)

inline constexpr uint32_t kFenceFlagIrq = 1u << 0;  // FENCE: raise the fence vector

inline constexpr uint32_t kDispatchFixedDwords = 7;
inline constexpr uint32_t kBindingDwords = 5;  // va lo, va hi, size lo, size hi, access
inline constexpr uint32_t kAccessRead = 1;
inline constexpr uint32_t kAccessWrite = 2;
inline constexpr uint32_t kGttUpdateFixedDwords = 2;
inline constexpr uint32_t kGttRecordDwords = sizeof(GttBatchRecord) / 4;
inline constexpr uint32_t kGttUpdateMaxRecords = 1024;  // one GTT_UPDATE: 16 KiB of records

// Fixed bounds every submission is audited against.
inline constexpr uint32_t kMaxCommandsPerSubmission = 16384;
inline constexpr uint32_t kMaxBatchDepth = 2;        // ring -> batch -> batch
inline constexpr uint32_t kMaxBatchBytes = 1u << 20;
inline constexpr uint64_t kMaxTransferBytes = 256ull << 20;  // one COPY or FILL
inline constexpr uint32_t kMaxGttRecordsPerSubmission = 16384;  // GTT_UPDATE records, batches included
// Time a guest can read (TIMESTAMP values, when fences, interrupts, DEVICE_IDLE and remoting
// replies become visible) is coarsened to a granularity G the host sets (vgpud
// --time-granularity-us; docs/device-spec.md "Time a guest can read"): this is its default,
// and its upper bound. 0 turns coarsening off (the A/B study).
inline constexpr uint64_t kDefaultTimeGranularityNs = 100'000;  // 100 us
inline constexpr uint64_t kMaxTimeGranularityNs = 100'000'000;  // 100 ms

constexpr uint32_t Header(uint32_t opcode, uint32_t len_dw, uint32_t flags = 0) {
  return opcode << 24 | (flags & 0xff) << 16 | (len_dw & 0xffff);
}
constexpr uint32_t Opcode(uint32_t hdr) { return hdr >> 24; }
constexpr uint32_t Flags(uint32_t hdr) { return (hdr >> 16) & 0xff; }
constexpr uint32_t LengthDw(uint32_t hdr) { return hdr & 0xffff; }
}  // namespace cmd

}  // namespace vg::abi
