// Types, attributes and the mdevctl definition format: pure data and parsing, no state.

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <set>
#include <tuple>
#include <sstream>

#include <nlohmann/json.hpp>

#include "abi/device.h"
#include "base/fd.h"
#include "mdev/mdev.h"

namespace vg::mdev {
namespace {

using Json = nlohmann::ordered_json;
constexpr uint64_t kMiB = 1ull << 20;
// F10 frame pacing: the frame clock, above which a frame limit could never bind.
constexpr uint64_t kMaxFrameLimit = abi::display::kFrameHz;

// The attributes a vGPU understands (data, not code: STYLE.md §2). mdevctl writes them as
// files in the device directory after `create`; unknown names are refused so a typo in a
// definition fails at define/modify time (via the callout) instead of at start.
struct AttrDesc {
  std::string_view name;
  uint64_t min;
  uint64_t max;
  std::string_view what;
};
constexpr AttrDesc kAttrs[] = {
    {"sched_weight", 1, 1000, "scheduler weight override (1..1000)"},
    {"rate_limit", 0, 1000000, "submissions per second, 0 = unlimited"},
    {"rate_burst", 0, 1000000, "submissions a burst may take at once, 0 = rate_limit / 10"},
    {"gpu_time_limit", 0, 1000, "GPU milliseconds per second, 0 = unlimited"},
    {"gpu_time_burst", 0, 10000, "GPU milliseconds a burst may take at once, 0 = gpu_time_limit / 10"},
    {"frame_limit", 0, kMaxFrameLimit, "scan-out flips presented per second, 1..60, 0 = no limit"},

};

bool ValidTypeName(std::string_view n) {
  if (n.empty() || n.size() > 32) return false;
  for (char c : n)
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-')) return false;
  return true;
}

Result<uint64_t> GetUint(const Json& o, const char* key, uint64_t min, uint64_t max) {
  auto it = o.find(key);
  VG_INVALID_IF(it == o.end() || !it->is_number_unsigned(), "type field '{}' missing or not an unsigned integer", key);
  uint64_t v = it->get<uint64_t>();
  VG_INVALID_IF(v < min || v > max, "type field '{}' = {} is outside [{}, {}]", key, v, min, max);
  return v;
}

}  // namespace

Result<> InstanceHost::SetAttribute(const Uuid&, std::string_view, std::string_view) { return Ok(); }

std::vector<VgpuType> DefaultTypes() {
  return {
      {"vgpud-small", "vgpud small", "64 MiB aperture, 16384 GTT entries, weight 100", ByteSize{64 * kMiB}, 16384, 100, 16},
      {"vgpud-medium", "vgpud medium", "256 MiB aperture, 65536 GTT entries, weight 200", ByteSize{256 * kMiB}, 65536, 200, 8},
      {"vgpud-large", "vgpud large", "1 GiB aperture, 262144 GTT entries, weight 400", ByteSize{1024 * kMiB}, 262144, 400, 4},
  };
}

Result<std::vector<VgpuType>> ParseTypes(std::string_view text) {
  Json doc = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  VG_INVALID_IF(doc.is_discarded() || !doc.is_object(), "types file is not a JSON object");
  auto arr = doc.find("types");
  VG_INVALID_IF(arr == doc.end() || !arr->is_array() || arr->empty(), "types file needs a non-empty 'types' array");
  std::vector<VgpuType> out;
  std::set<std::string> seen;
  for (const Json& t : *arr) {
    VG_INVALID_IF(!t.is_object(), "type entry is not an object");
    auto name = t.find("name");
    VG_INVALID_IF(name == t.end() || !name->is_string() || !ValidTypeName(name->get<std::string>()),
                  "type 'name' missing or not [a-z0-9_-]{{1,32}}");
    VgpuType vt;
    vt.id = "vgpud-" + name->get<std::string>();
    VG_INVALID_IF(!seen.insert(vt.id).second, "duplicate type '{}'", vt.id);
    VG_TRY_ASSIGN(uint64_t mib, GetUint(t, "aperture_mib", 1, 64 * 1024));
    // BARs are naturally aligned powers of two (PCI 3.0 §6.2.5.1).
    VG_INVALID_IF(!IsPowerOfTwo(mib), "type '{}': aperture_mib {} is not a power of two", vt.id, mib);
    vt.aperture = ByteSize{mib * kMiB};
    VG_TRY_ASSIGN(uint64_t gtt, GetUint(t, "gtt_entries", 1, 1u << 24));
    VG_TRY_ASSIGN(uint64_t weight, GetUint(t, "sched_weight", 1, 1000));
    VG_TRY_ASSIGN(uint64_t maxi, GetUint(t, "max_instances", 1, 1024));
    vt.gtt_entries = static_cast<uint32_t>(gtt);
    vt.sched_weight = static_cast<uint32_t>(weight);
    vt.max_instances = static_cast<uint32_t>(maxi);
    // Optional defaults for the instances' limits (the attributes of the same names).
    for (auto [key, field, max] : {std::tuple{"rate_limit", &vt.rate_limit, uint64_t{1000000}},
                                   std::tuple{"rate_burst", &vt.rate_burst, uint64_t{1000000}},
                                   std::tuple{"gpu_time_limit", &vt.gpu_time_limit, uint64_t{1000}},
                                   std::tuple{"gpu_time_burst", &vt.gpu_time_burst, uint64_t{10000}},
                                   std::tuple{"frame_limit", &vt.frame_limit, uint64_t{kMaxFrameLimit}}}) {
      if (t.find(key) == t.end()) continue;
      VG_TRY_ASSIGN(uint64_t v, GetUint(t, key, 0, max));
      *field = static_cast<uint32_t>(v);
    }
    vt.name = "vgpud " + name->get<std::string>();
    if (auto d = t.find("description"); d != t.end()) {
      VG_INVALID_IF(!d->is_string(), "type '{}': description is not a string", vt.id);
      vt.description = d->get<std::string>();
    } else {
      vt.description = fmt::format("{} MiB aperture, {} GTT entries, weight {}", mib, gtt, weight);
    }
    VG_INVALID_IF(vt.description.find('\n') != std::string::npos, "type '{}': description has a newline", vt.id);
    out.push_back(std::move(vt));
  }
  return out;
}

Result<std::vector<VgpuType>> LoadTypes(const std::filesystem::path& file) {
  std::ifstream in(file);
  VG_ERROR_IF(!in, Errc::kNotFound, "cannot open types file {}", file.string());
  std::stringstream ss;
  ss << in.rdbuf();
  auto r = ParseTypes(ss.str());
  VG_TRY_CTX(r, "types file {}", file.string());
  return std::move(r).value();
}

Result<> ValidateAttribute(std::string_view name, std::string_view value) {
  while (!value.empty() && (value.back() == '\n' || value.back() == ' ')) value.remove_suffix(1);
  for (const AttrDesc& a : kAttrs) {
    if (a.name != name) continue;
    uint64_t v = 0;
    auto [p, ec] = std::from_chars(value.data(), value.data() + value.size(), v);
    VG_INVALID_IF(value.empty() || ec != std::errc() || p != value.data() + value.size() || v < a.min || v > a.max,
                  "attribute {}='{}' invalid: {}", name, value, a.what);
    return Ok();
  }
  return MakeError(Errc::kNotFound, "unknown attribute '{}'", name);
}

std::vector<std::string> AttributeNames() {
  std::vector<std::string> out;
  for (const AttrDesc& a : kAttrs) out.emplace_back(a.name);
  return out;
}

Result<Definition> ParseDefinition(const Uuid& uuid, std::string_view text) {
  Json doc = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  VG_INVALID_IF(doc.is_discarded() || !doc.is_object(), "definition {} is not a JSON object", uuid);
  Definition d;
  d.uuid = uuid;
  auto type = doc.find("mdev_type");
  VG_INVALID_IF(type == doc.end() || !type->is_string(), "definition {}: no mdev_type", uuid);
  d.type = type->get<std::string>();
  auto start = doc.find("start");
  VG_INVALID_IF(start == doc.end() || !start->is_string(), "definition {}: no start", uuid);
  // mdevctl treats anything but "auto" as manual; so do we.
  d.start = start->get<std::string>() == "auto" ? StartMode::kAuto : StartMode::kManual;
  if (auto attrs = doc.find("attrs"); attrs != doc.end() && !attrs->is_null()) {
    VG_INVALID_IF(!attrs->is_array(), "definition {}: attrs is not an array", uuid);
    for (const Json& a : *attrs) {
      VG_INVALID_IF(!a.is_object() || a.size() != 1, "definition {}: attribute is not a one-field object", uuid);
      auto it = a.begin();
      VG_INVALID_IF(!it.value().is_string(), "definition {}: attribute {} is not a string", uuid, it.key());
      d.attrs.emplace_back(it.key(), it.value().get<std::string>());
    }
  }
  return d;
}

std::string FormatDefinition(const Definition& d) {
  Json j;
  j["mdev_type"] = d.type;
  j["start"] = d.start == StartMode::kAuto ? "auto" : "manual";
  j["attrs"] = Json::array();
  for (const auto& [k, v] : d.attrs) j["attrs"].push_back(Json{{k, v}});
  return j.dump(2) + "\n";
}

Result<> WriteFileAtomic(const std::filesystem::path& path, std::string_view contents) {
  const std::filesystem::path dir = path.parent_path();
  // A dot-name is skipped by our scans; mdevctl only warns about it, and only if we crash here.
  const std::filesystem::path tmp = dir / fmt::format(".{}.tmp.{}", path.filename().string(), getpid());
  {
    UniqueFd fd(open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    VG_ERROR_IF(!fd.Valid(), Errc::kIo, "create {}: {}", tmp.string(), strerror(errno));
    size_t done = 0;
    while (done < contents.size()) {
      ssize_t n = write(fd.Get(), contents.data() + done, contents.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int e = errno;
        unlink(tmp.c_str());
        return MakeError(Errc::kIo, "write {}: {}", tmp.string(), strerror(e));
      }
      done += static_cast<size_t>(n);
    }
    if (fsync(fd.Get()) != 0) {
      int e = errno;
      unlink(tmp.c_str());
      return MakeError(Errc::kIo, "fsync {}: {}", tmp.string(), strerror(e));
    }
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    int e = errno;
    unlink(tmp.c_str());
    return MakeError(Errc::kIo, "rename {} -> {}: {}", tmp.string(), path.string(), strerror(e));
  }
  // The rename is durable only once the directory entry is on disk.
  UniqueFd dfd(open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  VG_ERROR_IF(!dfd.Valid() || fsync(dfd.Get()) != 0, Errc::kIo, "fsync dir {}: {}", dir.string(), strerror(errno));
  return Ok();
}

}  // namespace vg::mdev
