#pragma once
// Names the mdev parent after the host GPU's PCI address, as a kernel mdev parent is named.

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "engine/engine.h"

namespace vg::daemon {

// The PCI address ("0000:01:00.0") of the DRM render node whose vendor/device ids match
// the engine's device, read from <sysfs>/class/drm/renderD*/device. nullopt for a CPU or
// virtual device (lavapipe), when no node matches, or when two GPUs of the same model make
// the match ambiguous (then only VK_EXT_pci_bus_info could tell them apart).
std::optional<std::string> FindPciAddress(const engine::DeviceInfo& info,
                                          const std::filesystem::path& sysfs = "/sys");

}  // namespace vg::daemon
