#include "engine/internal/vk.h"

namespace vg::engine {
namespace {

struct VkResultDesc {
  VkResult r;
  Errc code;
  std::string_view name;
};
// Results the engine can see, with the named code a caller branches on.
constexpr VkResultDesc kVkResults[] = {
    {VK_SUCCESS, Errc::kOk, "VK_SUCCESS"},
    {VK_TIMEOUT, Errc::kTimeout, "VK_TIMEOUT"},
    {VK_NOT_READY, Errc::kBusy, "VK_NOT_READY"},
    {VK_ERROR_OUT_OF_HOST_MEMORY, Errc::kOutOfMemory, "VK_ERROR_OUT_OF_HOST_MEMORY"},
    {VK_ERROR_OUT_OF_DEVICE_MEMORY, Errc::kOutOfMemory, "VK_ERROR_OUT_OF_DEVICE_MEMORY"},
    {VK_ERROR_INITIALIZATION_FAILED, Errc::kUnsupported, "VK_ERROR_INITIALIZATION_FAILED"},
    {VK_ERROR_DEVICE_LOST, Errc::kDeviceLost, "VK_ERROR_DEVICE_LOST"},
    {VK_ERROR_MEMORY_MAP_FAILED, Errc::kOutOfMemory, "VK_ERROR_MEMORY_MAP_FAILED"},
    {VK_ERROR_LAYER_NOT_PRESENT, Errc::kUnsupported, "VK_ERROR_LAYER_NOT_PRESENT"},
    {VK_ERROR_EXTENSION_NOT_PRESENT, Errc::kUnsupported, "VK_ERROR_EXTENSION_NOT_PRESENT"},
    {VK_ERROR_FEATURE_NOT_PRESENT, Errc::kUnsupported, "VK_ERROR_FEATURE_NOT_PRESENT"},
    {VK_ERROR_INCOMPATIBLE_DRIVER, Errc::kUnsupported, "VK_ERROR_INCOMPATIBLE_DRIVER"},
    {VK_ERROR_TOO_MANY_OBJECTS, Errc::kLimitExceeded, "VK_ERROR_TOO_MANY_OBJECTS"},
    {VK_ERROR_FRAGMENTED_POOL, Errc::kOutOfMemory, "VK_ERROR_FRAGMENTED_POOL"},
    {VK_ERROR_OUT_OF_POOL_MEMORY, Errc::kOutOfMemory, "VK_ERROR_OUT_OF_POOL_MEMORY"},
    {VK_ERROR_INVALID_EXTERNAL_HANDLE, Errc::kInvalidArgument, "VK_ERROR_INVALID_EXTERNAL_HANDLE"},
};

const VkResultDesc* Find(VkResult r) {
  for (const auto& d : kVkResults)
    if (d.r == r) return &d;
  return nullptr;
}

}  // namespace

Errc ErrcFromVk(VkResult r) {
  const VkResultDesc* d = Find(r);
  return d ? d->code : Errc::kInternal;
}

std::string_view VkResultName(VkResult r) {
  const VkResultDesc* d = Find(r);
  return d ? d->name : "VkResult(unknown)";
}

}  // namespace vg::engine
