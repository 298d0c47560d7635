#include "guest/backend.h"

namespace vg::guest {

Result<> DeviceBackend::WriteGttEntries(std::span<const abi::GttBatchRecord> records) {
  for (const abi::GttBatchRecord& r : records)
    VG_TRY(Write64(abi::kGttOffset + r.index * 8, r.entry, /*posted=*/true));
  return Ok();
}

Result<ErrorReport> DeviceBackend::ReadError() {
  ErrorReport r;
  VG_TRY_ASSIGN(uint32_t code, Read32(abi::reg::kErrCode));
  r.code = ErrcFromValue(code);
  VG_TRY_ASSIGN(r.source, Read32(abi::reg::kErrSource));
  VG_TRY_ASSIGN(r.addr, Read64(abi::reg::kErrAddrLo));
  VG_TRY_ASSIGN(r.info, Read32(abi::reg::kErrInfo));
  VG_TRY_ASSIGN(r.count, Read32(abi::reg::kErrCount));
  return r;
}

}  // namespace vg::guest
