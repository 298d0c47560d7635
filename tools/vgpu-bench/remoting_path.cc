#include "tools/vgpu-bench/paths.h"

namespace vg::bench {

// Filled in when the remoting client lands (F4).
Result<std::unique_ptr<Path>> MakeRemotingPath(const PathConfig&) {
  return MakeError(Errc::kUnsupported, "the remoting path is not built yet");
}

}  // namespace vg::bench
