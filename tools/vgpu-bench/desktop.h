#pragma once
// The desktop group (F10): each frame a guest composites a handful of windows into its
// framebuffer with the catalogue's 2-D kernels (a fill_rect desktop, blits of window
// contents, an RGB565 window widened by convert_565, a blended translucent overlay, title
// bars), on the native, mediated and remoting paths. The mediated guest draws into its
// scan-out plane in the aperture, double-buffered, and flips once per frame, waiting for the
// flip to take effect before it draws into that buffer again (what a compositor with vsync
// does): the achieved frame rate there is the display's (60 Hz frame clock, or a per-vGPU
// frame-rate limit) unless drawing is slower. Frame time is submit -> fence per frame.
// Its own section in every output (docs/ab-methodology.md "Desktop").

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/base.h"
#include "tools/bench/stats.h"
#include "tools/vgpu-bench/paths.h"

namespace vg::bench {

struct DesktopOptions {
  uint32_t width = 640, height = 400;  // the framebuffer
  uint32_t windows = 6;
  int frames = 120;                    // measured, after the warm-up
  int warmup = 5;
  // "mediated-limited": the mediated guest on a vGPU whose frame_limit is `frame_limit`
  // (F10 frame pacing): what the limiter holds a desktop that renders as fast as it can to.
  std::vector<std::string> paths{"native", "mediated", "remoting", "mediated-limited"};
  uint32_t frame_limit = 30;
  uint64_t guest_ram = 64ull << 20;
  bool progress = true;
};

struct DesktopCell {
  std::string path;
  int frames = 0;
  Stats frame_us;            // submit -> fence of one frame's composition
  Stats period_us;           // frame start -> next frame start (flip waits included)
  double fps = 0;            // frames / wall time of the measured frames
  uint32_t frame_limit = 0;  // the vGPU's frame_limit (mediated-limited), 0: none
  uint32_t flips = 0;        // mediated: flips that took effect while measuring
  bool correct = false;      // the first and last frames equal the CPU reference, pixel for pixel
  std::string error;
};

struct DesktopReport {
  bool ran = false;
  uint32_t width = 0, height = 0, windows = 0, ops_per_frame = 0;
  std::vector<DesktopCell> cells;
  bool complete() const {
    if (!ran) return true;
    for (const DesktopCell& c : cells)
      if (!c.error.empty() || !c.correct) return false;
    return true;
  }
};

// A daemon of the group's own: a vGPU for the mediated guest, another for the remoting one.
struct DesktopHost {
  PathConfig mediated, remoting;
  PathConfig limited;  // a third vGPU, its frame_limit set to DesktopOptions::frame_limit
  std::shared_ptr<void> keep;
};
using DesktopHostFactory = std::function<Result<DesktopHost>()>;
DesktopReport MeasureDesktop(const DesktopOptions& o, const DesktopHostFactory& make_host, const std::string& gpu);

std::string FormatDesktop(const DesktopReport& r);
nlohmann::json DesktopJson(const DesktopReport& r);

}  // namespace vg::bench
