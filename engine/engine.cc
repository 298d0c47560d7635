#include "engine/engine.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <optional>
#include <thread>

#include "base/cpu_slice.h"
#include "base/log.h"
#include "engine/internal/core.h"
#include "engine/internal/vk.h"
#include "shaders/catalogue.h"

namespace vg::engine {
namespace {

constexpr uint64_t AlignDown(uint64_t v, uint64_t a) { return v & ~(a - 1); }
constexpr uint64_t AlignUp(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

constexpr VkBufferUsageFlags kBufferUsage =
    VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT;
constexpr VkMemoryPropertyFlags kHostMem = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
// How long the completion thread sleeps in one vkWaitForFences before rechecking for
// stop requests and (simulated) device loss.
constexpr uint64_t kFencePollNs = 20'000'000;

struct KindName {
  DeviceKind kind;
  std::string_view name;
};
constexpr KindName kKindNames[] = {{DeviceKind::kOther, "other"},
                                   {DeviceKind::kIntegrated, "integrated-gpu"},
                                   {DeviceKind::kDiscrete, "discrete-gpu"},
                                   {DeviceKind::kVirtual, "virtual-gpu"},
                                   {DeviceKind::kCpu, "cpu"}};
constexpr std::string_view kPathNames[] = {"device", "zero-copy", "staged"};

}  // namespace

std::string_view DeviceKindName(DeviceKind k) {
  for (const auto& n : kKindNames)
    if (n.kind == k) return n.name;
  return "?";
}

std::string_view MemoryPathName(MemoryPath p) { return kPathNames[static_cast<size_t>(p)]; }

std::string DeviceInfo::ToString() const {
  return fmt::format(
      "device {}: {} ({}), driver {} {}, Vulkan {}, vendor {:#06x} device {:#06x}, queue family {}\n"
      "  maxStorageBufferRange {} B, maxMemoryAllocationSize {} B, minStorageBufferOffsetAlignment {}\n"
      "  maxComputeWorkGroupCount {}x{}x{}, maxComputeWorkGroupSize {}x{}x{} ({} invocations), "
      "push constants {} B, shared memory {} B, {} workgroups at once\n"
      "  VK_EXT_external_memory_host {} (import alignment {} B), VK_KHR_external_memory_fd {}, timeline "
      "semaphores {}",
      index, name, DeviceKindName(kind), driver_name, driver_info, api_version, vendor_id, device_id, queue_family,
      max_storage_buffer_range, max_allocation_size, min_storage_offset_alignment, max_group_count[0],
      max_group_count[1], max_group_count[2], max_workgroup_size[0], max_workgroup_size[1], max_workgroup_size[2],
      max_workgroup_invocations, max_push_constants, max_shared_memory, parallel_groups, external_memory_host ? "yes" : "no",
      host_import_alignment, external_memory_fd ? "yes" : "no", timeline_semaphore ? "yes" : "no");
}

// ---- Submission builders ---------------------------------------------------------------

Submission& Submission::Dispatch(uint32_t kernel, std::array<uint32_t, 3> groups, std::vector<BufferRange> bindings,
                                 std::span<const std::byte> push, std::array<uint32_t, 3> base) {
  ops.emplace_back(DispatchOp{kernel, groups, std::move(bindings), {push.begin(), push.end()}, base});
  return *this;
}
Submission& Submission::Copy(BufferRef src, ByteSize src_offset, BufferRef dst, ByteSize dst_offset, ByteSize size) {
  ops.emplace_back(CopyOp{std::move(src), src_offset, std::move(dst), dst_offset, size});
  return *this;
}
Submission& Submission::Fill(BufferRef dst, ByteSize offset, ByteSize size, uint32_t value) {
  ops.emplace_back(FillOp{std::move(dst), offset, size, value});
  return *this;
}

// ---- SubmitToken -----------------------------------------------------------------------

bool SubmitToken::Done() const {
  std::lock_guard lk(mu_);
  return done_;
}
Result<> SubmitToken::Status() const {
  std::lock_guard lk(mu_);
  if (!done_) return MakeError(Errc::kBusy, "submission {} pending", serial_);
  return result_;
}
Result<> SubmitToken::Wait(std::chrono::milliseconds timeout) const {
  std::unique_lock lk(mu_);
  if (timeout.count() < 0) {
    cv_.wait(lk, [&] { return done_; });
  } else if (!cv_.wait_for(lk, timeout, [&] { return done_; })) {
    return MakeError(Errc::kTimeout, "submission {} not done after {} ms", serial_, timeout.count());
  }
  return result_;
}
void SubmitToken::Complete(Result<> r) {
  {
    std::lock_guard lk(mu_);
    if (done_) return;
    result_ = std::move(r);
    done_ = true;
    done_at_ = std::chrono::steady_clock::now();
  }
  cv_.notify_all();
}
std::optional<std::chrono::steady_clock::time_point> SubmitToken::DoneAt() const {
  std::lock_guard lk(mu_);
  if (!done_) return std::nullopt;
  return done_at_;
}

// ---- Buffers ---------------------------------------------------------------------------

class BufferImpl final : public Buffer {
 public:
  explicit BufferImpl(std::shared_ptr<Core> core) : core_(std::move(core)) {}
  ByteSize size() const override { return size_; }
  MemoryPath path() const override { return path_; }
  std::span<std::byte> Map() const override { return host_; }

