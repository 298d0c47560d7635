#pragma once
// Minimal leveled logging to stderr. Every refusal of guest input is logged with its
// error name so an operator can match what a guest saw to what the host saw.

#include <fmt/format.h>

#include <string_view>

namespace vg {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };
void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
void LogLine(LogLevel level, std::string_view line);
// The name every line starts with ("vgpud"; a worker says which vGPU it serves).
void SetLogTag(std::string_view tag);

template <class... Args>
void Log(LogLevel level, fmt::format_string<Args...> f, Args&&... args) {
  if (level < GetLogLevel()) return;
  LogLine(level, fmt::format(f, std::forward<Args>(args)...));
}
#define VG_LOGD(...) ::vg::Log(::vg::LogLevel::kDebug, __VA_ARGS__)
#define VG_LOGI(...) ::vg::Log(::vg::LogLevel::kInfo, __VA_ARGS__)
#define VG_LOGW(...) ::vg::Log(::vg::LogLevel::kWarn, __VA_ARGS__)
#define VG_LOGE(...) ::vg::Log(::vg::LogLevel::kError, __VA_ARGS__)

}  // namespace vg
