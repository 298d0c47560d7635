#pragma once
// F10: a scan-out frame as PNG (libpng's simplified write API, into memory) and base64 for the
// control socket's JSON reply. The pixels come from a worker and are only ever bytes here:
// sizes are checked by WorkerPool::Screenshot before this sees them.
#include <string>

#include "base/base.h"
#include "tools/vgpud/workers.h"

namespace vg::daemon {

// XRGB8888 → 8-bit RGB, ARGB8888 → 8-bit RGBA, RGB565 → 8-bit RGB (bit replication).
Result<std::string> EncodePng(const ScanoutImage& img);
std::string Base64(std::string_view bytes);

}  // namespace vg::daemon
