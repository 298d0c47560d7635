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
}  // namespace

void SetLogLevel(LogLevel level) { g_level = level; }
LogLevel GetLogLevel() { return g_level; }
void LogLine(LogLevel level, std::string_view line) {
  static constexpr const char* kTag[] = {"D", "I", "W", "E"};
  std::lock_guard lk(g_mu);
  std::fprintf(stderr, "[vgpud %s] %.*s\n", kTag[static_cast<int>(level)], static_cast<int>(line.size()), line.data());
}
}  // namespace vg
