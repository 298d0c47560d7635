#include "tools/vgpud/types.h"

namespace vg::daemon {
namespace {
struct BuiltinType {
  const char* name;
  uint64_t aperture;
  uint32_t gtt_entries;
};
constexpr BuiltinType kTypes[] = {
    {"vgpud-small", 64ull << 20, 16384},
    {"vgpud-medium", 256ull << 20, 32768},
    {"vgpud-large", 1024ull << 20, 65536},
};
}  // namespace

Result<mediator::VgpuConfig> ParseVgpuSpec(const std::string& spec) {
  mediator::VgpuConfig cfg;
  std::string uuid = spec.substr(0, spec.find(':'));
  std::string type = spec.find(':') == std::string::npos ? "vgpud-small" : spec.substr(spec.find(':') + 1);
  if (type.rfind("vgpud-", 0) != 0) type = "vgpud-" + type;
  VG_TRY_ASSIGN(cfg.uuid, Uuid::Parse(uuid));
  for (const auto& t : kTypes) {
    if (type == t.name) {
      cfg.type_name = t.name;
      cfg.aperture_size = t.aperture;
      cfg.gtt_entries = t.gtt_entries;
      return cfg;
    }
  }
  return MakeError(Errc::kNotFound, "unknown vGPU type '{}'", type);
}
}  // namespace vg::daemon
