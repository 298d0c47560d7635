// vgpu-bench-native: the engine micro-benchmark (the native path of vgpu-bench).
//   vgpu-bench-native [--gpu NAME|INDEX] [--iters N] [--quick]
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "base/log.h"
#include "tools/bench/native.h"

int main(int argc, char** argv) {
  vg::bench::NativeOptions o;
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    bool has_next = i + 1 < argc;
    if (a == "--gpu" && has_next) {
      o.gpu = argv[++i];
    } else if (a == "--iters" && has_next) {
      o.latency_iters = std::atoi(argv[++i]);
    } else if (a == "--quick") {
      o.quick = true;
      o.latency_iters = 50;
      o.large_iters = 3;
      o.import_iters = 5;
    } else {
      std::fprintf(stderr, "usage: %s [--gpu NAME|INDEX] [--iters N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  vg::SetLogLevel(vg::LogLevel::kWarn);
  std::string device;
  auto rows = vg::bench::RunNative(o, &device);
  if (!rows.ok()) {
    std::fprintf(stderr, "vgpu-bench-native: %s\n", rows.error().ToString().c_str());
    return 1;
  }
  std::printf("%s\n\n%s", device.c_str(), vg::bench::FormatTable(*rows).c_str());
  return 0;
}
