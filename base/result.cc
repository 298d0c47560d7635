#include "base/result.h"

namespace vg {
namespace {
struct ErrcRow {
  Errc code;
  std::string_view name;
  int err;
  std::string_view desc;
};
constexpr ErrcRow kErrcTable[] = {
#define VG_ERRC(name, value, err, desc) {Errc::name, #name, err, desc},
#include "abi/errc.def"
#undef VG_ERRC
};
const ErrcRow* Find(Errc c) {
  for (const auto& row : kErrcTable)
    if (row.code == c) return &row;
  return nullptr;
}
}  // namespace

std::string_view ErrcName(Errc c) {
  const ErrcRow* r = Find(c);
  return r ? r->name : std::string_view("kUnknownErrc");
}
std::string_view ErrcDescription(Errc c) {
  const ErrcRow* r = Find(c);
  return r ? r->desc : std::string_view("unknown error code");
}
int ErrcToErrno(Errc c) {
  const ErrcRow* r = Find(c);
  return r ? r->err : EIO;
}
Errc ErrcFromValue(uint32_t v) {
  for (const auto& row : kErrcTable)
    if (static_cast<uint32_t>(row.code) == v) return row.code;
  return Errc::kInternal;
}
std::string Error::ToString() const { return fmt::format("{}: {}", ErrcName(code), what); }

}  // namespace vg