  std::shared_ptr<Core> core_;  // first: the device outlives the handles below
  VkMemoryOwned memory_;
  VkBufferOwned buffer_;
  uint64_t base_ = 0;  // offset of the caller's byte 0 inside buffer_ (zero-copy rounding)
  ByteSize size_{0};
  MemoryPath path_ = MemoryPath::kDevice;
  std::span<std::byte> host_;          // what Map() shows
  std::byte* staging_ = nullptr;       // device-side bytes of a kStaged buffer
  // kStaged: queued submissions using this buffer that have not been copied back yet.
  // Guarded by EngineImpl::queue_mu_.
  uint32_t staged_uses_ = 0;
};

// ---- Engine internals ------------------------------------------------------------------

struct KernelPipeline {
  VkDescriptorSetLayoutOwned dsl;
  VkPipelineLayoutOwned layout;
  VkPipelineOwned pipeline;
};

// One submission's recording state; pooled so concurrent submitters never share one.
struct Slot {
  VkCommandPoolOwned pool;
  VkDescriptorPoolOwned dpool;
  VkFenceOwned fence;
  VkCommandBuffer cmd = VK_NULL_HANDLE;  // freed with the pool
};

struct StagedRange {
  BufferImpl* buf;
  uint64_t off;
  uint64_t size;
};

struct InFlight {
  std::unique_ptr<Slot> slot;
  Submission sub;  // holds its buffers alive until completion
  TokenRef token;
  Completion completion;
  std::vector<BufferImpl*> staged;  // distinct kStaged buffers the ops touch
  std::vector<StagedRange> stage_out;
  bool queued = false;    // handed to vkQueueSubmit (or failed trying: submit_error)
  bool gated = false;     // admitted by the SubmitGate (it hears when it has run)
  std::chrono::steady_clock::time_point queued_at;
  bool notified = false;  // token/callback/eventfd already told
  Result<> submit_error;
};

class EngineImpl {
 public:
  EngineImpl(std::shared_ptr<Core> core, EngineOptions opts) : core_(std::move(core)), opts_(std::move(opts)) {}
  ~EngineImpl();
  Result<> Start();

  const BufferImpl* AsOurs(const BufferRef& b) const {
    auto* impl = dynamic_cast<const BufferImpl*>(b.get());
    return impl != nullptr && impl->core_ == core_ ? impl : nullptr;
  }
  Result<BufferRef> CreateBuffer(ByteSize size);
  Result<BufferRef> WrapHostMemory(std::span<std::byte> host);
  Result<> Validate(const Submission& s) const;
  Result<TokenRef> Submit(Submission s, Completion c);
  Result<> WaitIdle();
  void SimulateDeviceLost();
  void SetGate(SubmitGate* gate) {
    std::lock_guard lk(queue_mu_);
    gate_ = gate;
  }
  // gate_ is set before the first Submit and never changes afterwards.
  bool PrefersSmallSubmissions() const { return gate_ && gate_->PrefersSmallSubmissions(); }
  void Pump() {
    {
      std::lock_guard lk(queue_mu_);
      PumpLocked();
    }
    queue_cv_.notify_all();
  }
  EngineCounters Counters() const;

  std::shared_ptr<Core> core_;  // first: destroyed last

 private:
  Result<> ValidateRange(const BufferRef& b, uint64_t off, uint64_t size, const char* what) const;
  Result<> ValidateOp(const DispatchOp& d) const;
  Result<> ValidateOp(const CopyOp& c) const;
  Result<> ValidateOp(const FillOp& f) const;
  Result<std::unique_ptr<BufferImpl>> NewBuffer(uint64_t vk_size, const void* import_next, int mem_type);
  Result<const KernelPipeline*> GetPipeline(const shaders::KernelDesc& k);
  Result<std::unique_ptr<Slot>> AcquireSlot();
  Result<> Record(Slot& slot, const Submission& s, std::span<const KernelPipeline* const> pipes);
  void StageIn(const Submission& s, std::vector<StagedRange>& out_ranges);
  void PumpLocked();
  void Finish(InFlight& f, Result<> r, bool recycle);
  void CompletionLoop();

  EngineOptions opts_;
  VkPipelineCacheOwned cache_;

  std::mutex pipe_mu_;
  std::array<std::unique_ptr<KernelPipeline>, 32> pipes_;

  std::mutex slot_mu_;
  std::vector<std::unique_ptr<Slot>> free_slots_;

  // Guards vkQueueSubmit (the queue is externally synchronised) and the in-flight FIFO.
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::condition_variable idle_cv_;
  std::deque<InFlight> inflight_;
  size_t active_ = 0;  // queued and not yet finished (incl. popped, being finished)
  bool stop_ = false;
  bool lost_notify_pending_ = false;
  std::atomic<bool> lost_{false};
  SubmitGate* gate_ = nullptr;  // set before the first Submit
  uint32_t gated_on_device_ = 0;  // admitted by the gate, not yet completed (queue_mu_)
  std::chrono::steady_clock::time_point last_done_;  // the last gated completion (queue_mu_)
  std::thread completion_thread_;

