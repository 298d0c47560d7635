#pragma once
// Built-in vGPU types for command-line serving (F1). mdev/ owns the real type catalogue.
#include <string>

#include "base/base.h"
#include "mediator/mediator.h"

namespace vg::daemon {
// "UUID" or "UUID:TYPE" with TYPE one of vgpud-small|medium|large (or small|medium|large).
Result<mediator::VgpuConfig> ParseVgpuSpec(const std::string& spec);
}  // namespace vg::daemon
