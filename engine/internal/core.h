#pragma once
// The Vulkan instance + device, shared (shared_ptr) by the engine and every object that
// holds device handles, so the VkDevice is destroyed only after the last of them.

#include <vulkan/vulkan.h>

#include <memory>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "engine/engine.h"

namespace vg::engine {

struct PhysicalCandidate {
  VkPhysicalDevice pd = VK_NULL_HANDLE;
  DeviceInfo info;
};

class Instance {
 public:
  static Result<std::shared_ptr<Instance>> Create();
  ~Instance();
  VkInstance get() const { return instance_; }
  uint32_t api_version() const { return api_version_; }
  // Devices with a compute queue, in vkEnumeratePhysicalDevices order.
  Result<std::vector<PhysicalCandidate>> Enumerate() const;

 private:
  VkInstance instance_ = VK_NULL_HANDLE;
  uint32_t api_version_ = VK_API_VERSION_1_1;
};

// Device choice by policy or override (EngineOptions::gpu / $VGPUD_GPU). Pure: tested
// without a device.
Result<size_t> PickDevice(std::span<const PhysicalCandidate> devices, std::string_view override_spec);

class Core {
 public:
  static Result<std::shared_ptr<Core>> Create(std::shared_ptr<Instance> instance, const PhysicalCandidate& c);
  ~Core();
  Core(const Core&) = delete;
  Core& operator=(const Core&) = delete;

  VkDevice device() const { return device_; }
  VkPhysicalDevice physical() const { return pd_; }
  VkQueue queue() const { return queue_; }
  const DeviceInfo& info() const { return info_; }
  // First memory type allowed by `type_bits` with all of `flags`, or -1.
  int FindMemoryType(uint32_t type_bits, VkMemoryPropertyFlags flags) const;

  PFN_vkGetMemoryHostPointerPropertiesEXT get_host_pointer_props = nullptr;

 private:
  Core() = default;
  std::shared_ptr<Instance> instance_;
  VkPhysicalDevice pd_ = VK_NULL_HANDLE;
  VkDevice device_ = VK_NULL_HANDLE;
  VkQueue queue_ = VK_NULL_HANDLE;
  DeviceInfo info_;
  VkPhysicalDeviceMemoryProperties mem_props_{};
};

}  // namespace vg::engine
