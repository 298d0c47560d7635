#include "engine/internal/core.h"

#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <thread>

#include "base/log.h"
#include "engine/internal/vk.h"

namespace vg::engine {
namespace {

struct KindDesc {
  VkPhysicalDeviceType vk;
  DeviceKind kind;
  int preference;  // higher wins: real GPUs first, lavapipe (CPU) last
};
constexpr KindDesc kKinds[] = {
    {VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU, DeviceKind::kDiscrete, 4},
    {VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU, DeviceKind::kIntegrated, 3},
    {VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU, DeviceKind::kVirtual, 2},
    {VK_PHYSICAL_DEVICE_TYPE_CPU, DeviceKind::kCpu, 1},
    {VK_PHYSICAL_DEVICE_TYPE_OTHER, DeviceKind::kOther, 0},
};

int Preference(DeviceKind k) {
  for (const auto& d : kKinds)
    if (d.kind == k) return d.preference;
  return 0;
}

std::string Lower(std::string_view s) {
  std::string r(s);
  for (char& c : r) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return r;
}

bool HasExtension(const std::vector<VkExtensionProperties>& exts, const char* name) {
  return std::any_of(exts.begin(), exts.end(), [&](const auto& e) { return std::strcmp(e.extensionName, name) == 0; });
}

std::string VersionString(uint32_t v) {
  return fmt::format("{}.{}.{}", VK_API_VERSION_MAJOR(v), VK_API_VERSION_MINOR(v), VK_API_VERSION_PATCH(v));
}

}  // namespace

Result<std::shared_ptr<Instance>> Instance::Create() {
  auto inst = std::shared_ptr<Instance>(new Instance());
  uint32_t loader = VK_API_VERSION_1_0;
  if (vkEnumerateInstanceVersion(&loader) != VK_SUCCESS) loader = VK_API_VERSION_1_0;
  VG_ERROR_IF(loader < VK_API_VERSION_1_1, Errc::kUnsupported, "Vulkan loader is {}, need 1.1", VersionString(loader));
  inst->api_version_ = std::min<uint32_t>(loader, VK_API_VERSION_1_3);
  VkApplicationInfo app{VK_STRUCTURE_TYPE_APPLICATION_INFO};
  app.pApplicationName = "vgpud";
  app.pEngineName = "vgpud-engine";
  app.apiVersion = inst->api_version_;
  VkInstanceCreateInfo ci{VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO};
  ci.pApplicationInfo = &app;
  VG_VK_TRY(vkCreateInstance(&ci, nullptr, &inst->instance_), "vkCreateInstance");
  return inst;
}

Instance::~Instance() {
  if (instance_ != VK_NULL_HANDLE) vkDestroyInstance(instance_, nullptr);
}

namespace {
// Mesa 22.3's llvmpipe/lavapipe runs compute on LP_NUM_THREADS threads, by default one per
// CPU this process may run on, at most LP_MAX_THREADS (16).
uint32_t CpuDeviceThreads() {
  constexpr uint32_t kLpMaxThreads = 16;
  long n = 0;
  if (const char* env = std::getenv("LP_NUM_THREADS"); env && *env) {
    n = std::strtol(env, nullptr, 10);
  } else {
    cpu_set_t set;
    CPU_ZERO(&set);
    n = ::sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : long(std::thread::hardware_concurrency());
  }
  return static_cast<uint32_t>(std::clamp<long>(n, 1, kLpMaxThreads));
}

// Keeps every Vulkan driver and layer the loader has mapped resident for the life of the
// process: a later vkDestroyInstance makes the loader dlclose them, and Mesa 22.3.6's
// lavapipe (Debian 12, +deb12u2) leaves a pthread_once allocation behind that only its own
// globals point to. Unloaded, that memory is lost (and LeakSanitizer reports it with a
// stack it can no longer read); resident, it stays owned. A driver that is loaded once
// per process is also what every long-running Vulkan service does in practice.
void PinLoadedVulkanModules() {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> seen;
  for (std::string line; std::getline(maps, line);) {
    size_t slash = line.find('/');
    if (slash == std::string::npos) continue;
    std::string path = line.substr(slash);
    std::string_view base = std::string_view(path).substr(path.rfind('/') + 1);
    bool vulkan_module = base.starts_with("libvulkan_") || base.starts_with("libVkLayer_");
    if (!vulkan_module || !seen.insert(path).second) continue;
    // NOLOAD: only what is already mapped; NODELETE: never unmapped again. The handle is
    // dropped on purpose: the module stays resident whatever dlclose is called later.
    (void)::dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
  }
}
}  // namespace

Result<std::vector<PhysicalCandidate>> Instance::Enumerate() const {
  uint32_t n = 0;
  VG_VK_TRY(vkEnumeratePhysicalDevices(instance_, &n, nullptr), "vkEnumeratePhysicalDevices");
  PinLoadedVulkanModules();  // the drivers are loaded by now (the loader loads them lazily)
  std::vector<VkPhysicalDevice> pds(n);
  VG_VK_TRY(vkEnumeratePhysicalDevices(instance_, &n, pds.data()), "vkEnumeratePhysicalDevices");
  std::vector<PhysicalCandidate> out;
  for (VkPhysicalDevice pd : pds) {
    VkPhysicalDeviceProperties base{};
    vkGetPhysicalDeviceProperties(pd, &base);
    if (base.apiVersion < VK_API_VERSION_1_1) continue;
    uint32_t qn = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &qn, nullptr);
    std::vector<VkQueueFamilyProperties> qf(qn);
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &qn, qf.data());
    auto fam = std::find_if(qf.begin(), qf.end(), [](const auto& q) { return q.queueFlags & VK_QUEUE_COMPUTE_BIT; });
    if (fam == qf.end()) continue;

