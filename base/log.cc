#include "base/log.h"

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

namespace vg {
namespace {
LogLevel InitialLevel() {
  const char* env = std::getenv("VGPUD_LOG");
  if (!env) return LogLevel::kInfo;
  std::string_view s(env);
  if (s == "debug") return LogLevel::kDebug;
  if (s == "warn") return LogLevel::kWarn;
  if (s == "error") return LogLevel::kError;
  return LogLevel::kInfo;
}
std::atomic<LogLevel> g_level{InitialLevel()};
std::mutex g_mu;
std::string g_tag = "vgpud";  // under g_mu
}  // namespace

void SetLogLevel(LogLevel level) { g_level = level; }
LogLevel GetLogLevel() { return g_level; }
void SetLogTag(std::string_view tag) {
  std::lock_guard lk(g_mu);
  g_tag = std::string(tag);
}
void LogLine(LogLevel level, std::string_view line) {
  static constexpr const char* kTag[] = {"D", "I", "W", "E"};
  std::lock_guard lk(g_mu);
  std::fprintf(stderr, "[%s %s] %.*s\n", g_tag.c_str(), kTag[static_cast<int>(level)], static_cast<int>(line.size()),
               line.data());
}
}  // namespace vg