  std::atomic<uint64_t> next_serial_{1};
  std::atomic<uint64_t> bytes_zero_copy_{0}, bytes_staged_in_{0}, bytes_staged_out_{0};
  std::atomic<uint64_t> submissions_{0}, ops_{0}, pipelines_built_{0}, lost_reports_{0};
};

Result<> EngineImpl::Start() {
  VkPipelineCacheCreateInfo pci{VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO};
  VkPipelineCache cache;
  VG_VK_TRY(vkCreatePipelineCache(core_->device(), &pci, nullptr, &cache), "vkCreatePipelineCache");
  cache_ = VkPipelineCacheOwned(core_->device(), cache);
  completion_thread_ = std::thread([this] { CompletionLoop(); });
  return Ok();
}

EngineImpl::~EngineImpl() {
  {
    std::lock_guard lk(queue_mu_);
    stop_ = true;
  }
  queue_cv_.notify_all();
  if (completion_thread_.joinable()) completion_thread_.join();
}

EngineCounters EngineImpl::Counters() const {
  return {bytes_zero_copy_.load(), bytes_staged_in_.load(), bytes_staged_out_.load(), submissions_.load(),
          ops_.load(),           pipelines_built_.load(), lost_reports_.load()};
}

Result<std::unique_ptr<BufferImpl>> EngineImpl::NewBuffer(uint64_t vk_size, const void* import_next, int mem_type) {
  VkDevice dev = core_->device();
  auto b = std::make_unique<BufferImpl>(core_);
  VkExternalMemoryBufferCreateInfo ext{VK_STRUCTURE_TYPE_EXTERNAL_MEMORY_BUFFER_CREATE_INFO};
  ext.handleTypes = VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT;
  VkBufferCreateInfo bci{VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO};
  bci.pNext = import_next ? &ext : nullptr;
  bci.size = vk_size;
  bci.usage = kBufferUsage;
  bci.sharingMode = VK_SHARING_MODE_EXCLUSIVE;
  VkBuffer buf;
  VG_VK_TRY(vkCreateBuffer(dev, &bci, nullptr, &buf), "vkCreateBuffer");
  b->buffer_ = VkBufferOwned(dev, buf);

  VkMemoryRequirements req;
  vkGetBufferMemoryRequirements(dev, buf, &req);
  VG_ERROR_IF(import_next && req.size > vk_size, Errc::kUnsupported, "import needs {} B, have {}", req.size, vk_size);
  int type = mem_type >= 0 ? mem_type : core_->FindMemoryType(req.memoryTypeBits, kHostMem);
  VG_ERROR_IF(type < 0 || !(req.memoryTypeBits & (1u << type)), Errc::kUnsupported,
              "no host-visible coherent memory type for buffers");
  VkMemoryAllocateInfo mai{VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO};
  mai.pNext = import_next;
  mai.allocationSize = import_next ? vk_size : req.size;
  mai.memoryTypeIndex = static_cast<uint32_t>(type);
  VkDeviceMemory mem;
  VG_VK_TRY(vkAllocateMemory(dev, &mai, nullptr, &mem), "vkAllocateMemory");
  b->memory_ = VkMemoryOwned(dev, mem);
  VG_VK_TRY(vkBindBufferMemory(dev, buf, mem, 0), "vkBindBufferMemory");
  if (!import_next) {
    void* p = nullptr;
    VG_VK_TRY(vkMapMemory(dev, mem, 0, VK_WHOLE_SIZE, 0, &p), "vkMapMemory");
    b->staging_ = static_cast<std::byte*>(p);
  }
  return b;
}

Result<BufferRef> EngineImpl::CreateBuffer(ByteSize size) {
  VG_INVALID_IF(size.v == 0, "zero-sized buffer");
  VG_ERROR_IF(size.v > core_->info().max_allocation_size, Errc::kLimitExceeded, "buffer of {} B > {} B", size.v,
              core_->info().max_allocation_size);
  VG_TRY_ASSIGN(auto b, NewBuffer(size.v, nullptr, -1));
  b->size_ = size;
  b->path_ = MemoryPath::kDevice;
  b->host_ = {b->staging_, size.v};
  // Fresh device memory is not guaranteed zero; a buffer may end up in a guest's view.
  std::memset(b->staging_, 0, size.v);
  b->staging_ = nullptr;
  return BufferRef(std::move(b));
}

Result<BufferRef> EngineImpl::WrapHostMemory(std::span<std::byte> host) {
  VG_INVALID_IF(host.empty() || host.data() == nullptr, "empty host range");
  const DeviceInfo& info = core_->info();
  VG_ERROR_IF(host.size() > info.max_allocation_size, Errc::kLimitExceeded, "host range of {} B > {} B",
              host.size(), info.max_allocation_size);
  auto addr = reinterpret_cast<uintptr_t>(host.data());
  uint64_t align = info.host_import_alignment;
  // Rounding out stays inside mapped memory only when the import alignment is at most a
  // page. The start must keep the storage-offset alignment so bindings behave as they do
  // on device buffers.
  bool zero_copy = opts_.allow_zero_copy && info.external_memory_host && align != 0 && align <= kPageSize &&
                   IsAligned(addr, info.min_storage_offset_alignment);
  if (zero_copy) {
    uint64_t lo = AlignDown(addr, align);
    uint64_t hi = AlignUp(addr + host.size(), align);
    auto* base = reinterpret_cast<void*>(lo);
    VkMemoryHostPointerPropertiesEXT hp{VK_STRUCTURE_TYPE_MEMORY_HOST_POINTER_PROPERTIES_EXT};
    VkResult r = core_->get_host_pointer_props(core_->device(), VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT,
                                               base, &hp);
    int type = r == VK_SUCCESS ? core_->FindMemoryType(hp.memoryTypeBits, kHostMem) : -1;
    if (type >= 0) {
      VkImportMemoryHostPointerInfoEXT imp{VK_STRUCTURE_TYPE_IMPORT_MEMORY_HOST_POINTER_INFO_EXT};
      imp.handleType = VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT;
      imp.pHostPointer = base;
      auto b = NewBuffer(hi - lo, &imp, type);
      if (b.ok()) {
        auto& bi = *b;
        bi->base_ = addr - lo;
        bi->size_ = ByteSize{host.size()};
        bi->path_ = MemoryPath::kZeroCopy;
        bi->host_ = host;
        bytes_zero_copy_ += host.size();
        return BufferRef(std::move(bi));
      }
      VG_LOGD("engine: host import of {} B failed ({}), staging", host.size(), b.error().ToString());
    }
  }
  VG_TRY_ASSIGN(auto b, NewBuffer(host.size(), nullptr, -1));
  b->size_ = ByteSize{host.size()};
  b->path_ = MemoryPath::kStaged;
  b->host_ = host;
  return BufferRef(std::move(b));
}

// ---- Validation (const, no side effects) ------------------------------------------------

Result<> EngineImpl::ValidateRange(const BufferRef& b, uint64_t off, uint64_t size, const char* what) const {
  VG_INVALID_IF(b == nullptr, "{}: no buffer", what);
  VG_INVALID_IF(AsOurs(b) == nullptr, "{}: buffer belongs to another engine", what);
  VG_INVALID_IF(size == 0, "{}: zero-sized range", what);
  VG_ERROR_IF(!RangeWithin(off, size, b->size().v), Errc::kOutOfBounds, "{}: [{:#x}, +{:#x}) past a {:#x}-byte buffer",
              what, off, size, b->size().v);
  return Ok();
}

Result<> EngineImpl::ValidateOp(const DispatchOp& d) const {
  const shaders::KernelDesc* k = shaders::FindKernel(d.kernel);
  VG_ERROR_IF(k == nullptr, Errc::kBadKernel, "unknown kernel {}", d.kernel);
  VG_ERROR_IF(d.bindings.size() != k->binding_count, Errc::kBadKernel, "{}: {} bindings, want {}", k->name,
              d.bindings.size(), k->binding_count);
  const DeviceInfo& info = core_->info();
  for (size_t i = 0; i < 3; ++i) {
    VG_ERROR_IF(d.groups[i] > info.max_group_count[i], Errc::kLimitExceeded, "{}: group count {} = {} > device {}",
                k->name, "xyz"[i], d.groups[i], info.max_group_count[i]);
    // A group range [base, base + groups) must lie where a whole dispatch could reach.
    uint64_t end = uint64_t{d.base[i]} + d.groups[i];
    VG_ERROR_IF(end > info.max_group_count[i] || end > k->max_groups[i], Errc::kLimitExceeded,
                "{}: group range {} ends at {} past the limit", k->name, "xyz"[i], end);
  }
  uint64_t sizes[shaders::kMaxBindings] = {};
  for (size_t i = 0; i < d.bindings.size(); ++i) {
    const BufferRange& r = d.bindings[i];
    VG_TRY_CTX(ValidateRange(r.buffer, r.offset.v, r.size.v, "binding"), "{} binding {}", k->name, i);
    uint64_t dev_off = AsOurs(r.buffer)->base_ + r.offset.v;
    VG_ERROR_IF(!IsAligned(dev_off, info.min_storage_offset_alignment), Errc::kMisaligned,
                "{} binding {}: offset {:#x} not a multiple of {}", k->name, i, r.offset.v,
                info.min_storage_offset_alignment);
    // One binding is at most maxStorageBufferRange (128 MiB on lavapipe): larger buffers
    // are bound in pieces by the caller, one window per dispatch.
    VG_ERROR_IF(r.size.v > info.max_storage_buffer_range, Errc::kLimitExceeded,
                "{} binding {}: {} B > maxStorageBufferRange {} B", k->name, i, r.size.v,
                info.max_storage_buffer_range);
    sizes[i] = r.size.v;
  }
  return shaders::ValidateKernelArgs(*k, d.push, std::span(sizes, d.bindings.size()), d.groups);
}

Result<> EngineImpl::ValidateOp(const CopyOp& c) const {
  VG_TRY(ValidateRange(c.src, c.src_offset.v, c.size.v, "copy source"));
  VG_TRY(ValidateRange(c.dst, c.dst_offset.v, c.size.v, "copy destination"));
  VG_ERROR_IF(c.src == c.dst && RangesOverlap(c.src_offset.v, c.size.v, c.dst_offset.v, c.size.v), Errc::kOverlap,
              "copy within one buffer with overlapping ranges");
  return Ok();
}

Result<> EngineImpl::ValidateOp(const FillOp& f) const {
  VG_TRY(ValidateRange(f.dst, f.offset.v, f.size.v, "fill"));
  VG_ERROR_IF(!IsAligned(f.offset.v, 4) || !IsAligned(f.size.v, 4) || !IsAligned(AsOurs(f.dst)->base_, 4),
              Errc::kMisaligned, "fill offset {:#x} / size {:#x} not multiples of 4", f.offset.v, f.size.v);
  return Ok();
}

Result<> EngineImpl::Validate(const Submission& s) const {
  VG_ERROR_IF(s.ops.size() > kMaxOpsPerSubmission, Errc::kLimitExceeded, "{} ops > {}", s.ops.size(),
              kMaxOpsPerSubmission);
  for (size_t i = 0; i < s.ops.size(); ++i)
    VG_TRY_CTX(std::visit([&](const auto& op) { return ValidateOp(op); }, s.ops[i]), "op {}", i);
  return Ok();
}

// ---- Execution ------------------------------------------------------------------------

Result<const KernelPipeline*> EngineImpl::GetPipeline(const shaders::KernelDesc& k) {
  std::lock_guard lk(pipe_mu_);
  VG_ERROR_IF(k.raw_id() >= pipes_.size(), Errc::kInternal, "kernel id {} past the pipeline table", k.raw_id());
  auto& slot = pipes_[k.raw_id()];
  if (slot) return slot.get();
  VkDevice dev = core_->device();
  VG_ERROR_IF(k.push_size > core_->info().max_push_constants, Errc::kUnsupported, "{}: {} B of push constants",
              k.name, k.push_size);
  auto p = std::make_unique<KernelPipeline>();
  std::array<VkDescriptorSetLayoutBinding, shaders::kMaxBindings> lb{};
  for (uint32_t i = 0; i < k.binding_count; ++i)
    lb[i] = {i, VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, 1, VK_SHADER_STAGE_COMPUTE_BIT, nullptr};
  VkDescriptorSetLayoutCreateInfo dci{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO};
  dci.bindingCount = k.binding_count;
  dci.pBindings = lb.data();
  VkDescriptorSetLayout dsl;
  VG_VK_TRY(vkCreateDescriptorSetLayout(dev, &dci, nullptr, &dsl), "vkCreateDescriptorSetLayout");
  p->dsl = VkDescriptorSetLayoutOwned(dev, dsl);

  VkPushConstantRange pr{VK_SHADER_STAGE_COMPUTE_BIT, 0, k.push_size};
  VkPipelineLayoutCreateInfo lci{VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO};
  lci.setLayoutCount = 1;
  lci.pSetLayouts = &dsl;
  lci.pushConstantRangeCount = k.push_size ? 1 : 0;
  lci.pPushConstantRanges = &pr;
  VkPipelineLayout layout;
  VG_VK_TRY(vkCreatePipelineLayout(dev, &lci, nullptr, &layout), "vkCreatePipelineLayout");
  p->layout = VkPipelineLayoutOwned(dev, layout);

  VkShaderModuleCreateInfo sci{VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO};
  sci.codeSize = k.spirv.size_bytes();
  sci.pCode = k.spirv.data();
  VkShaderModule mod;
  VG_VK_TRY(vkCreateShaderModule(dev, &sci, nullptr, &mod), "vkCreateShaderModule");
  VkShaderModuleOwned module(dev, mod);

  VkComputePipelineCreateInfo cci{VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO};
  cci.stage = {VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO};
  cci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
  cci.stage.module = mod;
  cci.stage.pName = "main";
  cci.layout = layout;
  cci.flags = VK_PIPELINE_CREATE_DISPATCH_BASE_BIT;  // group ranges (DispatchOp::base)
  VkPipeline pipe;
  VG_VK_TRY(vkCreateComputePipelines(dev, cache_.get(), 1, &cci, nullptr, &pipe), "vkCreateComputePipelines");
  p->pipeline = VkPipelineOwned(dev, pipe);
  ++pipelines_built_;
  slot = std::move(p);
  return slot.get();
}

Result<std::unique_ptr<Slot>> EngineImpl::AcquireSlot() {
  VkDevice dev = core_->device();
  {
    std::lock_guard lk(slot_mu_);
    if (!free_slots_.empty()) {
      auto s = std::move(free_slots_.back());
      free_slots_.pop_back();
      VG_VK_TRY(vkResetCommandPool(dev, s->pool.get(), 0), "vkResetCommandPool");
      VG_VK_TRY(vkResetDescriptorPool(dev, s->dpool.get(), 0), "vkResetDescriptorPool");
      VkFence f = s->fence.get();
      VG_VK_TRY(vkResetFences(dev, 1, &f), "vkResetFences");
      return s;
    }
  }
  auto s = std::make_unique<Slot>();
  VkCommandPoolCreateInfo pci{VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO};
  pci.flags = VK_COMMAND_POOL_CREATE_TRANSIENT_BIT;
  pci.queueFamilyIndex = core_->info().queue_family;
  VkCommandPool pool;
  VG_VK_TRY(vkCreateCommandPool(dev, &pci, nullptr, &pool), "vkCreateCommandPool");
  s->pool = VkCommandPoolOwned(dev, pool);
  VkCommandBufferAllocateInfo cai{VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO};
  cai.commandPool = pool;
  cai.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
  cai.commandBufferCount = 1;
  VG_VK_TRY(vkAllocateCommandBuffers(dev, &cai, &s->cmd), "vkAllocateCommandBuffers");
  VkDescriptorPoolSize ps{VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                          static_cast<uint32_t>(kMaxOpsPerSubmission * shaders::kMaxBindings)};
  VkDescriptorPoolCreateInfo dpi{VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO};
  dpi.maxSets = kMaxOpsPerSubmission;
  dpi.poolSizeCount = 1;
  dpi.pPoolSizes = &ps;
  VkDescriptorPool dp;
  VG_VK_TRY(vkCreateDescriptorPool(dev, &dpi, nullptr, &dp), "vkCreateDescriptorPool");
  s->dpool = VkDescriptorPoolOwned(dev, dp);
  VkFenceCreateInfo fci{VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
  VkFence fence;
  VG_VK_TRY(vkCreateFence(dev, &fci, nullptr, &fence), "vkCreateFence");
  s->fence = VkFenceOwned(dev, fence);
  return s;
}

namespace {
void Barrier(VkCommandBuffer cmd, VkPipelineStageFlags dst_stage, VkAccessFlags dst_access) {
  VkMemoryBarrier mb{VK_STRUCTURE_TYPE_MEMORY_BARRIER};
  mb.srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT;
  mb.dstAccessMask = dst_access;
  vkCmdPipelineBarrier(cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT, dst_stage, 0, 1, &mb,
                       0, nullptr, 0, nullptr);
}
}  // namespace

Result<> EngineImpl::Record(Slot& slot, const Submission& s, std::span<const KernelPipeline* const> pipes) {
  VkDevice dev = core_->device();
  VkCommandBuffer cmd = slot.cmd;
  VkCommandBufferBeginInfo bi{VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
  bi.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
  VG_VK_TRY(vkBeginCommandBuffer(cmd, &bi), "vkBeginCommandBuffer");
  for (size_t i = 0; i < s.ops.size(); ++i) {
    // Before every op, the first included: a barrier's first scope is all earlier work
    // on the queue, so ops and whole submissions run in queue order.
    Barrier(cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
              VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT |
                  VK_ACCESS_TRANSFER_WRITE_BIT);
    const Op& op = s.ops[i];
    if (const auto* d = std::get_if<DispatchOp>(&op)) {
      const KernelPipeline* p = pipes[i];
      VkDescriptorSetAllocateInfo ai{VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO};
      ai.descriptorPool = slot.dpool.get();
      ai.descriptorSetCount = 1;
      VkDescriptorSetLayout dsl = p->dsl.get();
      ai.pSetLayouts = &dsl;
      VkDescriptorSet set;
      VG_VK_TRY(vkAllocateDescriptorSets(dev, &ai, &set), "vkAllocateDescriptorSets");
      std::array<VkDescriptorBufferInfo, shaders::kMaxBindings> infos{};
      std::array<VkWriteDescriptorSet, shaders::kMaxBindings> writes{};
      for (size_t b = 0; b < d->bindings.size(); ++b) {
        const BufferImpl* buf = AsOurs(d->bindings[b].buffer);
        infos[b] = {buf->buffer_.get(), buf->base_ + d->bindings[b].offset.v, d->bindings[b].size.v};
        writes[b] = {VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET};
        writes[b].dstSet = set;
        writes[b].dstBinding = static_cast<uint32_t>(b);
        writes[b].descriptorCount = 1;
        writes[b].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        writes[b].pBufferInfo = &infos[b];
      }
      vkUpdateDescriptorSets(dev, static_cast<uint32_t>(d->bindings.size()), writes.data(), 0, nullptr);
      vkCmdBindPipeline(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, p->pipeline.get());
      vkCmdBindDescriptorSets(cmd, VK_PIPELINE_BIND_POINT_COMPUTE, p->layout.get(), 0, 1, &set, 0, nullptr);
      if (!d->push.empty())
        vkCmdPushConstants(cmd, p->layout.get(), VK_SHADER_STAGE_COMPUTE_BIT, 0,
                           static_cast<uint32_t>(d->push.size()), d->push.data());
      if (d->base == std::array<uint32_t, 3>{0, 0, 0})  // a whole dispatch: the plain call
        vkCmdDispatch(cmd, d->groups[0], d->groups[1], d->groups[2]);
      else
        vkCmdDispatchBase(cmd, d->base[0], d->base[1], d->base[2], d->groups[0], d->groups[1], d->groups[2]);
    } else if (const auto* c = std::get_if<CopyOp>(&op)) {
      const BufferImpl* src = AsOurs(c->src);
      const BufferImpl* dst = AsOurs(c->dst);
      VkBufferCopy region{src->base_ + c->src_offset.v, dst->base_ + c->dst_offset.v, c->size.v};
      vkCmdCopyBuffer(cmd, src->buffer_.get(), dst->buffer_.get(), 1, &region);
    } else if (const auto* f = std::get_if<FillOp>(&op)) {
      const BufferImpl* dst = AsOurs(f->dst);
      vkCmdFillBuffer(cmd, dst->buffer_.get(), dst->base_ + f->offset.v, f->size.v, f->value);
    }
  }
  // Device writes must be visible to the host (the caller's Map(), staging copy-out)
  // once the fence signals.
  Barrier(cmd, VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT);
  VG_VK_TRY(vkEndCommandBuffer(cmd), "vkEndCommandBuffer");
  return Ok();
}

// Staged buffers: copy each range an op touches in (host -> staging) now, and remember
// the ranges it writes to copy out after the fence.
void EngineImpl::StageIn(const Submission& s, std::vector<StagedRange>& out_ranges) {
  auto touch = [&](const BufferRef& ref, uint64_t off, uint64_t size, bool writes) {
    auto* b = const_cast<BufferImpl*>(AsOurs(ref));
    if (b->path_ != MemoryPath::kStaged) return;
    std::memcpy(b->staging_ + off, b->host_.data() + off, size);
    bytes_staged_in_ += size;
    if (writes) out_ranges.push_back({b, off, size});
  };
  for (const Op& op : s.ops) {
    if (const auto* d = std::get_if<DispatchOp>(&op)) {
      const shaders::KernelDesc* k = shaders::FindKernel(d->kernel);
      for (size_t b = 0; b < d->bindings.size(); ++b)
        touch(d->bindings[b].buffer, d->bindings[b].offset.v, d->bindings[b].size.v,
              shaders::Writes(k->bindings[b].access));
    } else if (const auto* c = std::get_if<CopyOp>(&op)) {
      touch(c->src, c->src_offset.v, c->size.v, false);
      touch(c->dst, c->dst_offset.v, c->size.v, true);
    } else if (const auto* f = std::get_if<FillOp>(&op)) {
      touch(f->dst, f->offset.v, f->size.v, true);
    }
  }
}

Result<TokenRef> EngineImpl::Submit(Submission s, Completion c) {
  VG_TRY(Validate(s));
  VG_ERROR_IF(lost_.load(), Errc::kDeviceLost, "device lost");
  std::vector<const KernelPipeline*> pipes(s.ops.size(), nullptr);
  for (size_t i = 0; i < s.ops.size(); ++i)
    if (const auto* d = std::get_if<DispatchOp>(&s.ops[i])) {
      VG_TRY_ASSIGN(pipes[i], GetPipeline(*shaders::FindKernel(d->kernel)));
    }
  VG_TRY_ASSIGN(std::unique_ptr<Slot> slot, AcquireSlot());
  VG_TRY(Record(*slot, s, pipes));

  InFlight f;
  f.token = std::make_shared<SubmitToken>(next_serial_++);
  TokenRef token = f.token;
  auto note_staged = [&](const BufferRef& ref) {
    auto* b = const_cast<BufferImpl*>(AsOurs(ref));
    if (b->path_ == MemoryPath::kStaged && std::find(f.staged.begin(), f.staged.end(), b) == f.staged.end())
      f.staged.push_back(b);
  };
  for (const Op& op : s.ops) {
    if (const auto* d = std::get_if<DispatchOp>(&op)) {
      for (const BufferRange& r : d->bindings) note_staged(r.buffer);
    } else if (const auto* cp = std::get_if<CopyOp>(&op)) {
      note_staged(cp->src);
      note_staged(cp->dst);
    } else if (const auto* fl = std::get_if<FillOp>(&op)) {
      note_staged(fl->dst);
    }
  }
  {
    std::lock_guard lk(queue_mu_);
    VG_ERROR_IF(lost_.load(), Errc::kDeviceLost, "device lost");
    VG_ERROR_IF(inflight_.size() >= kMaxInFlight, Errc::kBusy, "{} submissions pending", inflight_.size());
    ++submissions_;
    ops_ += s.ops.size();
    f.slot = std::move(slot);
    f.sub = std::move(s);
    f.completion = std::move(c);
    inflight_.push_back(std::move(f));
    ++active_;
    PumpLocked();
  }
  queue_cv_.notify_all();
  return token;
}

// Hands pending submissions to the queue in FIFO order. A submission that touches a
// staged buffer still in use by a queued one waits (and everything behind it, to keep
// queue order): its copy-in must see the earlier submission's copy-out, or it would
// overwrite the earlier one's device writes with stale host bytes.
void EngineImpl::PumpLocked() {
  for (InFlight& f : inflight_) {
    if (f.queued) continue;
    if (lost_.load()) return;
    if (std::any_of(f.staged.begin(), f.staged.end(), [](const BufferImpl* b) { return b->staged_uses_ > 0; }))
      return;
    if (gate_ && !gate_->Admit(f.sub)) return;  // held, and everything behind it (order)
    if (gate_) {
      f.gated = true;
      ++gated_on_device_;
    }
    f.queued_at = std::chrono::steady_clock::now();
    StageIn(f.sub, f.stage_out);
    VkSubmitInfo si{VK_STRUCTURE_TYPE_SUBMIT_INFO};
    si.commandBufferCount = 1;
    si.pCommandBuffers = &f.slot->cmd;
    VkResult r = vkQueueSubmit(core_->queue(), 1, &si, f.slot->fence.get());
    f.queued = true;
    if (r != VK_SUCCESS) {
      f.submit_error = VkError(r, "vkQueueSubmit");
      if (r == VK_ERROR_DEVICE_LOST && !lost_.exchange(true)) lost_notify_pending_ = true;
      continue;
    }
    for (BufferImpl* b : f.staged) ++b->staged_uses_;
  }
}

void EngineImpl::Finish(InFlight& f, Result<> r, bool recycle) {
  bool ran = f.queued && f.submit_error.ok();
  if (ran && r.ok())
    for (const StagedRange& sr : f.stage_out) {
      std::memcpy(sr.buf->host_.data() + sr.off, sr.buf->staging_ + sr.off, sr.size);
      bytes_staged_out_ += sr.size;
    }
  if (ran && !f.staged.empty()) {
    // Before the callback runs, so a callback that submits more work on the same staged
    // buffer is not held behind its own completion.
    std::lock_guard lk(queue_mu_);
    for (BufferImpl* b : f.staged) --b->staged_uses_;
    PumpLocked();
  }
  if (!f.notified) {
    if (r.code() == Errc::kDeviceLost) ++lost_reports_;
    f.token->Complete(r);
    if (f.completion.callback) f.completion.callback(r);
    if (f.completion.eventfd) (void)f.completion.eventfd->Signal(1);
    f.notified = true;
  }
  f.sub = {};
  if (recycle) {
    std::lock_guard lk(slot_mu_);
    free_slots_.push_back(std::move(f.slot));
  }
  f.slot.reset();
}

void EngineImpl::CompletionLoop() {
  // This thread waits on fences and hands completions on: a short CPU slice lets it run as
  // soon as one signals, not after a busy compute thread's slice (base/cpu_slice.h). Refused
  // harmlessly where a sandbox forbids it.
  (void)SetThreadCpuSlice(CpuSlice::kShort);
  VkDevice dev = core_->device();
  for (;;) {
    std::vector<std::pair<TokenRef, Completion>> lost;
    VkFence fence = VK_NULL_HANDLE;
    std::optional<InFlight> unrun;  // popped without a fence to wait for
    {
      std::unique_lock lk(queue_mu_);
      queue_cv_.wait(lk, [&] {
        return stop_ || lost_notify_pending_ || (!inflight_.empty() && (inflight_.front().queued || lost_.load()));
      });
      if (inflight_.empty() && stop_) return;
      if (lost_notify_pending_) {
        // Device loss reaches every pending submitter now, not when its fence resolves.
        lost_notify_pending_ = false;
        for (InFlight& f : inflight_)
          if (!f.notified) {
            f.notified = true;
            lost.emplace_back(f.token, f.completion);
          }
      }
      if (!inflight_.empty()) {
        InFlight& front = inflight_.front();
        if (!front.queued || !front.submit_error.ok()) {
          if (front.queued || lost_.load()) {
            unrun.emplace(std::move(front));
            inflight_.pop_front();
          }
        } else {
          fence = front.slot->fence.get();
        }
      }
    }
    Result<> lost_err = MakeError(Errc::kDeviceLost, "device lost");
    for (auto& [token, completion] : lost) {
      ++lost_reports_;
      token->Complete(lost_err);
      if (completion.callback) completion.callback(lost_err);
      if (completion.eventfd) (void)completion.eventfd->Signal(1);
    }
    if (unrun) {
      if (unrun->gated) {
        bool device_idle;
        {
          std::lock_guard lk(queue_mu_);
          device_idle = --gated_on_device_ == 0;
        }
        gate_->Ran(0, device_idle, unrun->sub.cost);
      }
      Result<> err = unrun->queued ? unrun->submit_error : lost_err;
      Finish(*unrun, err, !lost_.load());
    } else if (fence != VK_NULL_HANDLE) {
      VkResult r = vkWaitForFences(dev, 1, &fence, VK_TRUE, kFencePollNs);
      if (r == VK_TIMEOUT) continue;
      InFlight f;
      uint64_t busy_ns = 0;
      bool device_idle = false;
      {
        std::lock_guard lk(queue_mu_);
        f = std::move(inflight_.front());
        inflight_.pop_front();
        if (r == VK_ERROR_DEVICE_LOST && !lost_.exchange(true)) lost_notify_pending_ = true;
        if (f.gated) {
          const auto now = std::chrono::steady_clock::now();
          busy_ns = static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::nanoseconds>(now - std::max(f.queued_at, last_done_)).count());
          last_done_ = now;
          device_idle = --gated_on_device_ == 0;
        }
      }
      if (f.gated) gate_->Ran(busy_ns, device_idle, f.sub.cost);
      if (r == VK_SUCCESS)
        Finish(f, lost_.load() ? lost_err : Ok(), true);
      else
        Finish(f, VkError(r, "vkWaitForFences"), false);
    } else {
      continue;
    }
    {
      std::lock_guard lk(queue_mu_);
      --active_;
    }
    idle_cv_.notify_all();
  }
}

Result<> EngineImpl::WaitIdle() {
  std::unique_lock lk(queue_mu_);
  idle_cv_.wait(lk, [&] { return active_ == 0; });
  VG_ERROR_IF(lost_.load(), Errc::kDeviceLost, "device lost");
  return Ok();
}

void EngineImpl::SimulateDeviceLost() {
  {
    std::lock_guard lk(queue_mu_);
    lost_ = true;
    lost_notify_pending_ = true;
  }
  queue_cv_.notify_all();
}

// ---- Engine (public edge) -------------------------------------------------------------

Engine::Engine(std::unique_ptr<EngineImpl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

Result<std::vector<DeviceInfo>> Engine::ListDevices() {
  VG_TRY_ASSIGN(auto inst, Instance::Create());
  VG_TRY_ASSIGN(auto cands, inst->Enumerate());
  std::vector<DeviceInfo> out;
  for (auto& c : cands) out.push_back(std::move(c.info));
  return out;
}

Result<std::unique_ptr<Engine>> Engine::Create(const EngineOptions& options) {
  VG_TRY_ASSIGN(auto inst, Instance::Create());
  VG_TRY_ASSIGN(auto cands, inst->Enumerate());
  std::string spec = options.gpu;
  if (spec.empty() && options.use_env)
    if (const char* env = std::getenv("VGPUD_GPU")) spec = env;
  VG_TRY_ASSIGN(size_t idx, PickDevice(cands, spec));
  VG_TRY_ASSIGN(auto core, Core::Create(std::move(inst), cands[idx]));
  auto impl = std::make_unique<EngineImpl>(std::move(core), options);
  VG_TRY(impl->Start());
  const DeviceInfo& i = impl->core_->info();
  VG_LOGI("engine: using device {} '{}' ({}, {} {}, Vulkan {}){}", i.index, i.name, DeviceKindName(i.kind),
          i.driver_name, i.driver_info, i.api_version, spec.empty() ? "" : fmt::format(" for gpu='{}'", spec));
  return std::unique_ptr<Engine>(new Engine(std::move(impl)));
}

const DeviceInfo& Engine::Info() const { return impl_->core_->info(); }
EngineCounters Engine::Counters() const { return impl_->Counters(); }
Result<BufferRef> Engine::CreateBuffer(ByteSize size) { return impl_->CreateBuffer(size); }
Result<BufferRef> Engine::WrapHostMemory(std::span<std::byte> host) { return impl_->WrapHostMemory(host); }
Result<> Engine::Validate(const Submission& s) const { return impl_->Validate(s); }
Result<TokenRef> Engine::Submit(Submission s, Completion completion) {
  return impl_->Submit(std::move(s), std::move(completion));
}
Result<> Engine::SubmitAndWait(Submission s) {
  VG_TRY_ASSIGN(TokenRef t, impl_->Submit(std::move(s), {}));
  return t->Wait();
}
Result<> Engine::WaitIdle() { return impl_->WaitIdle(); }
void Engine::SimulateDeviceLost() { impl_->SimulateDeviceLost(); }
void Engine::SetGate(SubmitGate* gate) { impl_->SetGate(gate); }
void Engine::Pump() { impl_->Pump(); }
bool Engine::PrefersSmallSubmissions() const { return impl_->PrefersSmallSubmissions(); }

}  // namespace vg::engine