    uint32_t en = 0;
    vkEnumerateDeviceExtensionProperties(pd, nullptr, &en, nullptr);
    std::vector<VkExtensionProperties> exts(en);
    vkEnumerateDeviceExtensionProperties(pd, nullptr, &en, exts.data());

    PhysicalCandidate c;
    c.pd = pd;
    DeviceInfo& i = c.info;
    i.index = static_cast<uint32_t>(out.size());
    i.external_memory_host = HasExtension(exts, VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME);
    i.external_memory_fd = HasExtension(exts, VK_KHR_EXTERNAL_MEMORY_FD_EXTENSION_NAME);
    bool has_driver_props = base.apiVersion >= VK_API_VERSION_1_2 ||
                            HasExtension(exts, VK_KHR_DRIVER_PROPERTIES_EXTENSION_NAME);

    VkPhysicalDeviceProperties2 p2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2};
    VkPhysicalDeviceDriverProperties drv{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    VkPhysicalDeviceExternalMemoryHostPropertiesEXT host{
        VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_MEMORY_HOST_PROPERTIES_EXT};
    VkPhysicalDeviceMaintenance3Properties m3{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
    void** next = &p2.pNext;
    *next = &m3;
    next = &m3.pNext;
    if (has_driver_props) {
      *next = &drv;
      next = &drv.pNext;
    }
    if (i.external_memory_host) {
      *next = &host;
      next = &host.pNext;
    }
    vkGetPhysicalDeviceProperties2(pd, &p2);

    VkPhysicalDeviceFeatures2 f2{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2};
    VkPhysicalDeviceTimelineSemaphoreFeatures tl{VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES};
    if (base.apiVersion >= VK_API_VERSION_1_2) f2.pNext = &tl;
    vkGetPhysicalDeviceFeatures2(pd, &f2);

    const VkPhysicalDeviceLimits& l = base.limits;
    i.name = base.deviceName;
    i.driver_name = has_driver_props ? drv.driverName : "unknown";
    i.driver_info = has_driver_props ? drv.driverInfo : "";
    i.api_version = VersionString(base.apiVersion);
    i.kind = DeviceKind::kOther;
    for (const auto& k : kKinds)
      if (k.vk == base.deviceType) i.kind = k.kind;
    i.vendor_id = base.vendorID;
    i.device_id = base.deviceID;
    i.queue_family = static_cast<uint32_t>(fam - qf.begin());
    i.max_storage_buffer_range = l.maxStorageBufferRange;
    i.max_allocation_size = m3.maxMemoryAllocationSize;
    i.min_storage_offset_alignment = l.minStorageBufferOffsetAlignment;
    for (int d = 0; d < 3; ++d) {
      i.max_group_count[d] = l.maxComputeWorkGroupCount[d];
      i.max_workgroup_size[d] = l.maxComputeWorkGroupSize[d];
    }
    i.max_workgroup_invocations = l.maxComputeWorkGroupInvocations;
    i.max_push_constants = l.maxPushConstantsSize;
    i.max_shared_memory = l.maxComputeSharedMemorySize;
    if (i.kind == DeviceKind::kCpu) i.parallel_groups = CpuDeviceThreads();
    i.host_import_alignment = i.external_memory_host ? host.minImportedHostPointerAlignment : 0;
    i.timeline_semaphore = base.apiVersion >= VK_API_VERSION_1_2 && tl.timelineSemaphore;
    out.push_back(std::move(c));
  }
  return out;
}

