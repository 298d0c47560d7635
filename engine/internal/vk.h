#pragma once
// RAII owners for Vulkan objects and VkResult -> Errc mapping (a table, not a switch).

#include <vulkan/vulkan.h>

#include <string_view>
#include <utility>

#include "base/result.h"

namespace vg::engine {

Errc ErrcFromVk(VkResult r);
std::string_view VkResultName(VkResult r);
inline Unexpected VkError(VkResult r, std::string_view what) {
  return MakeError(ErrcFromVk(r), "{}: {}", what, VkResultName(r));
}

#define VG_VK_TRY(expr, what)                                   \
  do {                                                          \
    VkResult vg_vk_r_ = (expr);                                 \
    if (vg_vk_r_ != VK_SUCCESS) [[unlikely]]                    \
      return ::vg::engine::VkError(vg_vk_r_, what);             \
  } while (0)

// A device-level object destroyed with vkDestroyX(device, handle, nullptr). The owner of
// the VkDevice (Core) must outlive it; holders keep a shared_ptr<Core> declared first.
template <class H, void (*Destroy)(VkDevice, H, const VkAllocationCallbacks*)>
class VkOwned {
 public:
  VkOwned() = default;
  VkOwned(VkDevice dev, H h) : dev_(dev), h_(h) {}
  ~VkOwned() { Reset(); }
  VkOwned(VkOwned&& o) noexcept : dev_(o.dev_), h_(std::exchange(o.h_, VK_NULL_HANDLE)) {}
  VkOwned& operator=(VkOwned&& o) noexcept {
    if (this != &o) {
      Reset();
      dev_ = o.dev_;
      h_ = std::exchange(o.h_, VK_NULL_HANDLE);
    }
    return *this;
  }
  VkOwned(const VkOwned&) = delete;
  VkOwned& operator=(const VkOwned&) = delete;

  H get() const { return h_; }
  explicit operator bool() const { return h_ != VK_NULL_HANDLE; }

 private:
  void Reset() {
    if (h_ != VK_NULL_HANDLE) Destroy(dev_, h_, nullptr);
    h_ = VK_NULL_HANDLE;
  }
  VkDevice dev_ = VK_NULL_HANDLE;
  H h_ = VK_NULL_HANDLE;
};

using VkBufferOwned = VkOwned<VkBuffer, vkDestroyBuffer>;
using VkMemoryOwned = VkOwned<VkDeviceMemory, vkFreeMemory>;
using VkCommandPoolOwned = VkOwned<VkCommandPool, vkDestroyCommandPool>;
using VkFenceOwned = VkOwned<VkFence, vkDestroyFence>;
using VkDescriptorPoolOwned = VkOwned<VkDescriptorPool, vkDestroyDescriptorPool>;
using VkDescriptorSetLayoutOwned = VkOwned<VkDescriptorSetLayout, vkDestroyDescriptorSetLayout>;
using VkPipelineLayoutOwned = VkOwned<VkPipelineLayout, vkDestroyPipelineLayout>;
using VkPipelineOwned = VkOwned<VkPipeline, vkDestroyPipeline>;
using VkShaderModuleOwned = VkOwned<VkShaderModule, vkDestroyShaderModule>;
using VkPipelineCacheOwned = VkOwned<VkPipelineCache, vkDestroyPipelineCache>;

}  // namespace vg::engine
