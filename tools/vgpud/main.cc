// vgpud: serves vGPUs over vfio-user. Until management lands (F5), the vGPUs to serve
// come from the command line: --vgpu UUID[:TYPE].

#include <CLI/CLI.hpp>

#include <cstdio>

#include "tools/vgpud/daemon.h"
#include "tools/vgpud/types.h"

using namespace vg;

int main(int argc, char** argv) {
  CLI::App app{"vgpud: mediated GPU virtualization daemon"};
  daemon::DaemonOptions opts;
  std::vector<std::string> vgpus;
  std::string log_level = "info";
  app.add_option("--runtime-dir", opts.runtime_dir, "where <uuid>.sock sockets are created")->capture_default_str();
  app.add_option("--vgpu", vgpus, "UUID[:TYPE] to serve (repeatable)");
  app.add_option("--log-level", log_level, "debug|info|warn|error")->capture_default_str();
  app.add_option("--gpu", opts.gpu, "Vulkan device: name substring or index (default: a GPU, else lavapipe)");
  CLI11_PARSE(app, argc, argv);
  if (log_level == "debug") SetLogLevel(LogLevel::kDebug);
  if (log_level == "warn") SetLogLevel(LogLevel::kWarn);
  if (log_level == "error") SetLogLevel(LogLevel::kError);

  auto d = daemon::Daemon::Create(opts);
  if (!d.ok()) {
    std::fprintf(stderr, "vgpud: %s\n", d.error().ToString().c_str());
    return 1;
  }
  for (const std::string& spec : vgpus) {
    auto cfg = daemon::ParseVgpuSpec(spec);
    if (!cfg.ok()) {
      std::fprintf(stderr, "vgpud: --vgpu %s: %s\n", spec.c_str(), cfg.error().ToString().c_str());
      return 2;
    }
    auto started = (*d)->StartVgpu(*cfg);
    if (!started.ok()) {
      std::fprintf(stderr, "vgpud: %s\n", started.error().ToString().c_str());
      return 1;
    }
  }
  VG_LOGI("vgpud ready: {} vGPU(s) under {}", vgpus.size(), opts.runtime_dir);
  std::fflush(stderr);
  auto r = (*d)->Run();
  return r.ok() ? 0 : 1;
}