Result<size_t> PickDevice(std::span<const PhysicalCandidate> devices, std::string_view spec) {
  VG_ERROR_IF(devices.empty(), Errc::kNotFound, "no Vulkan 1.1 device with a compute queue");
  if (spec.empty()) {
    size_t best = 0;
    for (size_t i = 1; i < devices.size(); ++i)
      if (Preference(devices[i].info.kind) > Preference(devices[best].info.kind)) best = i;
    return best;
  }
  bool numeric = std::all_of(spec.begin(), spec.end(), [](char c) { return c >= '0' && c <= '9'; });
  if (numeric && spec.size() < 6) {
    size_t idx = std::stoul(std::string(spec));
    VG_ERROR_IF(idx >= devices.size(), Errc::kNotFound, "gpu index {} out of range ({} devices)", idx,
                devices.size());
    return idx;
  }
  std::string want = Lower(spec);
  for (size_t i = 0; i < devices.size(); ++i)
    if (Lower(devices[i].info.name).find(want) != std::string::npos) return i;
  return MakeError(Errc::kNotFound, "no device matches gpu '{}'", spec);
}

Result<std::shared_ptr<Core>> Core::Create(std::shared_ptr<Instance> instance, const PhysicalCandidate& c) {
  auto core = std::shared_ptr<Core>(new Core());
  core->instance_ = std::move(instance);
  core->pd_ = c.pd;
  core->info_ = c.info;
  vkGetPhysicalDeviceMemoryProperties(c.pd, &core->mem_props_);

  float prio = 1.0f;
  VkDeviceQueueCreateInfo q{VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO};
  q.queueFamilyIndex = c.info.queue_family;
  q.queueCount = 1;
  q.pQueuePriorities = &prio;
  std::vector<const char*> exts;
  if (c.info.external_memory_host) exts.push_back(VK_EXT_EXTERNAL_MEMORY_HOST_EXTENSION_NAME);
  if (c.info.external_memory_fd) exts.push_back(VK_KHR_EXTERNAL_MEMORY_FD_EXTENSION_NAME);
  VkDeviceCreateInfo ci{VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO};
  ci.queueCreateInfoCount = 1;
  ci.pQueueCreateInfos = &q;
  ci.enabledExtensionCount = static_cast<uint32_t>(exts.size());
  ci.ppEnabledExtensionNames = exts.data();
  VG_VK_TRY(vkCreateDevice(c.pd, &ci, nullptr, &core->device_), "vkCreateDevice");
  vkGetDeviceQueue(core->device_, c.info.queue_family, 0, &core->queue_);
  if (c.info.external_memory_host) {
    core->get_host_pointer_props = reinterpret_cast<PFN_vkGetMemoryHostPointerPropertiesEXT>(
        vkGetDeviceProcAddr(core->device_, "vkGetMemoryHostPointerPropertiesEXT"));
    if (core->get_host_pointer_props == nullptr) core->info_.external_memory_host = false;
  }
  return core;
}

Core::~Core() {
  if (device_ != VK_NULL_HANDLE) {
    vkDeviceWaitIdle(device_);
    vkDestroyDevice(device_, nullptr);
  }
}

int Core::FindMemoryType(uint32_t type_bits, VkMemoryPropertyFlags flags) const {
  for (uint32_t i = 0; i < mem_props_.memoryTypeCount; ++i)
    if ((type_bits & (1u << i)) && (mem_props_.memoryTypes[i].propertyFlags & flags) == flags)
      return static_cast<int>(i);
  return -1;
}

}  // namespace vg::engine
